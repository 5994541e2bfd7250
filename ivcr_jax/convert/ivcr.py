"""The IVCR initialisation recipe: the released PyTorch weights → one InterLLaVA checkpoint.

Follows ``ivcr/models/ivcr.py : from_config`` (reference-architecture §3 "init", §4, §7):

1. LLaMA-2-7B-chat from an HF directory; its vocabulary extended by the 5 IVCR tokens with
   deterministic (mean) rows, saved with the model (the reference draws them at random at
   every build and never saves them, §8.7).
2. EVA ViT-g from LAVIS ``eva_vit_g.pth`` (40 blocks stored, the first 39 used); ``ln_vision``
   from the InstructBLIP checkpoint.
3. The image Q-Former + query tokens from ``instruct_blip_vicuna7b_trimmed.pth``, then
   ``timechat_7b.pth`` loaded over everything (image Q-Former, video Q-Former, video queries,
   frame position table resized to ``max_frame_pos`` by nearest interpolation, ``llama_proj``,
   LoRA A/B).
4. From ``VL_LLaMA_2_7B_Finetuned.pth`` only the keys starting with ``video_Qformer`` (the 2-layer
   video Q-Former), as the reference does.

Tensors are read one at a time (memory maps / mmap'd torch files) and cast to the model's dtype
for that parameter at once (bf16 for the frozen towers), so peak host memory stays close to the
size of the converted weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from ivcr_jax.convert import common, eva_vit as eva_conv, llama as llama_conv, qformer as qf_conv
from ivcr_jax.convert.common import check_weight, torch_linear
from ivcr_jax.convert.store import check_out, save_flat
from ivcr_jax.models import params as params_lib
from ivcr_jax.models.build import abstract_model
from ivcr_jax.models.interllava import InterLLaVAConfig
from ivcr_jax.models.params import CheckpointError, CheckpointMismatch


def _prefixed(prefix: str, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": v for k, v in flat.items()}


def _proj_flat(other: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    out = {}
    for name, arr in other.items():
        if name not in ("llama_proj.weight", "llama_proj.bias"):
            raise CheckpointMismatch(source, unexpected=[name])
        arr = check_weight(source, name, np.asarray(arr))
        if name == "llama_proj.weight":
            if arr.ndim != 2:
                raise CheckpointMismatch(source, mismatched=[(name, tuple(arr.shape), "a 2-d Linear weight")])
            out["llama_proj/kernel"] = torch_linear(arr)
        else:
            out["llama_proj/bias"] = arr
    return out


def _check_shapes(source: str, flat: Mapping[str, np.ndarray], shapes: Mapping[str, tuple] | None,
                  names: Mapping[str, str] | None = None) -> None:
    """Mis-shaped tensors of one file, named by the file's own keys and in its layout where
    ``names`` knows the key (before the next file is read). Missing and unexpected keys are left to
    the final check of the whole model."""
    if shapes is None:
        return
    names = names or {}
    bad = []
    for k, v in flat.items():
        if k in shapes and tuple(v.shape) != tuple(shapes[k]):
            got, want = tuple(v.shape), tuple(shapes[k])
            if k in names and k.endswith("/kernel"):  # a torch Linear weight: [out, in]
                got, want = got[::-1], want[::-1]
            bad.append((names.get(k, k), got, want))
    if bad:
        raise CheckpointMismatch(source, mismatched=bad)


def _owner(path: str, sources: Mapping[str, str | None]) -> str:
    """The file expected to supply a parameter (for naming it when the key is missing)."""
    if path.startswith("llama/") and path.endswith(("lora_a", "lora_b")) or path.startswith("llama_proj/"):
        return sources["timechat"]
    if path.startswith("llama/"):
        return sources["llama"]
    if path.startswith("vit/post_norm/"):
        return sources["instructblip"]
    if path.startswith("vit/"):
        return sources["eva_vit"]
    if path.startswith("qformer/"):
        return f"{sources['instructblip']} or {sources['timechat']}"
    if path.startswith("video_qformer/bert/") and sources.get("videollama"):
        return f"{sources['timechat']} or {sources['videollama']}"
    return sources["timechat"]


def convert_ivcr(cfg: InterLLaVAConfig, *, llama: str, eva_vit: str, instructblip: str, timechat: str,
                 videollama: str | None = None, model_dtypes: Mapping[str, Any] | None = None,
                 model_shapes: Mapping[str, tuple] | None = None, log=print) -> dict[str, np.ndarray]:
    """Build the flat ``{path: array}`` of a full InterLLaVA from the released files.

    With ``model_shapes`` (``{path: shape}`` of the model) each file's mis-shaped tensors are
    reported as soon as that file is read, by the file's name and its own tensor names.
    """
    frozen = jnp.dtype(cfg.frozen_dtype)
    flat: dict[str, np.ndarray] = {}

    log(f"LLaMA base from {llama}")
    lflat, lcfg = llama_conv.convert_hf(llama, dtype=frozen)
    extra = cfg.llm.vocab_size - lcfg.vocab_size
    if extra < 0:
        raise CheckpointError(f"{llama}: vocabulary {lcfg.vocab_size} larger than the config's "
                              f"{cfg.llm.vocab_size}")
    lflat = _prefixed("llama", llama_conv.extend_vocab(lflat, extra) if extra else lflat)
    _check_shapes(str(llama), lflat, model_shapes,
                  {k: llama_conv.path_to_hf(k.removeprefix("llama/")) for k in lflat})
    flat.update(lflat)
    del lflat

    log(f"EVA ViT-g from {eva_vit} (ln_vision from {instructblip})")
    vflat = _prefixed("vit", eva_conv.convert_lavis(eva_vit, ln_vision=instructblip, config=cfg.vit, dtype=frozen))
    _check_shapes(str(eva_vit), vflat, model_shapes)
    flat.update(vflat)
    del vflat

    log(f"image Q-Former from {instructblip}")
    ib = qf_conv.convert_lavis(common.read_any(instructblip), source=str(instructblip),
                               max_frame_pos=cfg.video_qformer.max_frame_pos)
    _check_shapes(str(instructblip), _prefixed("qformer", ib.qformer), model_shapes, ib.names)
    flat.update(_prefixed("qformer", ib.qformer))

    log(f"TimeChat weights over it from {timechat}")
    tc = qf_conv.convert_lavis(common.read_any(timechat), source=str(timechat),
                               max_frame_pos=cfg.video_qformer.max_frame_pos)
    lora = llama_conv.lora_flat(tc.other.get("llm", {}).items(), prefix=llama_conv.TIMECHAT_PREFIX,
                                source=str(timechat))
    tflat = {**_prefixed("qformer", tc.qformer), **_prefixed("video_qformer", tc.video_qformer),
             **_proj_flat(tc.other.get("llama_proj", {}), str(timechat)), **_prefixed("llama", lora)}
    _check_shapes(str(timechat), tflat, model_shapes,
                  {**tc.names, "llama_proj/kernel": "llama_proj.weight", "llama_proj/bias": "llama_proj.bias"})
    flat.update(tflat)
    del tflat

    if videollama:
        log(f"video Q-Former from {videollama} (video_Qformer.* only)")
        vl = qf_conv.convert_lavis(((k, v) for k, v in common.read_any(videollama) if k.startswith("video_Qformer")),
                                   source=str(videollama))
        _check_shapes(str(videollama), _prefixed("video_qformer", vl.video_qformer), model_shapes, vl.names)
        flat.update(_prefixed("video_qformer", vl.video_qformer))

    if model_dtypes:
        for k in list(flat):
            if k in model_dtypes:
                flat[k] = np.asarray(flat[k]).astype(model_dtypes[k])
    return flat


def save_ivcr(cfg: InterLLaVAConfig, out: str | Path, *, check: bool = True, **sources) -> Path:
    """Convert and write a checkpoint that ``convert.store.load_into`` (and training/eval) load directly."""
    check_out(out)  # before any file is read (save_flat checks again, at writing time)
    targets = params_lib.flat_state(abstract_model(cfg))
    dtypes = {k: np.dtype(v.get_value().dtype) for k, v in targets.items()}
    shapes = {k: tuple(v.get_value().shape) for k, v in targets.items()}
    flat = convert_ivcr(cfg, model_dtypes=dtypes, model_shapes=shapes, **sources)
    if check:
        missing = [k for k in targets if k not in flat]
        if missing:  # named by the file expected to hold them
            files = {k: str(v) for k, v in sources.items() if v}
            first = _owner(missing[0], files)
            raise CheckpointMismatch(first, missing=[k for k in missing if _owner(k, files) == first])
        params_lib.check_flat("+".join(str(v) for v in sources.values() if v), flat, targets)
    save_flat(out, flat, {"recipe": "ivcr", "sources": {k: str(v) for k, v in sources.items() if v},
                          "model": dataclasses.asdict(cfg)})
    return Path(out)
