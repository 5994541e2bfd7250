"""EVA-CLIP ViT-g/14, the frozen frame encoder of BLIP-2 / LAVIS / TimeChat / IVCR.

Follows reference-architecture.md §1 (LAVIS ``lavis/models/eva_vit.py``, ``create_eva_vit_g``;
HF ``Blip2VisionModel`` / ``InstructBlipVisionModel``): a 14×14 patch embedding with bias, a CLS
token, a learned absolute position table added after the CLS token is prepended, then ``depth``
pre-norm blocks ``x += attn(norm1(x)); x += mlp(norm2(x))`` with no final norm inside the ViT.

Attention keeps the reference's layout: one fused ``qkv`` kernel without bias plus separate
``q_bias`` and ``v_bias`` parameters; the key has no bias (LAVIS adds a constant zero).

The module also owns ``post_norm``: LAVIS's ``ln_vision`` (eps 1e-5, weights from the Q-Former
checkpoint) or HF's ``post_layernorm`` (eps = ``layer_norm_eps``, 1e-6). ``__call__`` returns the
hidden states before it by default (HF ``hidden_states[-1]``) and after it with
``apply_post_norm=True`` (HF ``last_hidden_state``, LAVIS ``ln_vision(visual_encoder(x))``).

The module knows nothing of checkpoint formats: HF and LAVIS weights are loaded by
``ivcr_jax.convert.eva_vit.from_hf`` / ``from_lavis``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax import sharding
from ivcr_jax.models.layers import Dense, LayerNorm, attention, make_param, normal_02

# HF Blip2VisionConfig / InstructBlipVisionConfig defaults (save_pretrained may omit them).
_HF_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                    num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu",
                    layer_norm_eps=1e-6, qkv_bias=True)


@dataclasses.dataclass(frozen=True)
class EvaViTConfig:
    """EVA ViT-g/14 as built by ``create_eva_vit_g`` (39 of the checkpoint's 40 blocks)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    heads: int = 16
    mlp_dim: int = 6144        # int(1408 * 4.3637)
    eps: float = 1e-6          # block LayerNorms
    post_eps: float = 1e-5     # ln_vision (torch default eps); HF post_layernorm uses 1e-6
    qkv_bias: bool = True      # q_bias / v_bias parameters (HF ``qkv_bias``)
    remat: bool = False        # rematerialise each block in the backward pass

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any] | Any, **overrides) -> "EvaViTConfig":
        """From a ``Blip2VisionConfig`` / ``InstructBlipVisionConfig`` dict (or a full
        ``Blip2Config`` / ``InstructBlipConfig`` dict with a nested ``vision_config``)."""
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        d = dict(d)
        if "vision_config" in d:
            d = dict(d["vision_config"] or {})
        g = {k: d.get(k, v) for k, v in _HF_DEFAULTS.items()}
        if g["hidden_act"] != "gelu":
            raise ValueError(f"EVA ViT supports hidden_act='gelu' (exact erf) only, got {g['hidden_act']!r}")
        if g["hidden_size"] % g["num_attention_heads"]:
            raise ValueError(f"hidden_size {g['hidden_size']} is not divisible by "
                             f"num_attention_heads {g['num_attention_heads']}")
        kw = dict(image_size=int(g["image_size"]), patch_size=int(g["patch_size"]),
                  width=int(g["hidden_size"]), depth=int(g["num_hidden_layers"]),
                  heads=int(g["num_attention_heads"]), mlp_dim=int(g["intermediate_size"]),
                  eps=float(g["layer_norm_eps"]),
                  # HF's post_layernorm is built with layer_norm_eps, not ln_vision's 1e-5.
                  post_eps=float(g["layer_norm_eps"]), qkv_bias=bool(g["qkv_bias"]))
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------- bicubic resize

