"""LLaMA-2 decoder (HF ``LlamaForCausalLM`` semantics) with optional LoRA and a functional KV cache.

Follows reference-architecture §6 (LLaMA-2-7B config and HF layout) and §3 (LoRA on q/k/v/o):

* RMSNorm in HF order (normalise in fp32, cast, scale), rotate-half RoPE in the HF layout (the
  split-halves convention HF q/k weights are permuted for), SwiGLU MLP, untied ``lm_head``;
* attention through ``layers.attention`` (``jax.nn.dot_product_attention``), causal plus a padding
  mask, grouped-query attention when ``kv_heads < heads``;
* positions default to ``cumsum(attention_mask) - 1`` so left-padded prompts see the same positions
  as unpadded ones (what HF ``generate`` does);
* decoding uses :class:`KVCache`, an explicit pytree of static shape written with
  ``lax.dynamic_update_slice`` — jit-friendly, no Python-side state.

Parameter paths mirror the HF names (``layers/3/self_attn/q_proj/kernel``), which keeps the
converter (``ivcr_jax/convert/llama.py``) and trainable-parameter regexes simple. The module knows
nothing of checkpoint formats: HF directories are loaded by ``ivcr_jax.convert.llama.from_hf``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from ivcr_jax import sharding
from ivcr_jax.models import layers
from ivcr_jax.models.lora import LoRAConfig, LoRADense, apply_shared_input

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    # keep the weight matmul outputs (no batch dims), recompute attention scores and elementwise ops
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """LLaMA-2 hyper-parameters; defaults are LLaMA-2-7B (reference-architecture §6)."""

    vocab_size: int = 32000
    hidden: int = 4096
    intermediate: int = 11008
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    head_dim: int | None = None  # None: hidden // heads
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # HF "linear" RoPE scaling factor (positions / factor); 1 = none
    max_positions: int = 4096
    tie_embeddings: bool = False
    remat: str = "none"  # "none" | "full" | "dots": rematerialise each block in training

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.remat not in ("none", *_REMAT_POLICIES):
            raise ValueError(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}")
        if self.head_dim is None:
            if self.hidden % self.heads:
                raise ValueError(f"hidden ({self.hidden}) is not divisible by heads ({self.heads})")
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any], **overrides) -> "LlamaConfig":
        """From an HF ``LlamaConfig`` dict (transformers 4.x ``rope_theta``/``rope_scaling`` or 5.x
        ``rope_parameters``). Features the model does not implement raise ``NotImplementedError``."""
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {d['hidden_act']!r} (only silu)")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise NotImplementedError("attention_bias / mlp_bias are not supported")
        rope = dict(d.get("rope_parameters") or {})
        rope.update(d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        if rope_type == "default":
            factor = 1.0
        elif rope_type == "linear":
            factor = float(rope["factor"])
        else:
            raise NotImplementedError(f"RoPE type {rope_type!r} (only default and linear)")
        heads = int(d["num_attention_heads"])
        kw = dict(
            vocab_size=int(d["vocab_size"]), hidden=int(d["hidden_size"]),
            intermediate=int(d["intermediate_size"]), layers=int(d["num_hidden_layers"]),
            heads=heads, kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=d.get("head_dim"), rms_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta), rope_scaling=factor,
            max_positions=int(d.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)))
        kw.update(overrides)
        return cls(**kw)


@flax.struct.dataclass
class KVCache:
    """Decoding cache, a pytree of static shape.

    ``k``/``v`` ``[L, B, max_len, kv_heads, head_dim]``; ``valid`` ``[B, max_len]`` marks slots that
    hold a real (non-padding) token; ``index`` (int32 scalar) is the next slot to write. All rows
    advance together, so a left-padded batch stays aligned; a row's next RoPE position is the
    number of its valid slots.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    # logical axis names of k/v, for placing the cache on a mesh (layer axis replicated)
    logical_axes = (None, "batch", "length", "kv_heads", "head_dim")

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


class LlamaOutput(NamedTuple):
    """What :meth:`Llama.__call__` returns (a pytree, so it can leave ``jax.jit``).

    ``logits`` ``[B, S, V]`` fp32; ``hidden`` ``[B, S, D]`` the final-norm output (the ``lm_head``
    input) or None; ``cache`` the updated :class:`KVCache` or None.
    """

    logits: jax.Array
    hidden: jax.Array | None
    cache: KVCache | None


# ----------------------------------------------------------------------------- RoPE

