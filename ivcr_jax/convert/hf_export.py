"""InterLLaVA parameters -> Hugging Face / peft / safetensors directories (the inverse of ``llama.py``).

``python -m ivcr_jax.convert export-hf`` writes, from a trained model (reference-architecture §6 key names)::

    DIR/llama/          LlamaForCausalLM directory, LoRA merged into the q/k/v/o (...) kernels:
                        config.json (LlamaConfig, the extended vocabulary), model.safetensors (or
                        model-0000i-of-0000n.safetensors + model.safetensors.index.json), tokenizer files
    DIR/llama_base/     the same without the adapters (the base training started from)
    DIR/lora_adapter/   peft adapter of the LoRA alone: adapter_config.json + adapter_model.safetensors,
                        for ``PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(DIR/llama_base), ...)``
    DIR/vision/         vision.safetensors: every parameter outside the LLaMA (EVA ViT, image Q-Former, video
                        Q-Former, llama_proj, query tokens, frame positions), in our layout, + README.md listing them

Key names and layouts come from ``convert/llama.py`` (``path_to_hf`` / ``hf_to_path``): torch
``Linear`` weights are our kernels transposed; q/k need no permutation, since our RoPE uses HF's
rotate-half layout, for which HF's q/k weights are already permuted (``models/llama.py``). peft keys
are ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_{A,B}.weight`` (A ``[r, in]``, B ``[out, r]``),
what ``llama.lora_flat`` reads back. The merge is ``W + A B * (alpha / r)`` in fp32, as
``models/lora.merge_lora`` and peft's ``merge_and_unload`` compute it.

Each tensor keeps its dtype (``dtype=None``) or is cast to ``dtype`` (e.g. float32); a merged kernel
has its base kernel's dtype. Tensors are fetched from the devices one at a time and written in
shards of at most ``max_shard_bytes``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
import safetensors.numpy

from ivcr_jax.convert.llama import EMBED_KEY, PEFT_PREFIX, hf_to_path, path_to_hf
from ivcr_jax.models.llama import LlamaConfig
from ivcr_jax.models.lora import LoRAConfig
from ivcr_jax.models.params import CheckpointError, flat_state

LLAMA = "llama/"        # our path prefix of the LLM inside InterLLaVA
SUBDIRS = ("llama", "llama_base", "lora_adapter", "vision")
DEFAULT_SHARD_BYTES = 5 * 2**30
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")

# Our top-level parameter groups outside the LLaMA -> what they are in the reference
# (``ivcr/models/ivcr.py``, LAVIS ``blip2.py``); the vision README cites these.
VISION_GROUPS = (
    ("vit/", "EVA ViT-g (LAVIS `visual_encoder.*`; `vit.post_norm` is `ln_vision`)"),
    ("qformer/query_tokens", "image Q-Former query tokens (`query_tokens`)"),
    ("qformer/", "image Q-Former (`Qformer.bert.*`)"),
    ("video_qformer/video_query_tokens", "video Q-Former query tokens (`video_query_tokens`)"),
    ("video_qformer/frame_position_embedding", "frame position table (`video_frame_position_embedding.weight`)"),
    ("video_qformer/", "video Q-Former (`video_Qformer.bert.*`)"),
    ("llama_proj/", "projection into the LLaMA embedding (`llama_proj`, a torch Linear)"),
)

_LORA_PATH = re.compile(r"layers/(\d+)/(self_attn|mlp)/(\w+_proj)/lora_(a|b)")


# ----------------------------------------------------------------------------- output directory

def check_export_out(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise unless ``out`` can take an export: absent or empty (or ``overwrite``), and writable.
    Checked before any weight is read."""
    d = Path(out).absolute()
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d}: exists and is not a directory; choose an empty output directory")
    if d.is_dir() and any(d.iterdir()) and not overwrite:
        raise FileExistsError(f"{d}: exists and is not empty; choose an empty output directory or pass --overwrite")
    parent = d
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{d}: cannot be created or written ({parent} is not a writable directory)")
    return d


