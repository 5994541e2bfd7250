"""Weights of BLIP-2's image-text-contrastive towers (``ivcr_jax.models.blip2_itc.Blip2ITC``).

Sources (stack-notes.md §8; reference-architecture.md §1–§2 for the tower key maps):

* HF ``Blip2ForImageTextRetrieval`` ``save_pretrained`` directories (``Salesforce/blip2-itm-vit-g``):
  ``vision_model.*`` -> ``vision/`` (EVA converter), ``qformer.*`` + ``query_tokens`` + the
  top-level text ``embeddings.*`` -> ``qformer/`` (Q-Former converter), ``vision_projection.*`` /
  ``text_projection.*`` -> the projections. ``itm_head.*`` (image-text matching) is not used by the
  ITC features and is dropped on purpose.
* LAVIS BLIP-2 stage-1 checkpoints (``blip2_pretrained.pth``, ``Blip2Qformer``): ``visual_encoder.*``
  + ``ln_vision.*`` -> ``vision/``, ``Qformer.bert.*`` + ``query_tokens`` -> ``qformer/``,
  ``vision_proj.*`` / ``text_proj.*`` -> the projections; ``itm_head.*``, ``temp`` and
  ``Qformer.cls.*`` (the ITG head) are dropped. LAVIS's ``ln_vision`` has eps 1e-5 while HF's
  ``post_layernorm`` uses the vision ``layer_norm_eps``; the config carries whichever applies.
"""
from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax.convert import eva_vit as eva_convert
from ivcr_jax.convert.common import read_hf_config, read_hf_dir, read_torch, torch_linear
from ivcr_jax.convert.qformer import convert_hf_qformer, convert_lavis, empty_model
from ivcr_jax.models.blip2_itc import Blip2ITC, Blip2ITCConfig
from ivcr_jax.models.eva_vit import EvaViTConfig
from ivcr_jax.models.params import CheckpointError, CheckpointMismatch, load_flat
from ivcr_jax.models.qformer import QFormerConfig

Flat = dict[str, np.ndarray]

_HF_PROJ = {"vision_projection": "vision_projection", "text_projection": "text_projection"}
_LAVIS_PROJ = {"vision_proj": "vision_projection", "text_proj": "text_projection"}
HF_DROPPED = (r"itm_head\..*",)
LAVIS_DROPPED = (r"itm_head\..*", r"temp")


def _projections(keys: dict[str, np.ndarray], table: dict[str, str], source: str) -> Flat:
    flat, unknown = {}, []
    for name, arr in keys.items():
        m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
        if m and m.group(1) in table:
            ours = table[m.group(1)]
            flat[f"{ours}/{'kernel' if m.group(2) == 'weight' else 'bias'}"] = (
                torch_linear(arr) if m.group(2) == "weight" else np.asarray(arr))
        elif not any(re.fullmatch(p, name) for p in HF_DROPPED + LAVIS_DROPPED):
            unknown.append(name)
    if unknown:
        raise CheckpointMismatch(source, unexpected=unknown)
    return flat


def convert_hf(path: str | os.PathLike) -> tuple[Flat, Blip2ITCConfig]:
    """Flat ``{vision/..., qformer/..., *_projection/...}`` dict and config of an HF directory."""
    cfg_dict = read_hf_config(path)
    arch = cfg_dict.get("architectures") or []
    if "qformer_config" not in cfg_dict or "vision_config" not in cfg_dict:
        raise CheckpointError(f"{path}: not a BLIP-2 directory (config.json lacks vision_config/qformer_config)")
    if arch and "Blip2ForImageTextRetrieval" not in arch:
        raise CheckpointError(f"{path}: architectures={arch}; the ITC features need a "
                              "Blip2ForImageTextRetrieval checkpoint (e.g. Salesforce/blip2-itm-vit-g)")
    config = Blip2ITCConfig.from_hf_config(cfg_dict)
    vit_flat, _ = eva_convert.convert_hf(path, config=config.vision)
    parts = convert_hf_qformer(read_hf_dir(path), prefix="qformer.", source=str(path))
    proj = _projections(parts.other.get("retrieval", {}), _HF_PROJ, str(path))
    flat = {f"vision/{k}": v for k, v in vit_flat.items()}
    flat.update({f"qformer/{k}": v for k, v in parts.qformer.items()})
    flat.update(proj)
    return flat, config


def convert_lavis_stage1(path: str | os.PathLike, config: Blip2ITCConfig | None = None
                         ) -> tuple[Flat, Blip2ITCConfig]:
    """Flat dict of a LAVIS ``Blip2Qformer`` checkpoint (``{"model": sd}`` or a bare state dict).

    ``config`` defaults to BLIP-2 stage 1: EVA ViT-g (39 blocks, ``ln_vision`` eps 1e-5), BERT-base
    Q-Former with 32 queries and its text branch (vocab 30523 = BERT + ``[DEC]``), 256-d ITC space.
    """
    config = config or Blip2ITCConfig(EvaViTConfig(), QFormerConfig(vocab_size=30523), 256)
    source = str(path)
    vit_flat = eva_convert.convert_lavis(path, None, config=config.vision)
    proj_keys: dict[str, np.ndarray] = {}

    def rest():
        for name, arr in read_torch(path):
            if name.split(".")[0] in _LAVIS_PROJ or any(re.fullmatch(p, name) for p in LAVIS_DROPPED):
                proj_keys[name] = arr
            else:
                yield name, arr

    parts = convert_lavis(rest(), source=source, image_text=True)
    other = {t: ks for t, ks in parts.other.items() if t != "vision"}
    if other:
        raise CheckpointMismatch(source, unexpected=sorted(k for ks in other.values() for k in ks))
    if parts.video_qformer:
        raise CheckpointError(f"{source}: holds a video Q-Former; expected a BLIP-2 stage-1 checkpoint")
    flat = {f"vision/{k}": v for k, v in vit_flat.items()}
    flat.update({f"qformer/{k}": v for k, v in parts.qformer.items()})
    flat.update(_projections(proj_keys, _LAVIS_PROJ, source))
    return flat, config


def _build(flat: Flat, config: Blip2ITCConfig, source: str, dtype, param_dtype) -> Blip2ITC:
    model = empty_model(lambda: Blip2ITC(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    return load_flat(model, flat, source=source)


def load_hf(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32) -> Blip2ITC:
    """:class:`Blip2ITC` from an HF ``Blip2ForImageTextRetrieval`` directory."""
    flat, config = convert_hf(path)
    return _build(flat, config, str(path), dtype, param_dtype)


def load_lavis_stage1(path: str | os.PathLike, config: Blip2ITCConfig | None = None, *,
                      dtype=jnp.float32, param_dtype=jnp.float32) -> Blip2ITC:
    """:class:`Blip2ITC` from a LAVIS BLIP-2 stage-1 ``.pth``."""
    flat, config = convert_lavis_stage1(path, config)
    return _build(flat, config, str(path), dtype, param_dtype)
