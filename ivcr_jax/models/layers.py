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


def _attention_einsum(q, k, v, *, mask, is_causal, scale, block=None):
    """:func:`attention` as two batched matmuls per (batch, head), logits and softmax in fp32.

    Without grouped-query attention the einsums read q/k/v in their ``[B, T, H, D]`` layout and XLA
    places the transposes (the fastest of the layouts measured on CPU, forward and backward). With
    ``K < H`` query heads are grouped by their key/value head (``h = kv * G + g``, the HF
    ``repeat_kv`` and ``jax.nn.dot_product_attention`` order) in head-major layout, so k/v are not
    copied per group. Causal self-attention (``is_causal`` and ``T == S``) runs in query blocks of
    ``block`` rows (:func:`_causal_block`), each against the keys up to its last row only: the
    masked upper triangle is neither computed nor differentiated. Masked logits get the large
    negative number ``jax.nn`` uses, so a fully masked row softmaxes to uniform over all ``S`` keys,
    blocked or not; the causal-only mask is an additive fp32 bias instead, whose gradient needs no
    select (its rows are never empty, so the masked probabilities are exactly 0 either way).
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    if mask is not None:   # [B|1, 1|H, 1|T, S]: the query and batch axes may be broadcast
        mask = jnp.broadcast_to(mask, (B, mask.shape[1], T, S)).astype(bool)
        if G > 1:
            mask = (mask.reshape(B, 1, 1, T, S) if mask.shape[1] == 1 else mask.reshape(B, K, G, T, S))
    if q.dtype == jnp.float32:  # scale the [T, D] queries rather than the [T, S] logits
        q, post = q * jnp.asarray(scale, q.dtype), None
    else:
        post = scale
    if G == 1:
        logits_eq, out_eq, t_axis = "bthd,bshd->bhts", "bhts,bshd->bthd", 1

        def rows(x, t0, t1):   # [B, T, H, D] queries / [B, S, H, D] keys and values
            return x[:, t0:t1]
        keys = rows
    else:
        logits_eq, out_eq, t_axis = "bkgtd,bksd->bkgts", "bkgts,bksd->bkgtd", 3
        q = q.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)   # [B, K, G, T, D]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]

        def rows(x, t0, t1):
            return x[:, :, :, t0:t1]

        def keys(x, s0, s1):
            return x[:, :, s0:s1]
    if block is None:
        block = _causal_block(T)
    spans = ([(t0, min(t0 + block, T)) for t0 in range(0, T, block)]
             if is_causal and T == S and block < T else [(0, T)])
    outs = []
    for t0, t1 in spans:
        s1 = t1 if len(spans) > 1 else S   # the keys this block may see
        s = jnp.einsum(logits_eq, rows(q, t0, t1), keys(k, 0, s1), preferred_element_type=jnp.float32)
        if post is not None:
            s = s * jnp.float32(post)
        causal = jnp.arange(s1)[None, :] <= jnp.arange(t0, t1)[:, None] if is_causal else None
        keep = None if mask is None else mask[..., t0:t1, :s1]
        if keep is None:
            if causal is not None:  # rows are never empty: masked probabilities are exactly 0
                s = s + jnp.where(causal, 0.0, _MASKED).astype(jnp.float32)
        else:
            if causal is not None:
                keep = keep & causal
            s = jnp.where(keep, s, _MASKED)  # as jax.nn: no gradient into masked logits
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum(out_eq, p, keys(v, 0, s1))
        if keep is not None and s1 < S:  # a fully masked row: uniform over all S keys, as unblocked
            empty = ~keep.any(-1)                                     # [B, 1|H, t] / [B, ., ., t]
            mean_v = v.mean(axis=1 if G == 1 else 2, keepdims=True).astype(o.dtype)
            o = jnp.where((empty.transpose(0, 2, 1) if G == 1 else empty)[..., None], mean_v
                          if G == 1 else mean_v[:, :, None], o)
        outs.append(o)
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=t_axis)
    return out if G == 1 else out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def _causal_block(T: int) -> int:
    """Query rows per block of causal self-attention on CPU (:func:`_attention_einsum`): 128, or
    ``T / 8`` for long sequences (at most 8 blocks, so the unrolled graph stays small; a sequence
    of at most 128 tokens is one block).

    Against one unblocked pass, process CPU time on a 2-core CPU at ``[2, 256, 8 heads, 64]``:
    0.75 forward, 0.68 forward + backward with blocks of 64; in the d512/L4/B2/T256 LLaMA, blocks
    of 128 gave the same forward and a 5 % faster LoRA train step than blocks of 64, and half the
    extra graph (docs/benchmarks.md, "LLaMA against HF transformers + peft (CPU)").
    """
    return max(128, -(-T // 8))


# what jax.nn.dot_product_attention writes into masked logits (-0.7 * the fp32 maximum)
_MASKED = float(-0.7 * jnp.finfo(jnp.float32).max)


def split_rng(rng: jax.Array | None, n: int):
    """Split an optional key into ``n`` optional keys."""
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))