def rope_tables(positions: jax.Array, head_dim: int, theta: float, scaling: float = 1.0):
    """cos/sin ``[B, S, head_dim]`` in fp32 for integer ``positions`` ``[B, S]`` (HF layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    inv_freq = inv_freq / scaling
    ang = positions.astype(jnp.float32)[..., None] * inv_freq
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``x`` ``[B, S, H, Dh]`` (computed in fp32, returned in x's dtype).

    HF's ``x * cos + rotate_half(x) * sin`` written per half (the two halves of ``cos``/``sin`` are
    equal in the HF layout): the same products and sums, without materialising ``rotate_half(x)``,
    whose negated concatenation costs an extra pass forward and a pad-and-add backward on CPU.
    """
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    c, s = cos[:, :, None, :half], sin[:, :, None, :half]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------- modules

def _linear(name: str, din: int, dout: int, axes, lora: LoRAConfig | None, dtype, param_dtype,
            lora_param_dtype, rngs):
    if lora is not None and name in lora.targets:
        return LoRADense(din, dout, names=axes, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                         use_bias=False, dtype=dtype, param_dtype=param_dtype,
                         lora_param_dtype=lora_param_dtype, rngs=rngs)
    return layers.Dense(din, dout, names=axes, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs)


def _apply(mod, x, rng):
    return mod(x, rng=rng) if isinstance(mod, LoRADense) else mod(x)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lora, *, dtype, param_dtype, lora_param_dtype, rngs):
        D, H, K, Dh = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = H, K, Dh
        mk = functools.partial(_linear, lora=lora, dtype=dtype, param_dtype=param_dtype,
                               lora_param_dtype=lora_param_dtype, rngs=rngs)
        self.q_proj = mk("q_proj", D, H * Dh, ("embed", "heads"))
        self.k_proj = mk("k_proj", D, K * Dh, ("embed", "kv_heads"))
        self.v_proj = mk("v_proj", D, K * Dh, ("embed", "kv_heads"))
        self.o_proj = mk("o_proj", H * Dh, D, ("heads", "embed"))

    def __call__(self, x, cos, sin, *, mask, is_causal, cache=None, layer: int = 0, index=None,
                 rng=None):
        """``x`` ``[B, S, D]``. With ``cache=(k_all, v_all)`` (``[L, B, max_len, K, Dh]``) the new keys
        and values are written at slot ``index`` of layer ``layer`` and attention runs over the
        whole cache; the updated pair is returned."""
        B, S, _ = x.shape
        rq, rk, rv, ro = layers.split_rng(rng, 4)
        q, k, v = apply_shared_input((self.q_proj, self.k_proj, self.v_proj), x, (rq, rk, rv))
        q = q.reshape(B, S, self.heads, self.head_dim)
        k = k.reshape(B, S, self.kv_heads, self.head_dim)
        v = v.reshape(B, S, self.kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_all, v_all = cache
            start = (layer, 0, index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
            k, v = k_all[layer].astype(q.dtype), v_all[layer].astype(q.dtype)
            cache = (k_all, v_all)
        out = layers.attention(q, k, v, mask=mask, is_causal=is_causal)
        return _apply(self.o_proj, out.reshape(B, S, self.heads * self.head_dim), ro), cache


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lora, *, dtype, param_dtype, lora_param_dtype, rngs):
        mk = functools.partial(_linear, lora=lora, dtype=dtype, param_dtype=param_dtype,
                               lora_param_dtype=lora_param_dtype, rngs=rngs)
        self.gate_proj = mk("gate_proj", cfg.hidden, cfg.intermediate, ("embed", "mlp"))
        self.up_proj = mk("up_proj", cfg.hidden, cfg.intermediate, ("embed", "mlp"))
        self.down_proj = mk("down_proj", cfg.intermediate, cfg.hidden, ("mlp", "embed"))

    def __call__(self, x, rng=None):
        rg, ru, rd = layers.split_rng(rng, 3)
        gate, up = apply_shared_input((self.gate_proj, self.up_proj), x, (rg, ru))
        return _apply(self.down_proj, jax.nn.silu(gate) * up, rd)


class LlamaBlock(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lora, *, dtype, param_dtype, lora_param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora_param_dtype=lora_param_dtype, rngs=rngs)
        self.input_layernorm = layers.RMSNorm(cfg.hidden, eps=cfg.rms_eps, dtype=dtype,
                                              param_dtype=param_dtype, rngs=rngs)
        self.self_attn = LlamaAttention(cfg, lora, **kw)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden, eps=cfg.rms_eps, dtype=dtype,
                                                       param_dtype=param_dtype, rngs=rngs)
        self.mlp = LlamaMLP(cfg, lora, **kw)

    def __call__(self, x, cos, sin, *, mask, is_causal, cache=None, layer=0, index=None, rng=None):
        ra, rm = layers.split_rng(rng, 2)
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask=mask, is_causal=is_causal,
                                  cache=cache, layer=layer, index=index, rng=ra)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), rm)
        return sharding.constrain(x, ("batch", "length", "embed")), cache


