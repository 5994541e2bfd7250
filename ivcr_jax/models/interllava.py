"""InterLLaVA: frames → EVA ViT-g → ln_vision → image Q-Former (+timestamp text) → sliding video
Q-Former → ``llama_proj`` → LLaMA-2 input embeddings (reference-architecture §0, §3, §8.3).

One batch (see ``ivcr_jax/data/pipeline.py``) holds the chat tokens, in which each
``<VIDEOTOKEN>`` has been expanded to as many placeholder positions as its video has tokens,
and ``video_token_index`` saying which video token goes where. Videos come in groups of equal
frame count (``f12`` retrieval candidates, ``f96`` moment videos ...), each
``frames [B, V, T, H, W, 3]`` uint8. Each group is encoded in one batched pass; the per-sample
concatenation of the groups' token blocks (sorted group names, video by video) is gathered
into the placeholder positions.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax import sharding
from ivcr_jax.models.eva_vit import EvaViT, EvaViTConfig
from ivcr_jax.models.layers import Dense
from ivcr_jax.models.llama import Llama, LlamaConfig
from ivcr_jax.models.lora import LoRAConfig
from ivcr_jax.models.qformer import QFormer, QFormerConfig
from ivcr_jax.models.video_qformer import VideoQFormer, VideoQFormerConfig

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)


def _dtype(name: str):
    return jnp.dtype(name)


@dataclasses.dataclass(frozen=True)
class InterLLaVAConfig:
    vit: EvaViTConfig
    qformer: QFormerConfig
    video_qformer: VideoQFormerConfig
    llm: LlamaConfig
    lora: LoRAConfig | None
    keep_timestamp_text: bool = True
    frozen_dtype: str = "bfloat16"
    trainable_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat: str = "none"

    @classmethod
    def from_dict(cls, m: Mapping[str, Any]) -> "InterLLaVAConfig":
        m = dict(m)
        llm = dict(m["llm"])
        if "remat" in {f.name for f in dataclasses.fields(LlamaConfig)}:
            llm["remat"] = m.get("remat", "none")
        lora = m.get("lora")
        if lora:
            lora = dict(lora)
            lora["targets"] = tuple(lora["targets"])
        return cls(
            vit=EvaViTConfig(**dict(m["vit"])),
            qformer=QFormerConfig(**dict(m["qformer"])),
            video_qformer=VideoQFormerConfig(**dict(m["video_qformer"])),
            llm=LlamaConfig(**llm),
            lora=LoRAConfig(**lora) if lora else None,
            keep_timestamp_text=bool(m.get("keep_timestamp_text", True)),
            frozen_dtype=m.get("frozen_dtype", "bfloat16"),
            trainable_dtype=m.get("trainable_dtype", "float32"),
            compute_dtype=m.get("compute_dtype", "bfloat16"),
            remat=m.get("remat", "none"),
        )


class InterLLaVA(nnx.Module):
    """The full video-LLM. Frozen: ``vit``, the LLaMA base. Trainable: the rest and LoRA."""

    def __init__(self, config: InterLLaVAConfig, *, rngs: nnx.Rngs):
        self.config = config
        frozen, trainable = _dtype(config.frozen_dtype), _dtype(config.trainable_dtype)
        compute = _dtype(config.compute_dtype)
        self.vit = EvaViT(config.vit, dtype=compute, param_dtype=frozen, rngs=rngs)
        self.qformer = QFormer(config.qformer, dtype=compute, param_dtype=trainable, rngs=rngs)
        self.video_qformer = VideoQFormer(config.video_qformer, dtype=compute, param_dtype=trainable,
                                          rngs=rngs)
        self.llama_proj = Dense(config.video_qformer.hidden, config.llm.hidden, names=(None, "embed"),
                                dtype=compute, param_dtype=trainable, rngs=rngs)
        self.llama = Llama(config.llm, lora=config.lora, dtype=compute, param_dtype=frozen,
                           lora_param_dtype=trainable, rngs=rngs)

    # ------------------------------------------------------------------ video side
    def encode_frames(self, frames: jax.Array, ts_ids: jax.Array, ts_mask: jax.Array,
                      rng: jax.Array | None = None) -> jax.Array:
        """Per-frame tokens: ``frames [N, H, W, 3]`` uint8 → ``[N, Q (+L_ts), D_qformer]``."""
        x = (frames.astype(jnp.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
        img = self.vit(x, apply_post_norm=True)            # ln_vision applied
        img = jax.lax.stop_gradient(img)                   # frozen tower
        img = sharding.constrain(img, ("batch", "length", "embed"))
        out = self.qformer(ts_ids, ts_mask, img, rng=rng)  # [N, Q + L_ts, D]
        if not self.config.keep_timestamp_text:
            out = out[:, : self.config.qformer.num_query_tokens]
        return out

    def encode_videos(self, group: Mapping[str, jax.Array], rng: jax.Array | None = None) -> jax.Array:
        """One group of equal-length videos → LLM tokens ``[B, V * n_tok, D_llm]``."""
        frames = group["frames"]                           # [B, V, T, H, W, 3] uint8
        b, v, t = frames.shape[:3]
        ts_ids = group["timestamp_ids"].reshape(b * v * t, -1)
        ts_mask = group["timestamp_mask"].reshape(b * v * t, -1)
        r1, r2 = (None, None) if rng is None else tuple(jax.random.split(rng))
        tok = self.encode_frames(frames.reshape((b * v * t,) + frames.shape[3:]), ts_ids, ts_mask, r1)
        tok = tok.reshape(b * v, t, tok.shape[-2], tok.shape[-1])
        q = self.config.qformer.num_query_tokens
        token_mask = None
        if self.config.keep_timestamp_text:
            # Reproduced TimeChat quirk: the reference pads each video's timestamp sentences to
            # the longest one of that video and the video Q-Former attends to all of those
            # positions, padding included, but no further.
            lens = group["timestamp_mask"].reshape(b * v, t, -1).sum(-1).max(-1)    # [BV]
            pos = jnp.arange(tok.shape[-2] - q)
            text_ok = pos[None, :] < lens[:, None]                                   # [BV, L]
            token_mask = jnp.concatenate(
                [jnp.ones((b * v, q), bool), text_ok], axis=-1)[:, None, :].repeat(t, axis=1)
        frame_mask = group["frame_mask"].reshape(b * v, t).astype(bool)
        # A padding slot has no valid frame: fully masked attention would give NaN, and NaN in
        # an unused branch still poisons gradients. Its tokens are never gathered, so let it
        # attend to its (zero) frames instead.
        frame_mask = frame_mask | ~frame_mask.any(-1, keepdims=True)
        vid = self.video_qformer(tok, frame_mask=frame_mask, token_mask=token_mask, rng=r2)
        vid = self.llama_proj(vid)                                                   # [BV, n, D]
        return vid.reshape(b, v * vid.shape[1], vid.shape[-1])

    def video_tokens(self, videos: Mapping[str, Mapping[str, jax.Array]],
                     rng: jax.Array | None = None) -> jax.Array | None:
        """Concatenate every group's tokens per sample (sorted group names) → ``[B, M, D]``."""
        if not videos:
            return None
        names = sorted(videos)
        rngs = [None] * len(names) if rng is None else list(jax.random.split(rng, len(names)))
        return jnp.concatenate([self.encode_videos(videos[n], r) for n, r in zip(names, rngs)], axis=1)

    # ------------------------------------------------------------------ LLM side
    def input_embeddings(self, batch: Mapping[str, Any], rng: jax.Array | None = None) -> jax.Array:
        """Text embeddings with every video placeholder replaced by its video token."""
        text = self.llama.embed(batch["input_ids"])                                  # [B, S, D]
        vt = self.video_tokens(batch.get("videos") or {}, rng)
        if vt is None:
            return text
        idx = batch["video_token_index"]
        gathered = jnp.take_along_axis(vt, jnp.maximum(idx, 0)[..., None], axis=1)
        emb = jnp.where((idx >= 0)[..., None], gathered.astype(text.dtype), text)
        return sharding.constrain(emb, ("batch", "length", "embed"))

    def __call__(self, batch: Mapping[str, Any], *, rng: jax.Array | None = None,
                 return_hidden: bool = False, logits_at: jax.Array | None = None):
        """Teacher-forced forward: returns the LLaMA output (``.logits [B, S, V]`` fp32, or
        ``[B, K, V]`` at the ``logits_at [B, K]`` positions only)."""
        r_vid, r_llm = (None, None) if rng is None else tuple(jax.random.split(rng))
        emb = self.input_embeddings(batch, r_vid)
        return self.llama(inputs_embeds=emb, attention_mask=batch["attention_mask"], rng=r_llm,
                          return_hidden=return_hidden, logits_at=logits_at)
