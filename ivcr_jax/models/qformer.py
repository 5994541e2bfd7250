"""The image Q-Former: a BERT encoder whose learned queries cross-attend to ViT features.

Follows reference-architecture.md §2 (LAVIS / TimeChat ``Qformer.py``; HF ``InstructBlipQFormerModel``):

* embeddings: text = word + absolute position (positions start at 0 for the text); the queries get
  no position embedding; ``cat(queries, text)`` -> LayerNorm -> dropout;
* every layer: bidirectional self-attention over ``[queries; text]`` (padded text keys masked);
  cross-attention to the image for the query positions only, in layers ``i % cross_attention_freq == 0``;
  then two feed-forward blocks: ``ffn_query`` for the query positions, ``ffn_text`` for the text.

The output keeps the text positions, ``[B, Q+T, D]``: TimeChat/IVCR feed all of them to the video
Q-Former (quirk 2 of §2, reproduced on purpose; callers slice ``[:, :Q]`` for InstructBLIP
behaviour). A module built with ``num_query_tokens=0`` owns no queries. Called with text and
without ``query_embeds`` and image features, it is the text-only pass BLIP-2 uses for its ITC
text features.

TimeChat/IVCR tokenise the timestamp text with the LLaMA tokenizer and feed those ids to this
BERT table (quirk 1 of §2; a data-side choice, the module just takes ids). An id outside the table
is never clipped to a valid row: eager calls raise, traced calls produce NaN rows.

The same classes, with ``has_text=False`` and ``cross_attention_freq=1``, form the query-only BERT
inside the video Q-Former (``video_qformer.py``).

The module knows nothing of checkpoint formats: HF and LAVIS weights are loaded by
``ivcr_jax.convert.qformer.from_hf`` / ``from_lavis``.
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
from ivcr_jax.models import layers
from ivcr_jax.models.layers import Dense, Dropout, Embed, LayerNorm, make_param, normal_02, split_rng


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """BERT-base Q-Former; the defaults are TimeChat/IVCR's image Q-Former (§2)."""

    vocab_size: int = 30523          # BERT 30522 + "[DEC]" (LAVIS resizes to 30523)
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    eps: float = 1e-12
    max_positions: int = 512
    cross_attention_freq: int = 2    # cross-attention in layers 0, 2, 4, ...
    encoder_width: int = 1408        # EVA ViT-g width
    num_query_tokens: int = 32       # 0 = the module owns no query tokens
    has_text: bool = True            # word/position embeddings and the text FFNs
    dropout: float = 0.1             # hidden and attention-probs dropout (BERT style)

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")

    def has_cross_attention(self, layer: int) -> bool:
        return self.cross_attention_freq > 0 and layer % self.cross_attention_freq == 0

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], **overrides) -> "QFormerConfig":
        """From an ``InstructBlipQFormerConfig`` / ``Blip2QFormerConfig`` dict, or a full
        ``InstructBlipConfig`` / ``Blip2Config`` dict (nested ``qformer_config``).

        A bare Q-Former config gives ``num_query_tokens=0`` (HF keeps the query tokens in the
        full model). The checkpoint's vocabulary size is kept as is.
        """
        if "qformer_config" in cfg:
            q = dict(cfg["qformer_config"] or {})
            num_queries = int(cfg.get("num_query_tokens", 32))
            outer_type = cfg.get("model_type", "")
        else:
            q, num_queries, outer_type = dict(cfg), 0, ""
        qtype = q.get("model_type", "")
        if qtype == "instructblip_qformer" or outer_type == "instructblip":
            has_text = True
        elif "use_qformer_text_input" in q or qtype == "blip_2_qformer" or outer_type == "blip-2":
            has_text = bool(q.get("use_qformer_text_input", False))
        else:
            has_text = True
        act = q.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"Q-Former hidden_act {act!r} is not supported (only exact 'gelu')")
        kw = dict(
            vocab_size=int(q.get("vocab_size", 30522)),
            hidden=int(q.get("hidden_size", 768)),
            layers=int(q.get("num_hidden_layers", 12)),
            heads=int(q.get("num_attention_heads", 12)),
            mlp_dim=int(q.get("intermediate_size", 3072)),
            eps=float(q.get("layer_norm_eps", 1e-12)),
            max_positions=int(q.get("max_position_embeddings", 512)),
            cross_attention_freq=int(q.get("cross_attention_frequency", 2)),
            encoder_width=int(q.get("encoder_hidden_size", 1408)),
            num_query_tokens=num_queries,
            has_text=has_text,
            dropout=float(q.get("hidden_dropout_prob", 0.1)),
        )
        kw.update(overrides)
        return cls(**kw)