class Llama(nnx.Module):
    """LLaMA-2 causal LM.

    ``dtype`` is the compute dtype, ``param_dtype`` the base weights' dtype (bf16 for the frozen
    7B), ``lora_param_dtype`` the adapters' (fp32). With ``lora`` the projections it names become
    :class:`LoRADense`; the others are plain bias-free ``layers.Dense``.
    """

    def __init__(self, config: LlamaConfig, *, lora: LoRAConfig | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, lora_param_dtype=jnp.float32, rngs: nnx.Rngs):
        if lora is not None:
            known = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
            if set(lora.targets) - known:
                raise ValueError(f"unknown LoRA targets {sorted(set(lora.targets) - known)}; "
                                 f"choose from {sorted(known)}")
        self.config, self.lora = config, lora
        self.dtype, self.param_dtype = dtype, param_dtype
        cfg = config
        self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden, names=("vocab", "embed"), dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([
            LlamaBlock(cfg, lora, dtype=dtype, param_dtype=param_dtype, lora_param_dtype=lora_param_dtype,
                       rngs=rngs) for _ in range(cfg.layers)])
        self.norm = layers.RMSNorm(cfg.hidden, eps=cfg.rms_eps, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        layers.Dense(cfg.hidden, cfg.vocab_size, names=("embed", "vocab"), use_bias=False,
                                     dtype=dtype, param_dtype=param_dtype, rngs=rngs))

    # ------------------------------------------------------------------ public helpers

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings ``[B, S, D]`` in the compute dtype."""
        return self.embed_tokens(input_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated)."""
        cfg = self.config
        shape = (cfg.layers, batch, max_len, cfg.kv_heads, cfg.head_dim)
        dtype = self.dtype if dtype is None else dtype
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    # ------------------------------------------------------------------ forward

    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                 cache: KVCache | None = None, rng: jax.Array | None = None,
                 return_hidden: bool = False, logits_at: jax.Array | None = None,
                 compute_logits: bool = True):
        """Run the decoder.

        Args:
          input_ids: ``[B, S]`` int token ids, or
          inputs_embeds: ``[B, S, D]`` embeddings (e.g. :meth:`embed` output with video rows replaced).
          attention_mask: ``[B, S]``, 1 = real token, 0 = padding (left or right); padded keys are
            masked. None = all real.
          positions: ``[B, S]`` RoPE positions; default ``cumsum(mask) - 1`` (continuing from the
            cache's count of real tokens when decoding).
          cache: a :class:`KVCache`; the S tokens are written at ``cache.index`` and attend to
            everything cached before them (prefill: an empty cache and the whole prompt; decode:
            one token per call).
          rng: dropout key for the LoRA adapters (None = deterministic).
          return_hidden: also return the final hidden states.
          logits_at: ``[B, K]`` positions: the ``lm_head`` is applied there only and ``logits`` is
            ``[B, K, V]`` (a negative position gives position 0's logits; the caller masks it).
            Training uses the positions whose next token is supervised: the answers are a small
            part of a prompt full of video tokens, and the vocabulary projection is most of the
            step's work at small widths and most of its activation memory at 7B.

          compute_logits: False skips the ``lm_head``: ``logits`` is None and ``hidden`` the final
            hidden states ``[B, S, D]`` (for a loss that applies :meth:`lm_head_weight` blockwise,
            ``train/losses.py`` ``chunked_lm_loss``).

        Returns:
          :class:`LlamaOutput` ``(logits [B, S, V] fp32, hidden or None, updated cache or None)``;
          ``model(input_ids).logits`` is the plain forward.
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        x = sharding.constrain(x, ("batch", "length", "embed"))
        B, S, _ = x.shape
        full_mask = None
        if attention_mask is not None and attention_mask.ndim == 3:
            # A full [B, S, S] boolean mask (query, key): used for tree-shaped sequences (several
            # continuations of one prefix scored in one pass); ``positions`` must be given.
            if positions is None or cache is not None:
                raise ValueError("a [B, S, S] attention mask needs explicit positions and no cache")
            full_mask = attention_mask.astype(bool) | jnp.eye(S, dtype=bool)[None]
            attention_mask = None
        real = (jnp.ones((B, S), bool) if attention_mask is None else attention_mask.astype(bool))

        if cache is None:
            base = jnp.zeros((B, 1), jnp.int32)
        else:
            _check_room(cache, S)
            base = cache.valid.sum(-1, dtype=jnp.int32)[:, None]
        if positions is None:
            positions = jnp.maximum(base + jnp.cumsum(real, -1, dtype=jnp.int32) - 1, 0)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

        if full_mask is not None:
            mask, is_causal = full_mask[:, None], False
            valid, kv = None, None
        elif cache is None:
            if attention_mask is None:
                mask, is_causal = None, True  # lets a fused (flash) kernel skip the masked half
            else:
                q_slot = k_slot = jnp.arange(S)
                # the mask is causal already; saying so lets the CPU attention skip the masked
                # upper triangle block by block (layers._attention_einsum); the values are the same
                mask, is_causal = _mask(real, q_slot, k_slot), True
            valid, kv = None, None
        else:
            valid = jax.lax.dynamic_update_slice(cache.valid, real, (0, cache.index))
            q_slot = cache.index + jnp.arange(S)
            mask, is_causal = _mask(valid, q_slot, jnp.arange(cache.max_len)), False
            kv = (cache.k, cache.v)

        rngs = layers.split_rng(rng, cfg.layers)
        for l, block in enumerate(self.layers):
            if cache is None:
                x = _run_block(block, x, cos, sin, mask, rngs[l], is_causal=is_causal, remat=cfg.remat)
            else:
                x, kv = block(x, cos, sin, mask=mask, is_causal=False, cache=kv, layer=l,
                              index=cache.index, rng=rngs[l])

        h = self.norm(x)
        new_cache = None if cache is None else KVCache(k=kv[0], v=kv[1], valid=valid,
                                                       index=cache.index + S)
        if not compute_logits:
            return LlamaOutput(None, h, new_cache)
        w = self.lm_head_weight()
        h_out = h if logits_at is None else jnp.take_along_axis(h, jnp.maximum(logits_at, 0)[..., None], axis=1)
        logits = jnp.dot(h_out, w, preferred_element_type=jnp.float32)
        logits = sharding.constrain(logits, ("batch", "length", "vocab"))
        return LlamaOutput(logits, h if return_hidden else None, new_cache)

    def lm_head_weight(self) -> jax.Array:
        """The ``lm_head`` kernel ``[D, V]`` in the compute dtype (the embedding's transpose when
        ``tie_embeddings``): ``logits = hidden @ lm_head_weight()``, fp32-accumulated."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].astype(self.dtype).T
        return self.lm_head.kernel[...].astype(self.dtype)


