"""A PyTorch reference of the same InterLLaVA, assembled from HF transformers modules + peft.

Used by the benchmark scripts (``train_step_bench.py``, ``generate_bench.py``, ``vit_bench.py``)
and by the parity test ``tests/test_torch_interllava.py``; nothing in ``ivcr_jax`` imports it.

The towers (reference-architecture §0–§3, ``ivcr_jax/models/interllava.py``):

* EVA ViT-g: ``Blip2VisionModel`` with its ``post_layernorm`` replaced by the identity, then a
  separate ``nn.LayerNorm`` (eps ``post_eps``) as LAVIS's ``ln_vision``; frozen.
  HF's fused ``qkv.bias`` is one parameter whose key segment LAVIS keeps at zero; it is zeroed
  here (it changes no output: a key bias shifts every score of a query row equally).
* image Q-Former: ``InstructBlipQFormerModel`` fed with the frame's timestamp-sentence tokens
  (LLaMA-tokenised, TimeChat's quirk 1), ``query_tokens`` held here (HF keeps them outside);
  its output keeps the text positions when ``keep_timestamp_text`` (TimeChat's quirk 2).
* video Q-Former: a second ``InstructBlipQFormerModel`` (cross-attention in every layer) with its
  text branch removed as TimeChat does (``word/position_embeddings``, ``intermediate``,
  ``output`` set to None), a frame-position ``nn.Embedding`` added to every token of frame ``t``,
  and TimeChat's literal loop ``for i in range(0, T, stride): frames[i:i + window]`` (a shorter
  last window, where ours pads and masks). With ``keep_timestamp_text`` the video Q-Former attends
  to the timestamp positions up to the longest sentence of the video, padded ones included (the
  reproduced quirk; ``ivcr_jax/models/interllava.py`` builds the same ``token_mask``).
* ``llama_proj``: ``nn.Linear``; LLM: ``LlamaForCausalLM`` + peft LoRA (r, alpha, q/k/v/o),
  positions ``cumsum(mask) - 1`` as ours and HF ``generate`` use.

Weights are shared one way, **torch → ours**, through the project's own converters
(``ivcr_jax/convert``): :func:`ours_flat` turns the reference's state dicts into our flat
``{path: array}`` (HF key names → our paths, Linear transposes, the split qkv bias, the peft LoRA
layout) and :func:`copy_into_ours` loads it with ``params.load_flat`` (every key checked).

The bottom of the file holds what the benchmark scripts share: the model sizes (a copy of
``configs/paper.py``'s model section, which imports ml_collections, absent on the GPU machine; the
test checks that they agree), a synthetic batch with per-slot video arrays (what the reference
reads; :func:`for_ours` packs it into our frame pool with ``ivcr_jax/data/batch.py``'s own
functions), the peak FLOP/s and bandwidth tables of performance-model.md §1, the analytic FLOP
counts of §8, the alternating timer and the report printing.
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BOS, EOS, PAD = 1, 2, 2


# ============================================================================ sizes

def model_dict(size: str) -> dict:
    """The ``config.model`` section of ``configs/paper.py:get_config`` (``"tiny"`` or ``"paper"``;
    ``"7b"`` is the paper model, whose LLM is LLaMA-2-7B). A copy, because configs/paper.py imports
    ml_collections, which the GPU machine lacks; tests/test_torch_interllava.py checks it agrees."""
    if size in ("paper", "7b"):
        m = dict(
            vit=dict(image_size=224, patch_size=14, width=1408, depth=39, heads=16, mlp_dim=6144,
                     eps=1e-6, post_eps=1e-5),
            qformer=dict(vocab_size=30523, hidden=768, layers=12, heads=12, mlp_dim=3072, eps=1e-12,
                         max_positions=512, cross_attention_freq=2, encoder_width=1408,
                         num_query_tokens=32, dropout=0.1),
            video_qformer=dict(hidden=768, layers=2, heads=12, mlp_dim=3072, eps=1e-12,
                               encoder_width=768, num_query_tokens=32, max_frame_pos=96,
                               window=32, stride=32, dropout=0.1),
            llm=dict(vocab_size=32005, hidden=4096, intermediate=11008, layers=32, heads=32,
                     kv_heads=32, rms_eps=1e-5, rope_theta=10000.0, max_positions=4096),
            lora=dict(rank=32, alpha=32.0, dropout=0.1, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
            keep_timestamp_text=True, frozen_dtype="bfloat16", trainable_dtype="float32",
            compute_dtype="bfloat16", remat="full")
    elif size == "tiny":
        m = dict(
            vit=dict(image_size=28, patch_size=14, width=64, depth=2, heads=4, mlp_dim=128,
                     eps=1e-6, post_eps=1e-5),
            qformer=dict(vocab_size=32005, hidden=64, layers=2, heads=4, mlp_dim=128, eps=1e-12,
                         max_positions=64, cross_attention_freq=2, encoder_width=64,
                         num_query_tokens=8, dropout=0.0),
            video_qformer=dict(hidden=64, layers=1, heads=4, mlp_dim=128, eps=1e-12,
                               encoder_width=64, num_query_tokens=8, max_frame_pos=96,
                               window=32, stride=32, dropout=0.0),
            llm=dict(vocab_size=32005, hidden=64, intermediate=128, layers=2, heads=4,
                     kv_heads=4, rms_eps=1e-5, rope_theta=10000.0, max_positions=4096),
            lora=dict(rank=8, alpha=8.0, dropout=0.1, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
            keep_timestamp_text=True, frozen_dtype="float32", trainable_dtype="float32",
            compute_dtype="float32", remat="none")
    else:
        raise ValueError(f"unknown size {size!r}: tiny | paper | 7b")
    return copy.deepcopy(m)


# configs/paper.py's trainable set and train section (the optimizer's hyper-parameters)
TRAINABLE = (r"qformer/.*", r"video_qformer/.*", r"llama_proj/.*", r".*lora_[ab]")
TRAIN = dict(lr=3e-5, min_lr=1e-5, warmup_init_lr=1e-6, warmup_steps=13_200, steps=66_000, weight_decay=0.05,
             b1=0.9, b2=0.999, clip_norm=1.0, grad_accum=1, lr_mults=())


def without_dropout(m: Mapping) -> dict:
    m = copy.deepcopy(dict(m))
    m["qformer"]["dropout"] = m["video_qformer"]["dropout"] = 0.0
    m["lora"]["dropout"] = 0.0
    return m


def video_tokens_per_clip(m: Mapping, frames: int) -> int:
    """TimeChat's sliding windows: ``num_query_tokens * ceil(frames / stride)`` (one window if <= 0)."""
    vq = m["video_qformer"]
    window, stride = _windows(vq, frames)
    return vq["num_query_tokens"] * math.ceil(frames / stride)


