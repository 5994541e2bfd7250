"""Weight converters for the EVA ViT-g/14 tower (``ivcr_jax.models.eva_vit``).

Two sources (reference-architecture.md §1 and §7):

* HF ``Blip2VisionModel`` / ``InstructBlipVisionModel`` ``save_pretrained`` directories (keys
  ``embeddings.*``, ``encoder.layers.i.*``, ``post_layernorm.*``), and full ``Blip2*`` /
  ``InstructBlip*`` model directories (the same keys under ``vision_model.``; the other towers'
  keys are ignored here). HF stores the fused qkv bias as ``cat(q_bias, 0, v_bias)``; it is split
  back, and a non-zero key segment is rejected because EVA has no key bias.
* LAVIS ``eva_vit_g.pth``: a raw state dict without prefix (``cls_token``, ``pos_embed``,
  ``patch_embed.proj.*``, ``blocks.N.*``) holding 40 blocks of which the first ``depth`` (39) are
  used, as ``create_eva_vit_g`` does with ``load_state_dict(strict=False)``. Full LAVIS/TimeChat
  model checkpoints with a ``visual_encoder.`` prefix are accepted too. ``ln_vision`` (the post
  norm) is not part of the ViT file: it comes from the InstructBLIP / TimeChat checkpoint.

``convert_*`` functions return a flat ``{our/param/path: np.ndarray}`` dict (already in the target
parameter dtype) so a combined converter can merge towers; ``from_*`` build the module and assign
it with :func:`ivcr_jax.models.params.load_flat`. Tensors are read and cast one at a time, so
host memory stays close to one copy of the converted weights. torch is needed only for
``.pth``/``.bin`` files.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax.convert import common
from ivcr_jax.models import params as params_lib
from ivcr_jax.convert.common import torch_conv, torch_linear
from ivcr_jax.models.params import CheckpointError, CheckpointMismatch
from ivcr_jax.models.eva_vit import EvaViT, EvaViTConfig, resize_pos_embed

Flat = dict[str, np.ndarray]
_Fn = Callable[[np.ndarray], dict[str, np.ndarray]]

HF_PREFIX = "vision_model."          # full Blip2* / InstructBlip* models
LAVIS_PREFIX = "visual_encoder."     # full LAVIS / TimeChat / IVCR model checkpoints
POST_NORM_PATHS = ("post_norm/scale", "post_norm/bias")


def _to(path: str, fn: Callable[[np.ndarray], np.ndarray] = np.asarray) -> _Fn:
    return lambda a: {path: fn(a)}


def _expected_paths(cfg: EvaViTConfig) -> list[str]:
    """Our parameter paths (must agree with ``EvaViT``; ``load_flat`` re-checks them)."""
    paths = ["patch_embed/kernel", "patch_embed/bias", "cls_token", "pos_embed"]
    for i in range(cfg.depth):
        b = f"blocks/{i}/"
        paths += [b + "norm1/scale", b + "norm1/bias", b + "norm2/scale", b + "norm2/bias",
                  b + "attn/qkv/kernel", b + "attn/proj/kernel", b + "attn/proj/bias",
                  b + "mlp/fc1/kernel", b + "mlp/fc1/bias", b + "mlp/fc2/kernel", b + "mlp/fc2/bias"]
        if cfg.qkv_bias:
            paths += [b + "attn/q_bias", b + "attn/v_bias"]
    return paths + list(POST_NORM_PATHS)


def _block_table(cfg: EvaViTConfig, names: Mapping[str, str]
                 ) -> dict[str, tuple[tuple[int, ...], str, Callable]]:
    """Per-block ``source suffix -> (source shape, our suffix, transform)``."""
    d, m = cfg.width, cfg.mlp_dim
    t = {
        names["norm1"] + ".weight": ((d,), "norm1/scale", np.asarray),
        names["norm1"] + ".bias": ((d,), "norm1/bias", np.asarray),
        names["norm2"] + ".weight": ((d,), "norm2/scale", np.asarray),
        names["norm2"] + ".bias": ((d,), "norm2/bias", np.asarray),
        names["qkv"] + ".weight": ((3 * d, d), "attn/qkv/kernel", torch_linear),
        names["proj"] + ".weight": ((d, d), "attn/proj/kernel", torch_linear),
        names["proj"] + ".bias": ((d,), "attn/proj/bias", np.asarray),
        "mlp.fc1.weight": ((m, d), "mlp/fc1/kernel", torch_linear),
        "mlp.fc1.bias": ((m,), "mlp/fc1/bias", np.asarray),
        "mlp.fc2.weight": ((d, m), "mlp/fc2/kernel", torch_linear),
        "mlp.fc2.bias": ((d,), "mlp/fc2/bias", np.asarray),
    }
    if cfg.qkv_bias:
        t[names["q_bias"]] = ((d,), "attn/q_bias", np.asarray)
        t[names["v_bias"]] = ((d,), "attn/v_bias", np.asarray)
    return t


class _Collector:
    """Accumulates converted tensors and the key problems of one source file."""

    def __init__(self, source: str, cfg: EvaViTConfig, dtype):
        self.source, self.cfg, self.dtype = source, cfg, np.dtype(dtype)
        self.flat: Flat = {}
        self.origin: dict[str, str] = {}
        self.unexpected: list[str] = []
        self.mismatched: list[tuple[str, tuple, tuple]] = []

    def put(self, key: str, arr: np.ndarray, shape: tuple[int, ...] | None, fn: _Fn) -> None:
        if shape is not None and tuple(arr.shape) != tuple(shape):
            self.mismatched.append((key, tuple(arr.shape), tuple(shape)))
            return
        for path, out in fn(common.check_weight(self.source, key, arr)).items():
            if path in self.flat:
                raise CheckpointError(f"{self.source}: {key} duplicates {self.origin[path]} "
                                      f"(both map to {path})")
            self.flat[path] = np.asarray(out).astype(self.dtype)  # cast now: memory ~1x weights
            self.origin[path] = key

    def finish(self, source_name: Mapping[str, str], allow_missing: Iterable[str] = ()) -> Flat:
        allow = set(allow_missing)
        missing = [source_name.get(p, p) for p in _expected_paths(self.cfg)
                   if p not in self.flat and p not in allow]
        shaped = {k for k, _, _ in self.mismatched}  # reported once, as mis-shaped
        missing = [k for k in dict.fromkeys(missing) if k not in shaped]  # q/v_bias share an HF key
        if missing or self.unexpected or self.mismatched:
            raise CheckpointMismatch(self.source, missing, self.unexpected, self.mismatched)
        return self.flat


# ----------------------------------------------------------------------------- HF

_HF_NAMES = dict(norm1="layer_norm1", norm2="layer_norm2", qkv="self_attn.qkv",
                 proj="self_attn.projection", q_bias="self_attn.q_bias", v_bias="self_attn.v_bias")


def _split_qkv_bias(source: str, key: str, d: int) -> _Fn:
    def fn(b: np.ndarray) -> dict[str, np.ndarray]:
        k = np.asarray(b[d:2 * d], dtype=np.float32)
        if np.any(k != 0):
            raise CheckpointError(
                f"{source}: {key} has a non-zero key segment (max |k bias| = {np.abs(k).max():.3g}); "
                "EVA ViT has no key bias (LAVIS uses cat(q_bias, 0, v_bias)), so it cannot be loaded")
        return {"attn/q_bias": b[:d], "attn/v_bias": b[2 * d:]}
    return fn


def convert_hf_tensors(tensors: Iterable[tuple[str, np.ndarray]], config: EvaViTConfig, *,
                       source: str, prefix: str = "", dtype=np.float32) -> Flat:
    """Convert HF vision-tower tensors (``Blip2VisionModel`` names) to our flat dict.

    With ``prefix`` (``"vision_model."`` for full models) keys outside it are ignored; keys inside
    it, or every key when ``prefix`` is empty, must all be known.
    """
    cfg, d = config, config.width
    p, n = cfg.patch_size, cfg.num_patches
    top = {
        "embeddings.class_embedding": ((1, 1, d), _to("cls_token")),
        "embeddings.position_embedding": ((1, 1 + n, d), _to("pos_embed")),
        "embeddings.patch_embedding.weight": ((d, 3, p, p), _to("patch_embed/kernel", torch_conv)),
        "embeddings.patch_embedding.bias": ((d,), _to("patch_embed/bias")),
        "post_layernorm.weight": ((d,), _to("post_norm/scale")),
        "post_layernorm.bias": ((d,), _to("post_norm/bias")),
    }
    block = _block_table(cfg, _HF_NAMES)
    col = _Collector(source, cfg, dtype)
    layer_re = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
    for name, arr in tensors:
        if not name.startswith(prefix):
            continue
        key = name[len(prefix):]
        if key in top:
            col.put(name, arr, *top[key])
            continue
        mt = layer_re.fullmatch(key)
        if mt and int(mt.group(1)) < cfg.depth:
            i, sub = int(mt.group(1)), mt.group(2)
            base = f"blocks/{i}/"
            if sub in block:
                shape, ours, fn = block[sub]
                col.put(name, arr, shape, lambda a: {base + ours: fn(a)})
                continue
            if sub == "self_attn.qkv.bias" and cfg.qkv_bias:
                split = _split_qkv_bias(source, name, d)
                col.put(name, arr, (3 * d,),
                        lambda a: {base + k: v for k, v in split(a).items()})
                continue
        col.unexpected.append(name)
    names = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed/kernel": "embeddings.patch_embedding.weight",
             "patch_embed/bias": "embeddings.patch_embedding.bias",
             "post_norm/scale": "post_layernorm.weight", "post_norm/bias": "post_layernorm.bias"}
    for i in range(cfg.depth):
        for sub, (_, ours, _) in block.items():
            names[f"blocks/{i}/{ours}"] = f"encoder.layers.{i}.{sub}"
        fused = f"encoder.layers.{i}.self_attn.qkv.bias"
        names[f"blocks/{i}/attn/q_bias"] = names[f"blocks/{i}/attn/v_bias"] = fused
    return col.finish({k: prefix + v for k, v in names.items()})


def hf_config(path: str | os.PathLike) -> tuple[EvaViTConfig, str]:
    """Our config and the key prefix of an HF vision-tower or full-model directory."""
    raw = common.read_hf_config(path)
    prefix = HF_PREFIX if "vision_config" in raw else ""
    return EvaViTConfig.from_hf_config(raw), prefix


def convert_hf(path: str | os.PathLike, *, dtype=np.float32,
               config: EvaViTConfig | None = None) -> tuple[Flat, EvaViTConfig]:
    """Convert an HF ``save_pretrained`` directory; returns ``(flat, config)``."""
    cfg, prefix = hf_config(path)
    cfg = config or cfg
    files = common.hf_weight_files(path)
    # Errors name the weight file, or the directory when the keys are spread over shards.
    def stream():
        for f in files:
            yield from common.read_any(f)
    source = str(files[0]) if len(files) == 1 else str(path)
    flat = convert_hf_tensors(stream(), cfg, source=source, prefix=prefix, dtype=dtype)
    return flat, cfg


# ----------------------------------------------------------------------------- LAVIS

_LAVIS_NAMES = dict(norm1="norm1", norm2="norm2", qkv="attn.qkv", proj="attn.proj",
                    q_bias="attn.q_bias", v_bias="attn.v_bias")


def _lavis_pos_embed(cfg: EvaViTConfig) -> _Fn:
    def fn(pe: np.ndarray) -> dict[str, np.ndarray]:
        if pe.shape[1] != 1 + cfg.num_patches:
            # LAVIS ``interpolate_pos_embed``: bicubic resize of a table made for another size.
            pe = resize_pos_embed(np.asarray(pe, np.float32), cfg.grid)
        return {"pos_embed": pe}
    return fn


def _pos_embed_ok(shape: tuple[int, ...], d: int) -> bool:
    if len(shape) != 3 or shape[0] != 1 or shape[2] != d or shape[1] < 2:
        return False
    return math.isqrt(shape[1] - 1) ** 2 == shape[1] - 1


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return common._torch_to_numpy(x)
    return np.asarray(x)


def _read_ln_vision(ln_vision, cfg: EvaViTConfig, col: _Collector,
                    source: str = "<ln_vision tensors>") -> None:
    d = cfg.width
    if isinstance(ln_vision, Mapping):
        items = {k.removeprefix("ln_vision."): v for k, v in ln_vision.items()}
        unexpected = [k for k in items if k not in ("weight", "bias")]
        if unexpected:
            raise CheckpointMismatch(source, unexpected=unexpected)
        got = {k: _as_numpy(v) for k, v in items.items()}
    else:
        source = str(ln_vision)
        got = {}
        for name, arr in common.read_any(ln_vision):
            if name in ("ln_vision.weight", "ln_vision.bias"):
                got[name.split(".")[-1]] = arr
    missing = [f"ln_vision.{k}" for k in ("weight", "bias") if k not in got]
    bad = [(f"ln_vision.{k}", tuple(v.shape), (d,)) for k, v in got.items() if tuple(v.shape) != (d,)]
    if missing or bad:
        raise CheckpointMismatch(source, missing=missing, mismatched=bad)
    col.put(f"ln_vision.weight ({source})", got["weight"], (d,), _to("post_norm/scale"))
    col.put(f"ln_vision.bias ({source})", got["bias"], (d,), _to("post_norm/bias"))


def convert_lavis(vit_path: str | os.PathLike, ln_vision: Any = None, *,
                  config: EvaViTConfig = EvaViTConfig(), dtype=np.float32,
                  allow_missing_post_norm: bool = False) -> Flat:
    """Convert LAVIS ``eva_vit_g.pth`` (+ ``ln_vision``) to our flat dict.

    ``ln_vision``: a checkpoint path holding ``ln_vision.weight``/``ln_vision.bias`` (the LAVIS
    InstructBLIP file, a TimeChat/IVCR checkpoint; ``{"model": sd}`` is unwrapped), or a mapping
    ``{"weight", "bias"}`` / ``{"ln_vision.weight", "ln_vision.bias"}`` of arrays or torch tensors.
    When ``None``, ``ln_vision.*`` keys of ``vit_path`` itself are used (full LAVIS checkpoints);
    a missing post norm is an error unless ``allow_missing_post_norm=True``, which puts an
    identity LayerNorm (scale 1, bias 0) in the returned dict.
    """
    cfg, d = config, config.width
    p = cfg.patch_size
    source = str(vit_path)
    col = _Collector(source, cfg, dtype)
    top = {
        "cls_token": ((1, 1, d), _to("cls_token")),
        "pos_embed": (None, _lavis_pos_embed(cfg)),
        "patch_embed.proj.weight": ((d, 3, p, p), _to("patch_embed/kernel", torch_conv)),
        "patch_embed.proj.bias": ((d,), _to("patch_embed/bias")),
    }
    block = _block_table(cfg, _LAVIS_NAMES)
    block_re = re.compile(r"blocks\.(\d+)\.(.+)")
    stray: list[str] = []        # unknown keys without the visual_encoder. prefix
    prefixed = False
    own_ln: dict[str, np.ndarray] = {}
    for name, arr in common.read_any(vit_path):
        if name.startswith(LAVIS_PREFIX):
            prefixed, key = True, name[len(LAVIS_PREFIX):]
        elif name in ("ln_vision.weight", "ln_vision.bias"):
            if ln_vision is None:
                own_ln[name.split(".")[-1]] = arr
            continue
        else:
            key = name
        if key in top:
            shape, fn = top[key]
            if key == "pos_embed" and not _pos_embed_ok(tuple(arr.shape), d):
                col.mismatched.append((name, tuple(arr.shape), (1, 1 + cfg.num_patches, d)))
                continue
            col.put(name, arr, shape, fn)
            continue
        mt = block_re.fullmatch(key)
        if mt and mt.group(2) in block:
            i, sub = int(mt.group(1)), mt.group(2)
            if i >= cfg.depth:
                continue  # eva_vit_g.pth stores 40 blocks; create_eva_vit_g builds 39 (strict=False)
            shape, ours, fn = block[sub]
            col.put(name, arr, shape, lambda a: {f"blocks/{i}/{ours}": fn(a)})
            continue
        (col.unexpected if name.startswith(LAVIS_PREFIX) else stray).append(name)
    if not prefixed:
        col.unexpected += stray  # a bare ViT state dict: every key must be known
    if ln_vision is not None:
        _read_ln_vision(ln_vision, cfg, col)
    elif own_ln:
        _read_ln_vision({f"ln_vision.{k}": v for k, v in own_ln.items()}, cfg, col, source)
    elif allow_missing_post_norm:
        # explicit identity LayerNorm (scale 1, bias 0), so the flat dict stays complete
        col.put("<identity ln_vision>", np.ones((d,), np.float32), (d,), _to("post_norm/scale"))
        col.put("<identity ln_vision>", np.zeros((d,), np.float32), (d,), _to("post_norm/bias"))
    else:
        raise CheckpointError(
            f"{source}: no ln_vision weights. The post norm (LAVIS ln_vision) is stored in the "
            "Q-Former checkpoint, not in eva_vit_g.pth: pass ln_vision=<InstructBLIP / TimeChat "
            "checkpoint with ln_vision.weight and ln_vision.bias>, or allow_missing_post_norm=True "
            "to keep an identity post norm")
    pre = LAVIS_PREFIX if prefixed else ""
    names = {"cls_token": pre + "cls_token", "pos_embed": pre + "pos_embed",
             "patch_embed/kernel": pre + "patch_embed.proj.weight",
             "patch_embed/bias": pre + "patch_embed.proj.bias",
             "post_norm/scale": "ln_vision.weight", "post_norm/bias": "ln_vision.bias"}
    for i in range(cfg.depth):
        for sub, (_, ours, _) in block.items():
            names[f"blocks/{i}/{ours}"] = f"{pre}blocks.{i}.{sub}"
    return col.finish(names)


# ----------------------------------------------------------------------------- loaders

def _empty_model(cfg: EvaViTConfig, dtype, param_dtype) -> EvaViT:
    """Build the module without running its random initialisers (zeros, overwritten next)."""
    model = nnx.eval_shape(lambda: EvaViT(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    for _, var in nnx.to_flat_state(nnx.state(model)):
        sds = var.get_value()
        var.set_value(jnp.zeros(sds.shape, sds.dtype))
    return model


def load(flat: Mapping[str, np.ndarray], config: EvaViTConfig, *, source: str = "<weights>",
         dtype=jnp.float32, param_dtype=jnp.float32, allow_missing=()) -> EvaViT:
    """Build an :class:`EvaViT` and assign a flat dict to it (strict, via ``load_flat``)."""
    model = _empty_model(config, dtype, param_dtype)
    return params_lib.load_flat(model, flat, source, allow_missing=allow_missing)


def from_hf(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
            config: EvaViTConfig | None = None) -> EvaViT:
    """Load an HF ``Blip2VisionModel`` / ``InstructBlipVisionModel`` (or full model) directory.

    ``config`` overrides the one read from ``config.json`` (e.g. to set ``remat``).
    """
    flat, cfg = convert_hf(path, dtype=param_dtype, config=config)
    return load(flat, cfg, source=str(path), dtype=dtype, param_dtype=param_dtype)


def from_lavis(vit_path: str | os.PathLike, ln_vision: Any = None, *,
               config: EvaViTConfig = EvaViTConfig(), dtype=jnp.float32, param_dtype=jnp.float32,
               allow_missing_post_norm: bool = False) -> EvaViT:
    """Load LAVIS ``eva_vit_g.pth`` plus ``ln_vision`` (see :func:`convert_lavis`)."""
    flat = convert_lavis(vit_path, ln_vision, config=config, dtype=param_dtype,
                         allow_missing_post_norm=allow_missing_post_norm)
    return load(flat, config, source=str(vit_path), dtype=dtype, param_dtype=param_dtype)
