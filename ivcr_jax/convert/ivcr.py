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
from ivcr_jax.convert.common import torch_linear
from ivcr_jax.convert.store import save_flat
from ivcr_jax.models import params as params_lib
from ivcr_jax.models.build import abstract_model
from ivcr_jax.models.interllava import InterLLaVAConfig
from ivcr_jax.models.params import CheckpointMismatch


def _prefixed(prefix: str, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": v for k, v in flat.items()}


def _proj_flat(other: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    out = {}
    for name, arr in other.items():
        if name == "llama_proj.weight":
            out["llama_proj/kernel"] = torch_linear(arr)
        elif name == "llama_proj.bias":
            out["llama_proj/bias"] = np.asarray(arr)
        else:
            raise CheckpointMismatch(source, unexpected=[name])
    return out


def convert_ivcr(cfg: InterLLaVAConfig, *, llama: str, eva_vit: str, instructblip: str, timechat: str,
                 videollama: str | None = None, model_dtypes: Mapping[str, Any] | None = None,
                 log=print) -> dict[str, np.ndarray]:
    """Build the flat ``{path: array}`` of a full InterLLaVA from the released files."""
    frozen = jnp.dtype(cfg.frozen_dtype)
    flat: dict[str, np.ndarray] = {}

    log(f"LLaMA base from {llama}")
    lflat, lcfg = llama_conv.convert_hf(llama, dtype=frozen)
    extra = cfg.llm.vocab_size - lcfg.vocab_size
    if extra < 0:
        raise ValueError(f"{llama}: vocabulary {lcfg.vocab_size} larger than the config's {cfg.llm.vocab_size}")
    flat.update(_prefixed("llama", llama_conv.extend_vocab(lflat, extra) if extra else lflat))
    del lflat

    log(f"EVA ViT-g from {eva_vit} (ln_vision from {instructblip})")
    flat.update(_prefixed("vit", eva_conv.convert_lavis(eva_vit, ln_vision=instructblip, config=cfg.vit, dtype=frozen)))

    log(f"image Q-Former from {instructblip}")
    ib = qf_conv.convert_lavis(common.read_any(instructblip), source=str(instructblip),
                               max_frame_pos=cfg.video_qformer.max_frame_pos)
    flat.update(_prefixed("qformer", ib.qformer))

    log(f"TimeChat weights over it from {timechat}")
    tc = qf_conv.convert_lavis(common.read_any(timechat), source=str(timechat),
                               max_frame_pos=cfg.video_qformer.max_frame_pos)
    flat.update(_prefixed("qformer", tc.qformer))
    flat.update(_prefixed("video_qformer", tc.video_qformer))
    flat.update(_proj_flat(tc.other.get("llama_proj", {}), str(timechat)))
    lora = llama_conv.lora_flat(tc.other.get("llm", {}).items(), prefix=llama_conv.TIMECHAT_PREFIX)
    flat.update(_prefixed("llama", lora))

    if videollama:
        log(f"video Q-Former from {videollama} (video_Qformer.* only)")
        vl = qf_conv.convert_lavis(((k, v) for k, v in common.read_any(videollama) if k.startswith("video_Qformer")),
                                   source=str(videollama))
        flat.update(_prefixed("video_qformer", vl.video_qformer))

    if model_dtypes:
        for k in list(flat):
            if k in model_dtypes:
                flat[k] = np.asarray(flat[k]).astype(model_dtypes[k])
    return flat


def save_ivcr(cfg: InterLLaVAConfig, out: str | Path, *, check: bool = True, **sources) -> Path:
    """Convert and write a checkpoint that ``convert.store.load_into`` (and training/eval) load directly."""
    targets = params_lib.flat_state(abstract_model(cfg))
    dtypes = {k: np.dtype(v.get_value().dtype) for k, v in targets.items()}
    flat = convert_ivcr(cfg, model_dtypes=dtypes, **sources)
    if check:
        params_lib.check_flat("+".join(str(v) for v in sources.values() if v), flat, targets)
    save_flat(out, flat, {"recipe": "ivcr", "sources": {k: str(v) for k, v in sources.items() if v},
                          "model": dataclasses.asdict(cfg)})
    return Path(out)