def _attend(q, k, v, mask, rng, rate):
    """Attention ``[B, T, H, Dh]``; with a dropout key, BERT's dropout on the probabilities."""
    if rng is None or rate == 0.0:
        return layers.attention(q, k, v, mask=mask)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - rate), 0.0).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


class QFormerAttention(nnx.Module):
    """BERT attention block: multi-head attention -> dense -> dropout -> LayerNorm(x + .)."""

    def __init__(self, config: QFormerConfig, *, kv_width: int, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden
        self.heads, self.rate, self.dtype = config.heads, config.dropout, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = Dense(d, d, names=("embed", "heads"), **kw)
        self.key = Dense(kv_width, d, names=("embed", "heads"), **kw)
        self.value = Dense(kv_width, d, names=("embed", "heads"), **kw)
        self.out = Dense(d, d, names=("heads", "embed"), **kw)
        self.norm = LayerNorm(d, eps=config.eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout = Dropout(config.dropout)

    def __call__(self, x, kv, mask, rng=None):
        # x [B, T, D]; kv [B, S, Dkv]; mask bool [B, 1, T, S] or None
        r_attn, r_out = split_rng(rng, 2)
        b, t, d = x.shape
        hd = d // self.heads
        q = self.query(x).reshape(b, t, self.heads, hd)
        k = self.key(kv).reshape(b, kv.shape[1], self.heads, hd)
        v = self.value(kv).reshape(b, kv.shape[1], self.heads, hd)
        o = _attend(q, k, v, mask, r_attn, self.rate).reshape(b, t, d)
        h = self.dropout(self.out(o), r_out)
        # residual in fp32 (the LayerNorm computes in fp32 anyway)
        return self.norm(h.astype(jnp.float32) + x.astype(jnp.float32))


class QFormerFeedForward(nnx.Module):
    """BERT FFN: dense -> exact GELU -> dense -> dropout -> LayerNorm(x + .)."""

    def __init__(self, config: QFormerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(config.hidden, config.mlp_dim, names=("embed", "mlp"), **kw)
        self.fc2 = Dense(config.mlp_dim, config.hidden, names=("mlp", "embed"), **kw)
        self.norm = LayerNorm(config.hidden, eps=config.eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout = Dropout(config.dropout)

    def __call__(self, x, rng=None):
        h = jax.nn.gelu(self.fc1(x), approximate=False)
        h = self.dropout(self.fc2(h), rng)
        return self.norm(h.astype(jnp.float32) + x.astype(jnp.float32))


class QFormerLayer(nnx.Module):
    """Self-attention over [queries; text], cross-attention (queries only), split FFNs."""

    def __init__(self, config: QFormerConfig, index: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = QFormerAttention(config, kv_width=config.hidden, **kw)
        self.cross_attn = (QFormerAttention(config, kv_width=config.encoder_width, **kw)
                           if config.has_cross_attention(index) else None)
        self.ffn_query = QFormerFeedForward(config, **kw)
        self.ffn_text = QFormerFeedForward(config, **kw) if config.has_text else None

    def __call__(self, x, self_mask, encoder_states, encoder_mask, num_queries: int, rng=None):
        r_self, r_cross, r_q, r_t = split_rng(rng, 4)
        h = self.self_attn(x, x, self_mask, r_self)
        if num_queries == 0:
            return self.ffn_text(h, r_t)
        hq = h[:, :num_queries]
        if self.cross_attn is not None:
            if encoder_states is None:
                raise ValueError("encoder_hidden_states must be given: this layer has cross-attention")
            hq = self.cross_attn(hq, encoder_states, encoder_mask, r_cross)
        out = self.ffn_query(hq, r_q)
        if h.shape[1] > num_queries:
            out = jnp.concatenate([out, self.ffn_text(h[:, num_queries:], r_t)], axis=1)
        return out


class QFormerEmbeddings(nnx.Module):
    """Text word + position embeddings (fp32 sum), concatenated after the queries, LayerNorm."""

    def __init__(self, config: QFormerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.vocab_size = config.vocab_size
        if config.has_text:
            # looked up in fp32 so the word + position sum is exact before the LayerNorm
            self.word_embeddings = Embed(config.vocab_size, config.hidden, names=("vocab", "embed"),
                                         dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
            self.position_embeddings = Embed(config.max_positions, config.hidden, names=("pos", "embed"),
                                             dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        else:
            self.word_embeddings = self.position_embeddings = None
        self.layernorm = LayerNorm(config.hidden, eps=config.eps, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
        self.dropout = Dropout(config.dropout)

    def __call__(self, input_ids, query_embeds, rng=None):
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds.astype(jnp.float32))
        if input_ids is not None:
            if self.word_embeddings is None:
                raise ValueError("this Q-Former has no text branch (has_text=False): input_ids not accepted")
            t = input_ids.shape[1]
            if t > self.position_embeddings.num:
                raise ValueError(f"text length {t} exceeds max_positions {self.position_embeddings.num}")
            text = self.word_embeddings(input_ids) + self.position_embeddings.embedding[...][:t].astype(jnp.float32)
            parts.append(text)
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        return self.dropout(self.layernorm(x), rng)


def _check_ids(input_ids, vocab_size: int) -> None:
    """Reject out-of-vocabulary ids eagerly; under jit they come out as NaN rows.

    TimeChat/IVCR feed LLaMA-tokenised timestamp text to the BERT table (quirk 1 of §2). The
    timestamp strings only use low LLaMA ids (< 30523), but other text could exceed the table; the
    lookup never clips an id to a valid row (``jnp.take`` fills out-of-range rows with NaN).
    """
    try:
        ids = np.asarray(input_ids)
    except jax.errors.TracerArrayConversionError:   # traced: checked by the NaN rows instead
        return
    if not ids.size:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if hi >= vocab_size or lo < 0:
        raise ValueError(f"input_ids out of the Q-Former vocabulary [0, {vocab_size}): min {lo}, max {hi}")


class QFormer(nnx.Module):
    """The InstructBLIP-style image Q-Former (§2); mirrors HF ``InstructBlipQFormerModel``."""

    def __init__(self, config: QFormerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        if config.num_query_tokens > 0:
            self.query_tokens = make_param(rngs, normal_02, (1, config.num_query_tokens, config.hidden),
                                           param_dtype, (None, "query", "embed"))
        else:
            self.query_tokens = None
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = QFormerEmbeddings(config, **kw)
        self.layers = nnx.List([QFormerLayer(config, i, **kw) for i in range(config.layers)])

    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 encoder_hidden_states: jax.Array | None = None, *, query_embeds: jax.Array | None = None,
                 encoder_attention_mask: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
        """Last hidden state ``[B, Q+T, D]`` (text positions kept).

        input_ids: ``[B, T]`` text ids or None. attention_mask: ``[B, T]`` (text only; the queries
        are always attended) or ``[B, Q+T]`` (HF convention). encoder_hidden_states:
        ``[B, S, encoder_width]``; encoder_attention_mask: ``[B, S]`` (None = all keys valid).
        query_embeds: ``[B, Q, D]``; None uses the module's own ``query_tokens`` when it has them
        and ``encoder_hidden_states`` is given; otherwise the pass is text-only (BLIP-2's ITC text
        features: no queries, no cross-attention). rng: dropout key (None = deterministic).
        """
        if query_embeds is None and self.query_tokens is not None and encoder_hidden_states is not None:
            query_embeds = jnp.broadcast_to(self.query_tokens[...], (encoder_hidden_states.shape[0],)
                                            + tuple(self.query_tokens[...].shape[1:]))
        if query_embeds is None and input_ids is None:
            raise ValueError("a Q-Former call needs query_embeds, encoder_hidden_states (with own query "
                             "tokens) or input_ids")
        if input_ids is not None:
            _check_ids(input_ids, self.config.vocab_size)
        nq = 0 if query_embeds is None else query_embeds.shape[1]
        nt = 0 if input_ids is None else input_ids.shape[1]
        r_emb, *r_layers = split_rng(rng, 1 + len(self.layers))

        x = self.embeddings(input_ids, query_embeds, r_emb)
        b, n = x.shape[:2]
        x = sharding.constrain(x, ("batch", "length", "embed"))

        self_mask = None
        if attention_mask is not None:
            m = jnp.asarray(attention_mask).astype(bool)
            if m.shape[1] == nt and nq > 0:
                m = jnp.concatenate([jnp.ones((m.shape[0], nq), bool), m], axis=1)
            if m.shape[1] != n:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions; expected "
                                 f"{nt} (text) or {n} (queries + text)")
            self_mask = jnp.broadcast_to(m[:, None, None, :], (b, 1, n, n))
        cross_mask = None
        if encoder_attention_mask is not None and nq > 0:
            em = jnp.asarray(encoder_attention_mask).astype(bool)
            cross_mask = jnp.broadcast_to(em[:, None, None, :], (b, 1, nq, em.shape[1]))
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.astype(self.dtype)

        for layer, r in zip(self.layers, r_layers):
            x = layer(x, self_mask, encoder_hidden_states, cross_mask, nq, r)
            x = sharding.constrain(x, ("batch", "length", "embed"))
        return x
