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
              is_causal: bool = False, scale: float | None = None) -> jax.Array:
    """Multi-head attention ``[B, T, H, D]`` through ``jax.nn.dot_product_attention``.

    ``mask`` is a boolean ``[B, 1|H, T, S]`` (True = attend). On GPU with bf16 inputs XLA may
    pick the cuDNN flash kernel; elsewhere it is the reference XLA implementation.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale)


def split_rng(rng: jax.Array | None, n: int):
    """Split an optional key into ``n`` optional keys."""
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))