# ----------------------------------------------------------------------------- safetensors

def _cast(arr: np.ndarray, dtype) -> np.ndarray:
    arr = np.asarray(arr)
    return np.ascontiguousarray(arr if dtype is None else arr.astype(dtype, copy=False))


def write_safetensors(items: Iterable[tuple[str, np.ndarray]], directory: str | os.PathLike, *,
                      stem: str = "model", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write ``(name, array)`` pairs as ``{stem}.safetensors``, or as HF shards
    ``{stem}-0000i-of-0000n.safetensors`` + ``{stem}.safetensors.index.json`` when they exceed
    ``max_shard_bytes``. Holds at most one shard in host memory. Returns the files written."""
    directory = Path(directory)
    meta = {"format": "pt", **(metadata or {})}   # transformers refuses safetensors without "format"
    shards: list[list[str]] = []
    weight_map: dict[str, int] = {}
    total, part, size = 0, {}, 0

    def flush():
        nonlocal part, size
        if part:
            safetensors.numpy.save_file(part, str(directory / f".shard{len(shards)}.safetensors"), metadata=meta)
            shards.append(list(part))
            part, size = {}, 0

    for name, arr in items:
        if name in weight_map or name in part:
            raise ValueError(f"tensor {name} written twice")
        if size and size + arr.nbytes > max_shard_bytes:
            flush()
        part[name] = arr
        size += arr.nbytes
        total += arr.nbytes
        weight_map[name] = len(shards)
    flush()
    if len(shards) <= 1:
        final = directory / f"{stem}.safetensors"
        if shards:
            (directory / ".shard0.safetensors").rename(final)
        else:
            safetensors.numpy.save_file({}, str(final), metadata=meta)
        return [final]
    n = len(shards)
    names = [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, fname in enumerate(names):
        (directory / f".shard{i}.safetensors").rename(directory / fname)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [directory / f for f in names] + [directory / f"{stem}.safetensors.index.json"]


# ----------------------------------------------------------------------------- LLaMA

def hf_llama_config(cfg: LlamaConfig, dtype_name: str):
    """The ``transformers.LlamaConfig`` of ``cfg`` (its vocabulary includes the added tokens);
    :meth:`LlamaConfig.from_hf_config` of its dict gives ``cfg`` back (checked)."""
    # Lazy: transformers takes a second to import and only the export needs its config class.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    rope = None if cfg.rope_scaling == 1.0 else {"rope_type": "linear", "factor": float(cfg.rope_scaling)}
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta,
        rope_scaling=rope, max_position_embeddings=cfg.max_positions, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        architectures=["LlamaForCausalLM"], dtype=dtype_name)
    back = LlamaConfig.from_hf_config(hf.to_dict(), remat=cfg.remat)
    if back != cfg:
        raise AssertionError(f"HF config round trip changed the LLaMA config: {back} != {cfg}")
    return hf


def iter_hf_llama_out(flat: Mapping[str, Any], lora: LoRAConfig | None, *, merge: bool,
                      dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """``(HF name, array)`` for every base parameter of our LLaMA flat dict (paths relative to the
    LLaMA, values arrays or Variables); with ``merge``, each adapted kernel is ``W + A B * scale``."""
    for path in flat:
        if path.endswith(("/lora_a", "/lora_b")):
            continue
        name = path_to_hf(path)
        hit = hf_to_path(name)
        if hit is None or hit[0] != path:
            raise CheckpointError(f"parameter {path} has no HF LLaMA name")
        w = _host(flat[path])
        owner = path.rpartition("/")[0]
        if merge and lora is not None and path.endswith("/kernel") and f"{owner}/lora_a" in flat:
            a, b = _host(flat[f"{owner}/lora_a"]), _host(flat[f"{owner}/lora_b"])
            delta = (a.astype(np.float32) @ b.astype(np.float32)) * np.float32(lora.scale)
            # rounded once, to the output dtype (the base kernel's unless ``dtype`` says otherwise)
            w = (w.astype(np.float32) + delta).astype(w.dtype if dtype is None else dtype)
        yield name, _cast(w.T if hit[1] else w, dtype)


def write_llama(flat: Mapping[str, Any], cfg: LlamaConfig, lora: LoRAConfig | None, out: str | os.PathLike, *,
                merge: bool, dtype=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """An HF ``LlamaForCausalLM`` directory (config.json + safetensors) from our LLaMA flat dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = np.dtype(dtype if dtype is not None else _value(flat[EMBED_KEY]).dtype).name
    hf_llama_config(cfg, dtype_name).to_json_file(str(out / "config.json"))
    write_safetensors(iter_hf_llama_out(flat, lora, merge=merge, dtype=dtype), out, stem="model",
                      max_shard_bytes=max_shard_bytes)
    return out


def peft_name(path: str) -> str:
    """``layers/3/self_attn/q_proj/lora_a`` -> ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``."""
    m = _LORA_PATH.fullmatch(path)
    if m is None:
        raise CheckpointError(f"parameter {path} is not a LoRA factor")
    i, group, mod, ab = m.groups()
    return f"{PEFT_PREFIX}model.layers.{i}.{group}.{mod}.lora_{ab.upper()}.weight"


def write_peft_adapter(flat: Mapping[str, Any], lora: LoRAConfig, out: str | os.PathLike, *, dtype=None,
                       base_model: str = "../llama_base") -> Path:
    """A peft LoRA adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``
    (A ``[r, in]``, B ``[out, r]``, our factors transposed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = [(peft_name(p), _cast(_host(v).T, dtype)) for p, v in flat.items() if p.endswith(("/lora_a", "/lora_b"))]
    if not items:
        raise CheckpointError("the model has no LoRA adapters to export")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(items, out, stem="adapter_model", max_shard_bytes=1 << 62)
    return out


# ----------------------------------------------------------------------------- vision side

def vision_group(path: str) -> str:
    for prefix, what in VISION_GROUPS:
        if path.startswith(prefix):
            return what
    return "other parameter outside the LLaMA"


def write_vision(flat: Mapping[str, Any], out: str | os.PathLike, *, dtype=None, source: str = "") -> Path:
    """``vision.safetensors`` (keys: our parameter paths, ``/`` -> ``.``) + ``README.md`` of its layout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, items = [], []
    for path, v in flat.items():
        arr = _cast(_host(v), dtype)
        key = path.replace("/", ".")
        items.append((key, arr))
        rows.append(f"| `{key}` | {tuple(arr.shape)} | {arr.dtype} | {vision_group(path)} |")
    write_safetensors(items, out, stem="vision", max_shard_bytes=1 << 62)
    groups = "\n".join(f"- `{p.replace('/', '.')}*`: {w}" for p, w in VISION_GROUPS)
    (out / "README.md").write_text(f"""# InterLLaVA vision side

Every parameter of the trained model outside the LLaMA, as one safetensors file
(`vision.safetensors`, {len(items)} tensors{f', exported from `{source}`' if source else ''}).
Keys are the `ivcr_jax` parameter paths with `/` written as `.` (`ivcr_jax.models.interllava.InterLLaVA`):
load them into that model with
`ivcr_jax.models.params.load_flat(model, {{k.replace('.', '/'): v}}, allow_missing=("llama/.*",))`.

Layout is ours, not torch's: a dense `kernel` is `[in, out]` (a torch `Linear.weight` transposed),
`vit.patch_embed.kernel` is `[kh, kw, in, out]` (torch `Conv2d.weight` is `[out, in, kh, kw]`),
a `scale` is a LayerNorm/RMSNorm weight, an `embedding` is `[rows, dim]`. The EVA ViT's `attn.qkv.kernel`
has no bias; its `attn.q_bias`/`attn.v_bias` are LAVIS's (k has none). The reference modules
(`ivcr/models/ivcr.py`, LAVIS `blip2.py`) by key prefix:

{groups}

| key | shape | dtype | reference module |
|---|---|---|---|
""" + "\n".join(rows) + "\n")
    return out


# ----------------------------------------------------------------------------- the whole model

def export_hf(model, out: str | os.PathLike, *, dtype=None, tokenizer_files: Sequence[Path] = (),
              save_tokenizer: Callable[[Path], Any] | None = None, source: str = "",
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, log: Callable[[str], None] = print) -> Path:
    """Write ``model`` (an :class:`~ivcr_jax.models.interllava.InterLLaVA`) under ``out`` as
    ``llama/`` (merged), ``llama_base/``, ``lora_adapter/`` (when the model has LoRA) and ``vision/``.

    The tokenizer goes into ``llama/`` and ``llama_base/``: ``tokenizer_files`` are copied, else
    ``save_tokenizer(directory)`` is called. Everything is written into ``out/.export_tmp`` first and
    moved into place at the end (replacing those four directories), so a failed export leaves no
    half-written model where a finished one is expected.
    """
    out = Path(out).absolute()
    llm, lora = model.llama.config, model.config.lora
    params = flat_state(model)
    llama_flat = {k[len(LLAMA):]: v for k, v in params.items() if k.startswith(LLAMA)}
    vision_flat = {k: v for k, v in params.items() if not k.startswith(LLAMA)}
    tmp = out / ".export_tmp"
    created = not out.exists()
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_all(tmp, llama_flat, vision_flat, llm, lora, dtype=dtype, tokenizer_files=tokenizer_files,
                   save_tokenizer=save_tokenizer, source=source, max_shard_bytes=max_shard_bytes, log=log)
    except BaseException:
        # nothing half-written stays behind (an --out this call created is removed again)
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    for d in SUBDIRS:
        if (out / d).exists():
            shutil.rmtree(out / d)
        if (tmp / d).exists():
            (tmp / d).rename(out / d)
    tmp.rmdir()
    return out


def _write_all(tmp: Path, llama_flat, vision_flat, llm: LlamaConfig, lora: LoRAConfig | None, *, dtype,
               tokenizer_files, save_tokenizer, source, max_shard_bytes, log) -> None:
    has_lora = lora is not None and any(k.endswith("/lora_a") for k in llama_flat)
    write_llama(llama_flat, llm, lora, tmp / "llama", merge=True, dtype=dtype, max_shard_bytes=max_shard_bytes)
    log(f"llama/: LlamaForCausalLM, {llm.layers} layers, vocabulary {llm.vocab_size}"
        + (", LoRA merged" if has_lora else ""))
    if has_lora:
        write_llama(llama_flat, llm, lora, tmp / "llama_base", merge=False, dtype=dtype,
                    max_shard_bytes=max_shard_bytes)
        write_peft_adapter(llama_flat, lora, tmp / "lora_adapter", dtype=dtype)
        log(f"llama_base/ + lora_adapter/: the base and the peft adapter (r {lora.rank}, alpha {lora.alpha:g}, "
            f"{', '.join(lora.targets)})")
    for d in ("llama", "llama_base"):
        if not (tmp / d).is_dir():
            continue
        if tokenizer_files:
            for f in tokenizer_files:
                shutil.copy2(f, tmp / d / Path(f).name)
        elif save_tokenizer is not None:
            save_tokenizer(tmp / d)
    write_vision(vision_flat, tmp / "vision", dtype=dtype, source=source)
    log(f"vision/: {len(vision_flat)} tensors (EVA ViT, Q-Formers, llama_proj), layout in vision/README.md")


def _value(v):
    return v.get_value() if hasattr(v, "get_value") else v


def _host(v) -> np.ndarray:
    """One parameter on the host (fetched from its devices now, not before it is written)."""
    return np.asarray(jax.device_get(_value(v)))