def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights for offsets -1, 0, 1, 2 (torch ``upsample_bicubic2d``)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):   # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` matrix of torch ``F.interpolate(mode="bicubic", align_corners=False)`` along one
    axis, for an output size given explicitly (scale = in/out).

    ``jax.image.resize(method="cubic")`` uses the Keys kernel with a = -0.5 (and antialiasing when
    shrinking); torch uses a = -0.75 with edge-clamped taps, which is what the checkpoints saw.
    """
    scale = in_size / out_size
    src = scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5  # not clamped for cubic
    base = np.floor(src)
    w = _cubic_weights(src - base)                                         # [out, 4]
    idx = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.repeat(np.arange(out_size), 4), idx.reshape(-1)), w.reshape(-1))
    return m


def resize_pos_embed(pe, new_grid: int | tuple[int, int], num_extra_tokens: int = 1):
    """Bicubically resize a ``[1, extra + g*g, D]`` position table to ``new_grid`` (torch semantics).

    The extra (CLS) rows are kept. Works on numpy arrays (returns numpy, float32, as LAVIS's
    ``interpolate_pos_embed`` does) and on jax arrays (returns jax, in the input dtype).
    """
    nh, nw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    n = pe.shape[1] - num_extra_tokens
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"position table has {n} patch rows, not a square grid")
    is_np = isinstance(pe, np.ndarray)
    xp = np if is_np else jnp
    extra, grid = pe[:, :num_extra_tokens], pe[:, num_extra_tokens:]
    if (nh, nw) == (g, g):
        return pe
    mh = xp.asarray(bicubic_matrix(g, nh), dtype=xp.float32)
    mw = xp.asarray(bicubic_matrix(g, nw), dtype=xp.float32)
    grid = grid.astype(xp.float32).reshape(pe.shape[0], g, g, pe.shape[-1])
    grid = xp.einsum("ph,qw,bhwd->bpqd", mh, mw, grid).reshape(pe.shape[0], nh * nw, pe.shape[-1])
    out_dtype = np.float32 if is_np else pe.dtype
    return xp.concatenate([extra.astype(out_dtype), grid.astype(out_dtype)], axis=1)


# ----------------------------------------------------------------------------- modules

class PatchEmbed(nnx.Module):
    """Conv2d(3, D, p, stride p) with bias, as a reshape to patches and one contraction."""

    def __init__(self, patch: int, width: int, *, dtype, param_dtype, rngs):
        self.patch, self.dtype = patch, dtype
        self.kernel = make_param(rngs, normal_02, (patch, patch, 3, width), param_dtype,
                                 ("conv", "conv", "channels", "embed"))
        self.bias = make_param(rngs, nnx.initializers.zeros, (width,), param_dtype, ("embed",))

    def __call__(self, pixels: jax.Array) -> jax.Array:  # [B, H, W, 3] -> [B, gh*gw, D]
        b, h, w, c = pixels.shape
        p = self.patch
        gh, gw = h // p, w // p  # a strided conv drops the remainder rows/columns
        # Patches as rows [(b i j), (p q c)] — one transpose that keeps each patch row's (q, c) run
        # contiguous — then one matmul: 0.75x the time of the 6-d einsum at 28 px, 0.91x at 224 px
        # on CPU (XLA's own layout for the einsum moved single channels).
        x = pixels[:, : gh * p, : gw * p].astype(self.dtype).reshape(b, gh, p, gw, p * c)
        x = x.transpose(0, 1, 3, 2, 4).reshape(b * gh * gw, p * p * c)
        kernel = self.kernel[...].astype(self.dtype)
        y = jnp.dot(x, kernel.reshape(p * p * c, kernel.shape[-1])) + self.bias[...].astype(self.dtype)
        return y.reshape(b, gh * gw, -1)


class Attention(nnx.Module):
    def __init__(self, cfg: EvaViTConfig, *, dtype, param_dtype, rngs):
        d = cfg.width
        self.heads, self.head_dim, self.dtype = cfg.heads, cfg.head_dim, dtype
        self.qkv = Dense(d, 3 * d, names=("embed", "heads"), use_bias=False, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        if cfg.qkv_bias:
            self.q_bias = make_param(rngs, nnx.initializers.zeros, (d,), param_dtype, ("heads",))
            self.v_bias = make_param(rngs, nnx.initializers.zeros, (d,), param_dtype, ("heads",))
        else:
            self.q_bias = self.v_bias = None
        self.proj = Dense(d, d, names=("heads", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        qkv = self.qkv(x)
        if self.q_bias is not None:
            # bias = cat(q_bias, 0, v_bias): the key has no bias (LAVIS uses a constant zero).
            zeros = jnp.zeros_like(self.v_bias[...])
            qkv = qkv + jnp.concatenate([self.q_bias[...], zeros, self.v_bias[...]]).astype(self.dtype)
        q, k, v = jnp.split(qkv.reshape(b, t, 3, self.heads, self.head_dim), 3, axis=2)
        o = attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], scale=self.head_dim ** -0.5)
        return self.proj(o.reshape(b, t, d))


class Mlp(nnx.Module):
    def __init__(self, cfg: EvaViTConfig, *, dtype, param_dtype, rngs):
        self.fc1 = Dense(cfg.width, cfg.mlp_dim, names=("embed", "mlp"), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Dense(cfg.mlp_dim, cfg.width, names=("mlp", "embed"), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # nn.GELU(): exact erf


class Block(nnx.Module):
    def __init__(self, cfg: EvaViTConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(cfg.width, eps=cfg.eps, **kw)
        self.attn = Attention(cfg, **kw)
        self.norm2 = LayerNorm(cfg.width, eps=cfg.eps, **kw)
        self.mlp = Mlp(cfg, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return sharding.constrain(x, ("batch", "length", "embed"))


def _run_block(block: Block, x: jax.Array) -> jax.Array:
    return block(x)


class EvaViT(nnx.Module):
    """EVA ViT-g/14 plus its post norm (``ln_vision`` / ``post_layernorm``)."""

    def __init__(self, config: EvaViTConfig = EvaViTConfig(), *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        cfg = self.config = config
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width, **kw)
        self.cls_token = make_param(rngs, normal_02, (1, 1, cfg.width), param_dtype, (None, None, "embed"))
        self.pos_embed = make_param(rngs, normal_02, (1, 1 + cfg.num_patches, cfg.width), param_dtype,
                                    (None, "pos", "embed"))
        self.blocks = nnx.List([Block(cfg, **kw) for _ in range(cfg.depth)])
        self.post_norm = LayerNorm(cfg.width, eps=cfg.post_eps, **kw)

    def __call__(self, pixels: jax.Array, *, apply_post_norm: bool = False,
                 rng: jax.Array | None = None) -> jax.Array:
        """``pixels`` ``[B, H, W, 3]`` (CLIP-normalised) -> ``[B, 1 + N, D]``.

        Other image sizes than ``config.image_size`` use a bicubically resized position table
        (as HF's ``interpolate_pos_encoding=True``; LAVIS itself only accepts 224). ``rng`` is
        accepted for interface uniformity: the reference runs with drop_path 0 and no dropout.
        """
        del rng
        cfg = self.config
        x = self.patch_embed(pixels)                                       # [B, N, D]
        b = x.shape[0]
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1)
        pe = self.pos_embed[...]
        grid = (pixels.shape[1] // cfg.patch_size, pixels.shape[2] // cfg.patch_size)
        if grid != (cfg.grid, cfg.grid):
            pe = resize_pos_embed(pe, grid)
        x = x + pe.astype(self.dtype)
        x = sharding.constrain(x, ("batch", "length", "embed"))
        run = nnx.remat(_run_block) if cfg.remat else _run_block
        for block in self.blocks:
            x = run(block, x)
        if apply_post_norm:
            x = self.post_norm(x)
        return x
