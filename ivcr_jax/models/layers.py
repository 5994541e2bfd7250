"""Small building blocks shared by every tower: dense, norms, embeddings, attention.

Each parameter is an ``nnx.Param`` created with logical axis names (see ``ivcr_jax/sharding.py``)
and a parameter dtype chosen by the caller (frozen towers bf16, trainable parts fp32). Compute
runs in ``dtype``; norms and softmax always run in fp32, as the PyTorch reference does.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]
normal_02 = nnx.initializers.normal(0.02)


def make_param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int], dtype,
               names: Sequence[str | None], cls=nnx.Param) -> nnx.Param:
    """Create a parameter with logical axis names; ``rngs=None`` means deterministic init."""
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return cls(init(key, tuple(shape), dtype), logical_axes=tuple(names))


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel ``[in, out]`` (a torch ``Linear.weight`` transposed)."""

    def __init__(self, in_features: int, out_features: int, *, names: Sequence[str | None],
                 use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_init: Initializer = normal_02, rngs: nnx.Rngs | None = None):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = make_param(rngs, kernel_init, (in_features, out_features), param_dtype, names)
        self.bias = (make_param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, names[1:])
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in fp32, returned in ``dtype``."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32,
                 names: Sequence[str | None] = ("norm",), rngs: nnx.Rngs | None = None):
        self.eps, self.dtype = eps, dtype
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), param_dtype, names)
        self.bias = make_param(rngs, nnx.initializers.zeros, (dim,), param_dtype, names)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: normalise in fp32, cast back, then scale (HF ``LlamaRMSNorm`` order)."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.eps, self.dtype = eps, dtype
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


class Embed(nnx.Module):
    """Lookup table ``[num, dim]``."""

    def __init__(self, num: int, dim: int, *, names: Sequence[str | None] = ("vocab", "embed"),
                 dtype=jnp.float32, param_dtype=jnp.float32, init: Initializer = normal_02,
                 rngs: nnx.Rngs | None = None):
        self.num, self.dim, self.dtype = num, dim, dtype
        self.embedding = make_param(rngs, init, (num, dim), param_dtype, names)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class Dropout(nnx.Module):
    """Dropout that takes its key explicitly (``rng=None`` means deterministic / eval)."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        if rng is None or self.rate == 0.0:
            return x
        keep = jax.random.bernoulli(rng, 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              is_causal: bool = False, scale: float | None = None,
              implementation: str | None = None) -> jax.Array:
    """Multi-head attention ``[B, T, H, D]`` (keys/values ``[B, S, K, D]``, ``K`` divides ``H``).

    ``mask`` is a boolean ``[B, 1|H, T, S]`` (True = attend); ``is_causal`` adds the lower-triangular
    ``[T, S]`` mask. Both implementations compute the logits and the softmax in fp32 and give the
    same values (up to rounding):

    * ``"xla"``: ``jax.nn.dot_product_attention`` — on GPU with bf16 inputs XLA may pick the cuDNN
      flash kernel; the default everywhere but on CPU;
    * ``"einsum"``: :func:`_attention_einsum`, the default on CPU, where the reference XLA path of
      ``jax.nn.dot_product_attention`` is several times slower than its FLOPs (a vmapped 5-d
      formulation whose backward is dominated by transposes and masked selects).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if implementation is None:
        implementation = "einsum" if jax.default_backend() == "cpu" else "xla"
    if implementation == "einsum":
        return _attention_einsum(q, k, v, mask=mask, is_causal=is_causal, scale=scale)
    if implementation != "xla":
        raise ValueError(f"attention implementation must be 'xla' or 'einsum', got {implementation!r}")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale)


def _attention_einsum(q, k, v, *, mask, is_causal, scale):
    """:func:`attention` as two batched matmuls per (batch, head), logits and softmax in fp32.

    Without grouped-query attention the einsums read q/k/v in their ``[B, T, H, D]`` layout and XLA
    places the transposes (the fastest of the layouts measured on CPU, forward and backward). With
    ``K < H`` query heads are grouped by their key/value head (``h = kv * G + g``, the HF
    ``repeat_kv`` and ``jax.nn.dot_product_attention`` order) in head-major layout, so k/v are not
    copied per group. Masked logits get the large negative number ``jax.nn`` uses (a fully masked
    row softmaxes to uniform); the causal-only mask is an additive fp32 bias instead, whose gradient
    needs no select (its rows are never empty, so the masked probabilities are exactly 0 either way).
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    if mask is not None:   # [B|1, 1|H, 1|T, S]: the query and batch axes may be broadcast
        mask = jnp.broadcast_to(mask, (B, mask.shape[1], T, S))
    if q.dtype == jnp.float32:  # scale the [T, D] queries rather than the [T, S] logits
        q, post = q * jnp.asarray(scale, q.dtype), None
    else:
        post = scale
    if G == 1:
        s = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)  # [B, H, T, S]
        mask_shape = None if mask is None else (mask.shape[0], -1, T, S)
    else:
        qh = q.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)   # [B, K, G, T, D]
        kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
        s = jnp.einsum("bkgtd,bksd->bkgts", qh, kh, preferred_element_type=jnp.float32)
        mask_shape = None if mask is None else ((mask.shape[0], 1, 1, T, S) if mask.shape[1] == 1
                                                else (mask.shape[0], K, G, T, S))
    if post is not None:
        s = s * jnp.float32(post)
    causal = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] if is_causal else None  # [T, S]
    if mask is None:
        if causal is not None:  # rows are never empty: masked probabilities are exactly 0
            s = s + jnp.where(causal, 0.0, _MASKED).astype(jnp.float32)
    else:
        keep = mask.astype(bool).reshape(mask_shape)
        if causal is not None:
            keep = keep & causal
        s = jnp.where(keep, s, _MASKED)  # as jax.nn: no gradient into masked logits, even in empty rows
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    if G == 1:
        return jnp.einsum("bhts,bshd->bthd", p, v)
    out = jnp.einsum("bkgts,bksd->bkgtd", p, vh)               # [B, K, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


# what jax.nn.dot_product_attention writes into masked logits (-0.7 * the fp32 maximum)
_MASKED = float(-0.7 * jnp.finfo(jnp.float32).max)


def split_rng(rng: jax.Array | None, n: int):
    """Split an optional key into ``n`` optional keys."""
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))
