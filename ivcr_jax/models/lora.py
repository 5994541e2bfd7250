"""LoRA adapters for the frozen LLaMA, with peft's math, init and key layout.

Follows reference-architecture §3 (LoRA row: r 32, alpha 32, dropout 0.1 on q/k/v/o) and
``peft/tuners/lora/layer.py``::

    y = x W (+ b) + dropout(x) A B * (alpha / r)      (computed as dropout(x) A (B * (alpha / r)))

``A`` is ``[in, r]`` (peft's ``lora_A.weight`` ``[r, in]`` transposed) and ``B`` is ``[r, out]``
(``lora_B.weight`` ``[out, r]`` transposed). Both are ``nnx.LoRAParam`` so the trainer can select
them with ``nnx.LoRAParam`` while the base ``kernel`` (an ``nnx.Param``) stays frozen; note that
``LoRAParam`` subclasses ``Param``, so ``wrt=nnx.Param`` would select the base *and* the adapters
(use :data:`BASE_PARAMS` for the base alone).

Init follows peft: ``A`` with torch ``kaiming_uniform_(a=sqrt(5))`` on the ``[r, in]`` layout
(uniform in ``±1/sqrt(in)``), ``B`` zeros, so a fresh adapter leaves the model unchanged.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ivcr_jax.models import layers

# Variable filters: the adapters, and the base parameters without the adapters.
LORA_PARAMS = nnx.LoRAParam
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Adapter hyper-parameters (TimeChat / IVCR defaults, reference-architecture §3)."""

    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_peft_config(cls, d: Mapping) -> "LoRAConfig":
        """From a peft ``adapter_config.json`` dict (``r``, ``lora_alpha``, ...); peft variants
        that change the math (rsLoRA, DoRA, per-module ranks, LoRA biases) are refused."""
        for flag in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "lora_bias"):
            if d.get(flag):
                raise NotImplementedError(f"peft option {flag}={d[flag]!r} is not supported")
        targets = d.get("target_modules") or cls.targets
        if isinstance(targets, str):  # peft also allows a regex; we only take plain names
            raise ValueError(f"regex target_modules {targets!r} is not supported; list the names")
        return cls(rank=int(d["r"]), alpha=float(d.get("lora_alpha", d["r"])),
                   dropout=float(d.get("lora_dropout", 0.0)), targets=tuple(sorted(targets)))


def kaiming_uniform_sqrt5(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """torch ``nn.init.kaiming_uniform_(w, a=sqrt(5))`` for a ``[r, in]`` weight, stored as ``[in, r]``.

    gain = sqrt(2 / (1 + a^2)) = sqrt(1/3); bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in),
    with fan_in = ``in`` = ``shape[0]`` in our layout.
    """
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, tuple(shape), jnp.float32, -bound, bound).astype(dtype)


class LoRADense(nnx.Module):
    """A :class:`layers.Dense` with a LoRA side path (kernel ``[in, out]``, same parameter path).

    ``names`` are the kernel's logical axes; ``lora_a`` gets ``(names[0], "lora")`` and ``lora_b``
    ``("lora", names[1])``. The adapters use ``lora_param_dtype`` (fp32 by default, even when the
    frozen base is bf16); the side path is computed in the compute ``dtype`` like the base path.
    """

    def __init__(self, in_features: int, out_features: int, *, names: Sequence[str | None],
                 rank: int, alpha: float, dropout: float = 0.0, use_bias: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, lora_param_dtype=jnp.float32,
                 kernel_init: layers.Initializer = layers.normal_02, rngs: nnx.Rngs | None = None):
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.dtype = dtype
        self.kernel = layers.make_param(rngs, kernel_init, (in_features, out_features), param_dtype, names)
        self.bias = (layers.make_param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, names[1:])
                     if use_bias else None)
        self.lora_a = layers.make_param(rngs, kaiming_uniform_sqrt5, (in_features, rank), lora_param_dtype,
                                        (names[0], "lora"), cls=nnx.LoRAParam)
        self.lora_b = layers.make_param(rngs, nnx.initializers.zeros, (rank, out_features), lora_param_dtype,
                                        ("lora", names[1]), cls=nnx.LoRAParam)
        self.dropout = layers.Dropout(dropout)
        self.merged = False  # set by merge_lora: the side path is folded into the kernel

    def __call__(self, x: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.merged:
            return y
        h = jnp.dot(self.dropout(x, rng), self.lora_a[...].astype(self.dtype))
        return y + jnp.dot(h, self.scaled_b())

    def scaled_b(self) -> jax.Array:
        """``B * (alpha / r)`` in the compute dtype: scaling the ``[r, out]`` factor instead of the
        ``[..., out]`` product saves an elementwise pass over the output, forward and backward."""
        return self.lora_b[...].astype(self.dtype) * jnp.asarray(self.scale, self.dtype)


def apply_shared_input(mods: Sequence[nnx.Module], x: jax.Array,
                       rngs: Sequence[jax.Array | None]) -> list[jax.Array]:
    """``[mod(x) for mod in mods]`` for projections that read the same ``x`` (q/k/v, gate/up).

    ``rngs`` are the modules' dropout keys (:class:`LoRADense` only). When every module is an
    unmerged :class:`LoRADense` of one compute dtype and no dropout applies (no key, or rate 0), the
    adapters' ``x A`` products run as one matmul against the concatenated ``A`` (``[in, sum r]``) —
    the same sums, a few tiny matmuls and transposes fewer in the forward and the backward. With
    dropout each adapter draws its own mask from its own key, as peft does, so they stay separate.
    """
    fusable = (len(mods) > 1 and all(isinstance(m, LoRADense) and not m.merged for m in mods)
               and len({m.dtype for m in mods}) == 1
               and all(r is None or m.dropout.rate == 0.0 for m, r in zip(mods, rngs)))
    if not fusable:
        return [m(x, rng=r) if isinstance(m, LoRADense) else m(x) for m, r in zip(mods, rngs)]
    dtype = mods[0].dtype
    x = x.astype(dtype)
    h = jnp.dot(x, jnp.concatenate([m.lora_a[...].astype(dtype) for m in mods], axis=1))
    outs, start = [], 0
    for m in mods:
        y = jnp.dot(x, m.kernel[...].astype(dtype))
        if m.bias is not None:
            y = y + m.bias[...].astype(dtype)
        hm = h[..., start:start + m.rank]
        start += m.rank
        outs.append(y + jnp.dot(hm, m.scaled_b()))
    return outs


def lora_modules(model: nnx.Module) -> Iterator[tuple[str, LoRADense]]:
    """``("a/b/c", module)`` for every :class:`LoRADense` inside ``model``."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRADense):
            yield "/".join(str(p) for p in path), node


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel, in place: W += A B * scale, then B = 0.

    Outputs are unchanged (up to the rounding of W's dtype). Merged layers skip the side path, so
    inference pays no extra matmul; merging twice is a no-op. Returns ``model``.
    """
    for _, mod in lora_modules(model):
        if mod.merged:
            continue
        w = mod.kernel[...]
        delta = jnp.dot(mod.lora_a[...].astype(jnp.float32), mod.lora_b[...].astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * mod.scale
        mod.kernel[...] = (w.astype(jnp.float32) + delta).astype(w.dtype)
        mod.lora_b[...] = jnp.zeros_like(mod.lora_b[...])
        mod.merged = True
    return model


def lora_state(model: nnx.Module) -> nnx.State:
    """The adapter parameters only (what a LoRA checkpoint stores)."""
    return nnx.state(model, nnx.LoRAParam)


def lora_param_count(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(lora_state(model)))