def _windows(vq: Mapping, t: int) -> tuple[int, int]:
    if vq["window"] <= 0:
        return t, t
    return vq["window"], (vq["stride"] if vq["stride"] > 0 else vq["window"])


# ============================================================================ the reference model

def _qformer_config(d: Mapping, *, cross_every: int, vocab: int, max_pos: int):
    from transformers import InstructBlipQFormerConfig
    return InstructBlipQFormerConfig(
        vocab_size=vocab, hidden_size=d["hidden"], num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
        intermediate_size=d["mlp_dim"], hidden_act="gelu", hidden_dropout_prob=d["dropout"],
        attention_probs_dropout_prob=d["dropout"], max_position_embeddings=max_pos, layer_norm_eps=d["eps"],
        cross_attention_frequency=cross_every, encoder_hidden_size=d["encoder_width"],
        # ours has no padding row in the word table (LAVIS's BERT has padding_idx 0, which only
        # zeroes one row's init and gradient; the timestamp ids are LLaMA ids, 0 = <unk>)
        pad_token_id=None)


class TorchInterLLaVA(nn.Module):
    """InterLLaVA from HF modules (see the module docstring). ``m``: a :func:`model_dict`."""

    def __init__(self, m: Mapping, *, frozen_dtype=torch.float32, trainable_dtype=torch.float32):
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import Blip2VisionConfig, Blip2VisionModel, InstructBlipQFormerModel, LlamaConfig, \
            LlamaForCausalLM
        self.m = m = copy.deepcopy(dict(m))
        v, q, vq, llm, lora = m["vit"], m["qformer"], m["video_qformer"], m["llm"], m["lora"]
        self.keep_timestamp_text = bool(m.get("keep_timestamp_text", True))
        self.num_queries = q["num_query_tokens"]

        self.vit = Blip2VisionModel(Blip2VisionConfig(
            hidden_size=v["width"], intermediate_size=v["mlp_dim"], num_hidden_layers=v["depth"],
            num_attention_heads=v["heads"], image_size=v["image_size"], patch_size=v["patch_size"],
            hidden_act="gelu", layer_norm_eps=v["eps"], qkv_bias=True, attention_dropout=0.0))
        self.vit.post_layernorm = nn.Identity()            # LAVIS's ViT has no final norm ...
        self.ln_vision = nn.LayerNorm(v["width"], eps=v["post_eps"])   # ... ln_vision follows it

        self.qformer = InstructBlipQFormerModel(_qformer_config(
            q, cross_every=q["cross_attention_freq"], vocab=q["vocab_size"], max_pos=q["max_positions"]))
        self.query_tokens = nn.Parameter(0.02 * torch.randn(1, q["num_query_tokens"], q["hidden"]))

        self.video_qformer = InstructBlipQFormerModel(_qformer_config(vq, cross_every=1, vocab=1, max_pos=1))
        # TimeChat removes the video Q-Former's text branch before loading its weights.
        self.video_qformer.embeddings.word_embeddings = None
        self.video_qformer.embeddings.position_embeddings = None
        for layer in self.video_qformer.encoder.layer:
            layer.intermediate = layer.output = None
        self.video_query_tokens = nn.Parameter(0.02 * torch.randn(1, vq["num_query_tokens"], vq["hidden"]))
        self.frame_position_embedding = nn.Embedding(vq["max_frame_pos"], vq["hidden"])
        self.llama_proj = nn.Linear(vq["hidden"], llm["hidden"])

        base = LlamaForCausalLM(LlamaConfig(
            vocab_size=llm["vocab_size"], hidden_size=llm["hidden"], intermediate_size=llm["intermediate"],
            num_hidden_layers=llm["layers"], num_attention_heads=llm["heads"], num_key_value_heads=llm["kv_heads"],
            head_dim=llm.get("head_dim") or llm["hidden"] // llm["heads"], rms_norm_eps=llm["rms_eps"],
            rope_theta=llm["rope_theta"], max_position_embeddings=llm["max_positions"],
            tie_word_embeddings=bool(llm.get("tie_embeddings", False)), bos_token_id=BOS, eos_token_id=EOS,
            pad_token_id=PAD))
        base.to(frozen_dtype)
        # peft keeps the adapters in fp32 over a bf16 base (autocast_adapter_dtype), as ours does.
        self.llama = get_peft_model(base, LoraConfig(
            r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=list(lora["targets"]), bias="none"))

        with torch.no_grad():
            for layer in self.vit.encoder.layers:   # EVA has no key bias (LAVIS: cat(q_bias, 0, v_bias))
                d = v["width"]
                layer.self_attn.qkv.bias[d:2 * d].zero_()
        self.vit.to(frozen_dtype)
        self.ln_vision.to(frozen_dtype)
        for mod in (self.qformer, self.video_qformer, self.frame_position_embedding, self.llama_proj):
            mod.to(trainable_dtype)
        self.query_tokens.data = self.query_tokens.data.to(trainable_dtype)
        self.video_query_tokens.data = self.video_query_tokens.data.to(trainable_dtype)
        self.freeze()

    # ------------------------------------------------------------------ trainable set
    def freeze(self) -> None:
        """Ours' ``config.trainable``: Q-Formers, their queries, the frame table, ``llama_proj``, LoRA."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_trainable(name))

    @staticmethod
    def is_trainable(name: str) -> bool:
        if name.startswith(("vit.", "ln_vision.")):
            return False
        if name.startswith("llama."):
            return ".lora_A." in name or ".lora_B." in name
        return True

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ video side
    def image_features(self, frames):
        """``frames [N, H, W, 3]`` uint8 → the frozen ViT's ``[N, 1 + patches, D]`` (ln_vision applied)."""
        mean = torch.tensor(CLIP_MEAN, device=frames.device)
        std = torch.tensor(CLIP_STD, device=frames.device)
        x = ((frames.float() / 255.0 - mean) / std).permute(0, 3, 1, 2)
        with torch.no_grad():                                  # frozen tower (ours: stop_gradient)
            return self.ln_vision(self.vit(pixel_values=x).last_hidden_state)

    def encode_frames(self, frames, ts_ids, ts_mask, vit_features=None):
        """``frames [N, H, W, 3]`` uint8 (or their ``vit_features``) → image Q-Former output
        ``[N, Q (+L_ts), D]``."""
        img = self.image_features(frames) if vit_features is None else vit_features
        n, q = img.shape[0], self.num_queries
        mask = torch.cat([torch.ones(n, q, dtype=ts_mask.dtype, device=ts_mask.device), ts_mask], dim=1)
        out = self.qformer(input_ids=ts_ids, attention_mask=mask, query_embeds=self.query_tokens.expand(n, -1, -1),
                           encoder_hidden_states=img).last_hidden_state
        return out if self.keep_timestamp_text else out[:, :q]

    def encode_videos(self, group: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One group ``frames [B, V, T, H, W, 3]`` (or ``vit_features [B, V, T, 1+N, D]``, the ViT
        feature cache) → LLM tokens ``[B, V * n_tok, D_llm]``."""
        b, v, t = group["frame_mask"].shape[:3]
        ts_ids = group["timestamp_ids"].reshape(b * v * t, -1)
        ts_mask = group["timestamp_mask"].reshape(b * v * t, -1)
        flat = lambda x: None if x is None else x.reshape((b * v * t,) + tuple(x.shape[3:]))  # noqa: E731
        tok = self.encode_frames(flat(group.get("frames")), ts_ids, ts_mask, vit_features=flat(group.get("vit_features")))
        bv, q, d = b * v, self.num_queries, tok.shape[-1]
        tok = tok.reshape(bv, t, tok.shape[-2], d)
        keep = group["frame_mask"].reshape(bv, t).bool()
        keep = keep | ~keep.any(-1, keepdim=True)              # padding slots: see interllava.py
        keep = keep[:, :, None].expand(bv, t, tok.shape[2])
        if self.keep_timestamp_text:
            # Reproduced TimeChat quirk: every timestamp position up to the video's longest sentence.
            lens = group["timestamp_mask"].reshape(bv, t, -1).sum(-1).amax(-1)              # [BV]
            text_ok = torch.arange(tok.shape[2] - q, device=lens.device)[None, :] < lens[:, None]
            tm = torch.cat([torch.ones(bv, q, dtype=torch.bool, device=lens.device), text_ok], dim=1)
            keep = keep & tm[:, None, :]
        x = tok + self.frame_position_embedding.weight[:t].to(tok.dtype)[None, :, None, :]
        window, stride = _windows(self.m["video_qformer"], t)
        queries = self.video_query_tokens.expand(bv, -1, -1)
        outs = []
        for i in range(0, t, stride):                          # TimeChat encode_videoQformer_visual
            clip = x[:, i:i + window].reshape(bv, -1, d)
            atts = keep[:, i:i + window].reshape(bv, -1).long()
            outs.append(self.video_qformer(input_ids=None, query_embeds=queries, encoder_hidden_states=clip,
                                           encoder_attention_mask=atts).last_hidden_state)
        vid = self.llama_proj(torch.cat(outs, dim=1))
        return vid.reshape(b, -1, vid.shape[-1])

    def input_embeddings(self, batch: Mapping[str, Any]) -> torch.Tensor:
        text = self.llama.get_input_embeddings()(batch["input_ids"])
        videos = batch.get("videos") or {}
        if not videos:
            return text
        vt = torch.cat([self.encode_videos(videos[g]) for g in sorted(videos)], dim=1)
        idx = batch["video_token_index"].long()
        gathered = torch.gather(vt, 1, idx.clamp(min=0)[..., None].expand(-1, -1, vt.shape[-1]))
        return torch.where((idx >= 0)[..., None], gathered.to(text.dtype), text)

    @staticmethod
    def positions(mask: torch.Tensor) -> torch.Tensor:
        return (torch.cumsum(mask.long(), -1) - 1).clamp(min=0)

    def forward(self, batch: Mapping[str, Any], labels: torch.Tensor | None = None, **kw):
        """Teacher-forced: the ``LlamaForCausalLM`` output (``.logits [B, S, V]``; ``.loss`` with
        labels; ``kw`` such as ``logits_to_keep`` go to HF)."""
        emb = self.input_embeddings(batch)
        mask = batch["attention_mask"]
        return self.llama(inputs_embeds=emb, attention_mask=mask, position_ids=self.positions(mask), labels=labels,
                          **kw)


# ============================================================================ weights: torch → ours

def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def _items(module: nn.Module):
    return ((k, _np(v)) for k, v in module.state_dict().items())


def ours_flat(ref: TorchInterLLaVA, cfg=None) -> dict[str, np.ndarray]:
    """Our flat ``{path: array}`` of the reference's weights, through ``ivcr_jax/convert``."""
    from flax import nnx

    from ivcr_jax.convert import eva_vit as eva_conv, llama as llama_conv, qformer as qf_conv
    from ivcr_jax.models.interllava import InterLLaVAConfig
    from ivcr_jax.models.llama import Llama
    from ivcr_jax.models.lora import BASE_PARAMS
    from ivcr_jax.models.params import flat_state
    cfg = cfg or InterLLaVAConfig.from_dict(ref.m)
    src = "torch reference"
    flat: dict[str, np.ndarray] = {}

    vit = list(_items(ref.vit)) + [("post_layernorm.weight", _np(ref.ln_vision.weight)),
                                   ("post_layernorm.bias", _np(ref.ln_vision.bias))]
    flat.update({f"vit/{k}": v for k, v in eva_conv.convert_hf_tensors(vit, cfg.vit, source=src).items()})

    qf = qf_conv.convert_hf_qformer(_items(ref.qformer), source=src).qformer
    qf["query_tokens"] = _np(ref.query_tokens)
    flat.update({f"qformer/{k}": v for k, v in qf.items()})

    bert = qf_conv.convert_hf_qformer(_items(ref.video_qformer), source=src).qformer
    vq = qf_conv.video_qformer_flat(bert, _np(ref.video_query_tokens), _np(ref.frame_position_embedding.weight))
    flat.update({f"video_qformer/{k}": v for k, v in vq.items()})

    flat["llama_proj/kernel"] = np.ascontiguousarray(_np(ref.llama_proj.weight).T)
    flat["llama_proj/bias"] = _np(ref.llama_proj.bias)

    sd = ref.llama.get_base_model().state_dict()
    base = ((k.replace(".base_layer.", "."), _np(v)) for k, v in sd.items() if ".lora_" not in k)
    expected = {k: tuple(v.get_value().shape) for k, v in flat_state(
        nnx.eval_shape(lambda: Llama(cfg.llm, rngs=nnx.Rngs(0))), BASE_PARAMS).items()}
    flat.update({f"llama/{k}": v for k, v in llama_conv.iter_hf_llama(
        base, expected, source=src, dtype=np.float32, tie_embeddings=cfg.llm.tie_embeddings)})
    lora = llama_conv.lora_flat(_items(ref.llama), prefix=llama_conv.PEFT_PREFIX, source=src)
    flat.update({f"llama/{k}": v for k, v in lora.items()})
    return flat


def copy_into_ours(ref: TorchInterLLaVA, model) -> None:
    """Load the reference's weights into our :class:`InterLLaVA` (in place; every key checked)."""
    from ivcr_jax.models.params import load_flat
    load_flat(model, ours_flat(ref, model.config), source="torch reference")


def noisy_(module: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """HF's std-0.02 init hides errors under tiny activations: perturb every weight (as
    tests/reference.py does), keeping the ViT's key-bias segment at zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
        if isinstance(module, TorchInterLLaVA):
            d = module.m["vit"]["width"]
            for layer in module.vit.encoder.layers:
                layer.self_attn.qkv.bias[d:2 * d].zero_()
    return module


# ============================================================================ a synthetic batch

def synthetic_batch(m: Mapping, *, batch: int, groups: Mapping[str, tuple[int, int]], text_len: int,
                    answer_len: int, frame_size: int | None = None, timestamp_len: int = 16, seed: int = 0,
                    ragged: bool = False) -> dict:
    """A batch of the pipeline's arrays (``ivcr_jax/data/batch.py``) in the per-slot video layout
    (``videos[g]`` holds ``frames [B, V, T, H, W, 3]``, ``timestamp_ids``/``timestamp_mask
    [B, V, T, L]``, ``frame_mask``, ``video_mask``; every frame real): ``groups`` ``{"f12": (V, T)}``,
    each video's placeholder block of ``video_tokens_per_clip`` tokens between random text; the last
    ``answer_len`` real tokens of a row supervised. ``ragged``: rows of different lengths (right
    padding) and timestamp sentences of different lengths per frame. :func:`for_ours` turns it
    into what our model reads."""
    r = np.random.default_rng(seed)
    size = frame_size or m["vit"]["image_size"]
    blocks = []                                       # (group, slot, n_tokens) in sorted group order
    for g in sorted(groups):
        v, t = groups[g]
        blocks += [(g, s, video_tokens_per_clip(m, t)) for s in range(v)]
    S = text_len + sum(n for *_, n in blocks)
    out = {"input_ids": np.full((batch, S), PAD, np.int32), "attention_mask": np.zeros((batch, S), np.int32),
           "labels": np.full((batch, S), -100, np.int32), "video_token_index": np.full((batch, S), -1, np.int32),
           "weight": np.ones((batch,), np.float32), "sample_id": np.arange(batch, dtype=np.int32),
           "kind": np.zeros((batch,), np.int32), "videos": {}}
    vocab = m["llm"]["vocab_size"] - 5                # the 5 IVCR tokens are ids 32000..32004
    ts_vocab = min(m["qformer"]["vocab_size"], vocab)
    for row in range(batch):
        n_text = text_len - (3 * row if ragged else 0)
        cuts = np.sort(r.choice(np.arange(1, n_text - answer_len), size=len(blocks), replace=True))
        ids, idx, c0, offset = [BOS], [-1], 1, 0
        for cut, (_, _, n) in zip(cuts, blocks):
            ids += r.integers(3, vocab, cut - c0).tolist()
            idx += [-1] * (cut - c0)
            ids += [32004] * n                        # <VIDEOTOKEN> placeholders
            idx += list(range(offset, offset + n))
            offset, c0 = offset + n, cut
        ids += r.integers(3, vocab, n_text - c0).tolist()
        idx += [-1] * (n_text - c0)
        L = len(ids)
        out["input_ids"][row, :L] = ids
        out["attention_mask"][row, :L] = 1
        out["video_token_index"][row, :L] = idx
        out["labels"][row, L - answer_len:L] = out["input_ids"][row, L - answer_len:L]
    for g in sorted(groups):
        v, t = groups[g]
        lens = (r.integers(timestamp_len // 2, timestamp_len + 1, (batch, v, t)) if ragged
                else np.full((batch, v, t), timestamp_len))
        tmask = (np.arange(timestamp_len)[None, None, None, :] < lens[..., None]).astype(np.int32)
        tids = r.integers(3, ts_vocab, (batch, v, t, timestamp_len)).astype(np.int32)
        out["videos"][g] = {
            "frames": r.integers(0, 256, (batch, v, t, size, size, 3), dtype=np.uint8),
            "timestamp_ids": np.where(tmask > 0, tids, PAD).astype(np.int32), "timestamp_mask": tmask,
            "frame_mask": np.ones((batch, v, t), bool), "video_mask": np.ones((batch, v), bool)}
    return out


def for_ours(batch: Mapping, model_cls=None) -> dict:
    """``batch`` as our model reads it. An InterLLaVA that encodes a frame pool (``encode_pool``:
    the frame-packing batch layout of ``ivcr_jax/data/batch.py``) gets the frames moved into
    ``batch["pool"]`` by the data layer's own ``frame_records`` + ``BatchLayout.pack``; the per-slot
    layout otherwise."""
    if model_cls is None:
        from ivcr_jax.models.interllava import InterLLaVA as model_cls
    if not hasattr(model_cls, "encode_pool") or not batch.get("videos"):
        return dict(batch)
    from ivcr_jax.data.batch import BatchLayout, frame_records
    videos = batch["videos"]
    any_g = next(iter(videos.values()))
    layout = BatchLayout({g: tuple(np.shape(a["frame_mask"])[1:]) for g, a in videos.items()},
                         int(np.shape(any_g["frames"])[-2]), int(np.shape(any_g["timestamp_ids"])[-1]))
    B = int(np.shape(batch["input_ids"])[0])
    pool, idx = layout.pack(frame_records(layout, videos), B)
    out = {k: v for k, v in batch.items() if k != "videos"}
    out["pool"] = pool
    out["videos"] = {g: {"pool_index": idx[g], "frame_mask": videos[g]["frame_mask"],
                         "video_mask": videos[g]["video_mask"]} for g in videos}
    return out


def to_torch(batch: Mapping, device) -> dict:
    def conv(x):
        if isinstance(x, Mapping):
            return {k: conv(v) for k, v in x.items()}
        x = np.asarray(x)
        t = torch.from_numpy(x.astype(np.int64) if x.dtype in (np.int32,) else x)
        return t.to(device)
    return conv(batch)


# ============================================================================ hardware limits

# Dense bf16 peak FLOP/s per device (performance-model.md §1), keyed by a substring of
# ``device_kind`` (jax) / ``torch.cuda.get_device_name`` (first match wins: "v5 lite" before "v5").
PEAK_BF16 = (
    ("H200", 989e12), ("H100", 989.4e12), ("A100", 312e12), ("RTX 4090", 165.2e12),
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("TPU v5", 459e12),
    ("v6 lite", 918e12), ("v6e", 918e12),
)


# Memory bandwidth, bytes/s (§1): the limit of batch-1 decoding.
PEAK_BW = (
    ("H200", 4.8e12), ("H100", 3.35e12), ("A100", 2.039e12), ("RTX 4090", 1.008e12),
    ("v5 lite", 819e9), ("v5e", 819e9), ("v5p", 2.765e12), ("TPU v5", 2.765e12),
    ("v6 lite", 1.638e12), ("v6e", 1.638e12),
)


def bw_from_table(kind: str) -> float | None:
    for key, bw in PEAK_BW:
        if key.lower() in kind.lower():
            return bw
    return None


def measured_cpu_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a large numpy copy (read + write counted)."""
    a = np.ones(mib * 2 ** 20 // 4, np.float32)
    b = np.empty_like(a)
    t = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    return 2 * a.nbytes / t


def peak_from_table(kind: str) -> float | None:
    for key, flops in PEAK_BF16:
        if key.lower() in kind.lower():
            return flops
    return None


def measured_cpu_peak(n: int = 2048, repeats: int = 5) -> dict:
    """No table for a CPU: the best fp32 matmul FLOP/s of ``[n, n] @ [n, n]`` in jax and in torch."""
    import jax
    import jax.numpy as jnp
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ja = jnp.asarray(a)
    f = jax.jit(lambda x: x @ x)
    f(ja).block_until_ready()
    tj = min(_timed(lambda: f(ja).block_until_ready()) for _ in range(repeats))
    ta_ = torch.from_numpy(a)
    torch.mm(ta_, ta_)
    tt = min(_timed(lambda: torch.mm(ta_, ta_)) for _ in range(repeats))
    flops = 2.0 * n ** 3
    return {"jax_fp32_flops": flops / tj, "torch_fp32_flops": flops / tt,
            "peak_flops": max(flops / tj, flops / tt), "matmul_n": n}


def hardware(device_kind: str, platform: str) -> dict:
    """``{"device", "peak_flops", "peak_source"}``: the table of §1 on accelerators, a measured
    fp32 matmul on CPU."""
    if platform == "cpu":
        p = measured_cpu_peak()
        return {"device": device_kind, **p, "peak_bw": measured_cpu_bandwidth(),
                "peak_source": f"measured: best fp32 {p['matmul_n']}^2 matmul of jax "
                               f"({p['jax_fp32_flops'] / 1e9:.1f} GF/s) and torch ({p['torch_fp32_flops'] / 1e9:.1f} GF/s); "
                               "bandwidth: a 256 MiB numpy copy"}
    peak = peak_from_table(device_kind)
    return {"device": device_kind, "peak_flops": peak, "peak_bw": bw_from_table(device_kind),
            "peak_source": "performance-model.md §1 dense bf16 and memory bandwidth" if peak
            else "unknown device kind: no MFU"}


def uptime() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


# ============================================================================ analytic FLOPs (§8)

def vit_forward_flops(v: Mapping, frames: int) -> float:
    """EVA ViT forward (§8): linear 2·(4d² + 2·d·mlp)·n per layer, attention 4·n²·d, patch embed."""
    d, mlp, depth, p = v["width"], v["mlp_dim"], v["depth"], v["patch_size"]
    g = v["image_size"] // p
    n = g * g + 1
    per = depth * (2 * (4 * d * d + 2 * d * mlp) * n + 4 * n * n * d) + 2 * (n - 1) * 3 * p * p * d
    return float(per) * frames


def qformer_forward_flops(q: Mapping, text: int, enc_tokens: int, frames: int) -> float:
    """Image Q-Former per frame: self-attention + FFN over Q + text, cross-attention (queries only)."""
    h, mlp, nq = q["hidden"], q["mlp_dim"], q["num_query_tokens"]
    t = nq + text
    per = 0
    for i in range(q["layers"]):
        per += 2 * 4 * h * h * t + 4 * t * t * h + 2 * 2 * h * mlp * t
        if q["cross_attention_freq"] > 0 and i % q["cross_attention_freq"] == 0:
            per += 2 * 2 * h * h * nq + 2 * 2 * q["encoder_width"] * h * enc_tokens + 4 * nq * enc_tokens * h
    return float(per) * frames


def video_qformer_forward_flops(vq: Mapping, tokens_per_frame: int, frames: int, clips: int) -> float:
    h, mlp, nq = vq["hidden"], vq["mlp_dim"], vq["num_query_tokens"]
    window, stride = _windows(vq, frames)
    total = 0
    for i in range(0, frames, stride):
        keys = min(window, frames - i) * tokens_per_frame
        total += vq["layers"] * (2 * 4 * h * h * nq + 4 * nq * nq * h + 2 * 2 * h * h * nq
                                 + 2 * 2 * vq["encoder_width"] * h * keys + 4 * nq * keys * h + 2 * 2 * h * mlp * nq)
    return float(total) * clips


def llm_matmul_params(llm: Mapping) -> tuple[int, int]:
    """(per-token matmul parameters of the decoder blocks, of the LM head)."""
    d, ff, L = llm["hidden"], llm["intermediate"], llm["layers"]
    dh = llm.get("head_dim") or d // llm["heads"]
    attn = d * llm["heads"] * dh * 2 + d * llm["kv_heads"] * dh * 2
    return L * (attn + 3 * d * ff), d * llm["vocab_size"]


def train_flops(m: Mapping, *, batch: int, groups: Mapping[str, tuple[int, int]], seq: int, supervised: int,
                timestamp_len: int) -> dict:
    """Model FLOPs of one train step by performance-model.md §8's conventions: frozen ViT forward
    only; trainable Q-Formers and projection 3× forward; the LLM with LoRA 2·N·S forward + 2·N·S
    input-gradient backward (+ causal attention, both ways) + the LoRA weight gradients. The LM
    head counts at the supervised positions only (the loss needs no other logits). No remat."""
    v, q, vq, llm, lora = m["vit"], m["qformer"], m["video_qformer"], m["llm"], m["lora"]
    enc_tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
    text = timestamp_len
    kept = q["num_query_tokens"] + (text if m.get("keep_timestamp_text", True) else 0)
    vit = qf = vqf = proj = 0.0
    for _, (nv, t) in groups.items():
        frames = batch * nv * t
        vit += vit_forward_flops(v, frames)
        qf += 3 * qformer_forward_flops(q, text, enc_tokens, frames)
        vqf += 3 * video_qformer_forward_flops(vq, kept, t, batch * nv)
        proj += 3 * 2 * vq["hidden"] * llm["hidden"] * video_tokens_per_clip(m, t) * batch * nv
    n_blocks, n_head = llm_matmul_params(llm)
    tokens = batch * seq
    d, L = llm["hidden"], llm["layers"]
    attn = 2 * L * seq * seq * d * batch                       # causal QK^T + AV (half of 4·S²·d)
    n_lora = L * len(lora["targets"]) * lora["rank"] * 2 * d   # square q/k/v/o projections
    llm_f = (2 + 2) * n_blocks * tokens + 2 * attn + 3 * 2 * n_lora * tokens + 4 * n_head * batch * supervised
    parts = {"vit": vit, "qformer": qf, "video_qformer": vqf, "llama_proj": proj, "llm": float(llm_f)}
    parts["total"] = sum(parts.values())
    return parts


# ============================================================================ timing

def prefill_flops(m: Mapping, *, batch: int, groups: Mapping[str, tuple[int, int]], seq: int,
                  timestamp_len: int) -> dict:
    """Forward FLOPs of encoding the prompt's videos and one LLM pass over it (LM head at the last
    position only)."""
    v, q, vq, llm = m["vit"], m["qformer"], m["video_qformer"], m["llm"]
    enc_tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
    kept = q["num_query_tokens"] + (timestamp_len if m.get("keep_timestamp_text", True) else 0)
    video = 0.0
    for _, (nv, t) in groups.items():
        frames = batch * nv * t
        video += vit_forward_flops(v, frames) + qformer_forward_flops(q, timestamp_len, enc_tokens, frames)
        video += video_qformer_forward_flops(vq, kept, t, batch * nv)
        video += 2 * vq["hidden"] * llm["hidden"] * video_tokens_per_clip(m, t) * batch * nv
    n_blocks, n_head = llm_matmul_params(llm)
    lm = 2 * n_blocks * batch * seq + 2 * llm["layers"] * seq * seq * llm["hidden"] * batch + 2 * n_head * batch
    return {"video": video, "llm": float(lm), "total": video + lm}


def llm_weight_bytes(m: Mapping) -> float:
    """Bytes of LLaMA weights one decode step reads (base in the frozen dtype, fp32 LoRA)."""
    llm, lora = m["llm"], m["lora"]
    n_blocks, n_head = llm_matmul_params(llm)
    base = 2 if m.get("frozen_dtype") == "bfloat16" else 4
    n_lora = llm["layers"] * len(lora["targets"]) * lora["rank"] * 2 * llm["hidden"]
    return float((n_blocks + n_head) * base + 4 * n_lora)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(fns: Mapping[str, Callable[[], Any]], rounds: int, per_round: int = 1) -> dict[str, list[float]]:
    """Run ``fns`` in turn (ours, torch, ours, torch ...), ``per_round`` calls each time; each
    call's seconds. Load on a shared machine then falls on both alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                times[name].append(_timed(fn))
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def sync(device) -> None:
    if isinstance(device, torch.device) and device.type == "cuda" or device == "cuda":
        torch.cuda.synchronize()


def torch_device(force_cpu: bool = False) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not force_cpu else "cpu")


# ============================================================================ reporting

def parse_groups(retrieval: str, moment: str) -> dict[str, tuple[int, int]]:
    """``"10x12"``, ``"1x96"`` → ``{"f12": (10, 12), "f96": (1, 96)}`` (``"0"`` or ``""`` drops a group)."""
    out: dict[str, tuple[int, int]] = {}
    for spec in (retrieval, moment):
        if not spec or spec == "0":
            continue
        v, t = (int(x) for x in spec.lower().split("x"))
        if f"f{t}" in out:
            raise ValueError(f"two groups of {t} frames: {retrieval!r}, {moment!r}")
        out[f"f{t}"] = (v, t)
    return out


def xla_flops(compiled) -> float | None:
    """FLOPs of a compiled executable from XLA's cost analysis (a dict, or a list of one on older jax)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # some backends have none
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    f = (ca or {}).get("flops")
    return float(f) if f else None


def add_run_args(p, *, seed: bool = True) -> None:
    """The flags every InterLLaVA benchmark shares: weight sharing, seed, torch threads, JSON out."""
    p.add_argument("--share-weights", choices=["auto", "yes", "no"], default="auto")
    if seed:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads on CPU (0: torch's default, one per core)")
    p.add_argument("--json")


def run_setup(a):
    """``(hardware, torch device, share weights?)`` from the flags of :func:`add_run_args`."""
    import jax

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    device = torch.device("cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu")
    share = a.share_weights == "yes" or (a.share_weights == "auto" and a.size == "tiny")
    return jax_hardware(), device, share


def jax_hardware() -> dict:
    import jax
    d = jax.devices()[0]
    return hardware(d.device_kind, d.platform)


def fmt(x, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and (abs(x) >= 1e4 or 0 < abs(x) < 1e-3):
        return f"{x:.{digits}g}{unit}"
    return f"{x:.{digits}g}{unit}" if isinstance(x, float) else f"{x}{unit}"


def print_table(title: str, rows, notes=()) -> None:
    """``(what, ours, torch, unit, higher_is_better)`` rows; the last column says how many times
    better ours is (torch/ours for times, ours/torch for rates: > 1 means ours is ahead)."""
    print(f"\n== {title}")
    print(f"{'':34s} {'ours (jax)':>14s} {'torch ref':>14s} {'ours ahead x':>13s}")
    for what, a, b, unit, higher in rows:
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and a and b
        ratio = ((a / b) if higher else (b / a)) if ok else None
        print(f"{what:34s} {fmt(a, unit):>14s} {fmt(b, unit):>14s} {fmt(ratio):>13s}")
    for n in notes:
        print(f"  {n}")


def write_json(path: str | None, result: Mapping) -> None:
    if not path:
        return
    import json
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {path}")