def _run_block(block: LlamaBlock, x, cos, sin, mask, rng, *, is_causal: bool, remat: str):
    """One block without a cache, rematerialised in the backward pass unless ``remat == "none"``.

    Plain ``jax.checkpoint`` over the block's split state rather than ``nnx.remat``: the block
    mutates nothing, and this also works when the caller differentiates a model rebuilt with
    ``nnx.merge`` inside ``jax.grad``/``jax.jit`` (``nnx.remat`` then fails with a
    ``TraceContextError``).
    """
    if remat == "none":
        return block(x, cos, sin, mask=mask, is_causal=is_causal, rng=rng)[0]
    graphdef, state = nnx.split(block)

    def run(state, x, cos, sin, mask, rng):
        return nnx.merge(graphdef, state)(x, cos, sin, mask=mask, is_causal=is_causal, rng=rng)[0]

    return jax.checkpoint(run, policy=_REMAT_POLICIES[remat])(state, x, cos, sin, mask, rng)


def _mask(key_valid: jax.Array, q_slot: jax.Array, k_slot: jax.Array) -> jax.Array:
    """Boolean ``[B, 1, S, T]``: causal over slots, padded keys masked.

    A query always sees its own slot, so a padding query (whose every key is masked) still has a
    finite softmax; its output is garbage but never NaN, and padding keys are masked for everyone
    else, so nothing leaks into real tokens.
    """
    causal = k_slot[None, :] <= q_slot[:, None]
    m = (key_valid[:, None, :] & causal[None]) | (k_slot[None, :] == q_slot[:, None])[None]
    return m[:, None]


def _check_room(cache: KVCache, n: int) -> None:
    # dynamic_update_slice clamps an out-of-range start silently; catch that when we can see it
    try:
        index = int(cache.index)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError, TypeError):
        return
    if index + n > cache.max_len:
        raise ValueError(f"KV cache full: {index} + {n} tokens > max_len {cache.max_len}")
