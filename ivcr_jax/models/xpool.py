"""X-Pool: text-conditioned attention pooling of frame features, its similarity, its loss, its files.

Follows reference-architecture.md §5 (``layer6ai-labs/xpool : modules/transformer.py``,
``modules/loss.py``, ``trainer/trainer.py``) exactly:

* LN1 (one LayerNorm shared by the text and the frames), then a cross-attention whose query is
  the text and whose keys/values are the frames, softmax over **frames**, ``out_proj``;
* LN2 -> ``linear_proj`` -> dropout (0.3) -> residual (added to the LN2 output) -> LN3;
* every ``*proj``/``linear*`` weight is initialised to the identity, every bias to 0, LN eps 1e-5;
* ``sims[t, v] = cos(text_t, pool(v | t))`` with the *raw* text feature (LN1 is applied only to
  the copy that enters the attention), one pooled video per (video, text) pair
  ``[num_vids, num_texts, D]``;
* symmetric InfoNCE over ``sims * exp(logit_scale)``; the learned scale starts at CLIP's
  ``ln(1/0.07)`` and is clamped to ``<= ln 100`` after every optimizer update
  (:func:`clamp_logit_scale`, called by the train step).

Upstream X-Pool fine-tunes the CLIP towers as well (lr 1e-6). Here the frame and text features
are frozen (BLIP-2 ITC features cached in the index, ``retrieval/features.py``), so the trainable
parameters are the pooling block and the logit scale; ``embed_dim`` is the feature dimension.

:func:`save_xpool` / :func:`load_xpool` write and read the exported model: ``xpool.safetensors``
(flat ``a/b/c`` parameter paths) + ``xpool_config.json``. Training is ``ivcr_jax/retrieval/train.py``,
search with it ``ivcr_jax/retrieval/search.py``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from ivcr_jax.models.layers import Dense, Dropout, LayerNorm, make_param
from ivcr_jax.models.params import CheckpointError, flat_state, load_flat


def identity_init(key, shape, dtype=jnp.float32):
    """``nn.init.eye_`` for a square ``[in, out]`` kernel (X-Pool ``_init_parameters``)."""
    del key
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"identity init needs a square kernel, got {shape}")
    return jnp.eye(shape[0], dtype=dtype)


@dataclasses.dataclass(frozen=True)
class XPoolConfig:
    """X-Pool hyper-parameters (defaults: ``config/all_config.py`` of the reference)."""

    embed_dim: int = 256            # = feature dim (BLIP-2 ITC 256; CLIP ViT-B/32 would be 512)
    num_heads: int = 1              # num_mha_heads
    dropout: float = 0.3            # transformer_dropout (0.4 on some datasets upstream)
    layer_norm_eps: float = 1e-5    # torch nn.LayerNorm default
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature
    logit_scale_max: float = math.log(100.0)      # clamp applied after each step upstream

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")


class XPoolAttention(nnx.Module):
    """Cross-attention with q from texts ``[T, D]`` and k/v from frames ``[V, F, D]``."""

    def __init__(self, config: XPoolConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = None  # every initialiser is deterministic (identity / zeros)
        d = config.embed_dim
        self.num_heads = config.num_heads
        self.head_dim = d // config.num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=identity_init, rngs=rngs)
        self.q_proj = Dense(d, d, names=("embed", "heads"), **kw)
        self.k_proj = Dense(d, d, names=("embed", "heads"), **kw)
        self.v_proj = Dense(d, d, names=("embed", "heads"), **kw)
        self.out_proj = Dense(d, d, names=("heads", "embed"), **kw)

    def __call__(self, text: jax.Array, frames: jax.Array,
                 frame_mask: jax.Array | None = None) -> jax.Array:
        """text ``[T, D]``, frames ``[V, F, D]``, frame_mask ``[V, F]`` (True = real) -> ``[V, T, D]``."""
        n_t, n_v, n_f = text.shape[0], frames.shape[0], frames.shape[1]
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(text).reshape(n_t, h, hd)            # [T, H, hd]
        k = self.k_proj(frames).reshape(n_v, n_f, h, hd)     # [V, F, H, hd]
        v = self.v_proj(frames).reshape(n_v, n_f, h, hd)     # [V, F, H, hd]
        logits = jnp.einsum("vfhd,thd->vhft", k, q).astype(jnp.float32) / math.sqrt(hd)
        if frame_mask is not None:
            logits = jnp.where(frame_mask[:, None, :, None], logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=2).astype(v.dtype)   # softmax over frames
        attn = jnp.einsum("vhft,vfhd->vthd", weights, v).reshape(n_v, n_t, h * hd)
        return self.out_proj(attn)                            # [V, T, D]


class XPool(nnx.Module):
    """The X-Pool ``Transformer`` block plus the learned logit scale."""

    def __init__(self, config: XPoolConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.config = config
        # Every initialiser is deterministic (identity, zeros, ones, a constant), so no key is
        # drawn: ``rngs`` is accepted for the common module signature only.
        rngs = None
        d = config.embed_dim
        ln = dict(eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(d, **ln)
        self.cross_attn = XPoolAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(d, **ln)
        self.linear_proj = Dense(d, d, names=("embed", "mlp"),
                                 dtype=dtype, param_dtype=param_dtype, kernel_init=identity_init,
                                 rngs=rngs)
        self.layer_norm3 = LayerNorm(d, **ln)
        self.dropout = Dropout(config.dropout)
        # Scalar, kept in fp32 whatever param_dtype is: it is exponentiated.
        self.logit_scale = make_param(
            rngs, nnx.initializers.constant(config.logit_scale_init), (), jnp.float32, ())

    def pool(self, text: jax.Array, frames: jax.Array, *, frame_mask: jax.Array | None = None,
             rng: jax.Array | None = None) -> jax.Array:
        """Pooled video per (video, text) pair: text ``[T, D]``, frames ``[V, F, D]`` -> ``[V, T, D]``."""
        t = self.layer_norm1(text)
        f = self.layer_norm1(frames)
        attn_out = self.layer_norm2(self.cross_attn(t, f, frame_mask))
        linear_out = self.linear_proj(attn_out)
        out = attn_out + self.dropout(linear_out, rng)
        return self.layer_norm3(out)

    def __call__(self, text: jax.Array, frames: jax.Array, *, frame_mask: jax.Array | None = None,
                 rng: jax.Array | None = None) -> jax.Array:
        """Cosine similarities ``sims[t, v]`` ``[T, V]`` (fp32) of raw texts and their pooled videos."""
        pooled = self.pool(text, frames, frame_mask=frame_mask, rng=rng)      # [V, T, D]
        return pair_cosine(text, pooled)

    def pool_pairs(self, text: jax.Array, frames: jax.Array, *, frame_mask: jax.Array | None = None,
                   rng: jax.Array | None = None) -> jax.Array:
        """Per-text candidate lists: text ``[B, D]``, frames ``[B, K, F, D]`` -> sims ``[B, K]``.

        Text ``b`` is scored only against its own ``K`` candidates (the re-ranking stage), which
        costs ``B*K`` poolings instead of the ``B*V`` of :meth:`__call__`.
        """
        def one(t, f, m):
            return self(t[None], f, frame_mask=m, rng=None)[0]          # [K]
        if rng is not None:
            raise ValueError("pool_pairs is an inference path; pass rng=None")
        if frame_mask is None:
            return jax.vmap(lambda t, f: one(t, f, None))(text, frames)
        return jax.vmap(one)(text, frames, frame_mask)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``F.normalize``-style: ``x / max(||x||, eps)``, in fp32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def pair_cosine(text: jax.Array, pooled: jax.Array) -> jax.Array:
    """``sims[t, v] = <text_t/|text_t|, pooled[v, t]/|pooled[v, t]|>``: text ``[T,D]``, pooled ``[V,T,D]``."""
    return jnp.einsum("td,vtd->tv", l2_normalize(text), l2_normalize(pooled))


def infonce(sims: jax.Array, logit_scale: jax.Array, *, video_ids: jax.Array | None = None) -> jax.Array:
    """Symmetric InfoNCE of X-Pool's ``CLIPLoss``: ``sims`` ``[n, n]``, text on axis 0, pairs on the diagonal.

    ``logits = sims * exp(logit_scale)``; the loss is the mean of the text->video CE (rows) and
    the video->text CE (columns). Upstream treats any off-diagonal entry as a negative even when
    two captions in the batch describe the same video; passing ``video_ids`` ``[n]`` removes such
    false negatives (off-diagonal pairs with equal ids are masked). ``video_ids=None`` is the
    reference behaviour.
    """
    logits = sims.astype(jnp.float32) * jnp.exp(logit_scale.astype(jnp.float32))
    if video_ids is not None:
        same = video_ids[:, None] == video_ids[None, :]
        diag = jnp.eye(sims.shape[0], dtype=bool)
        logits = jnp.where(same & ~diag, -jnp.inf, logits)
    t2v = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    v2t = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    return (t2v + v2t) / 2.0


def clamp_logit_scale(model: XPool) -> None:
    """``torch.clamp_(logit_scale, max=ln 100)`` after each update (reference ``trainer.py``)."""
    model.logit_scale[...] = jnp.minimum(model.logit_scale[...], model.config.logit_scale_max)


# ----------------------------------------------------------------------------- memory-bounded eval

def _pad_to(x: np.ndarray, n: int, axis: int = 0) -> np.ndarray:
    if x.shape[axis] == n:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return np.pad(x, pad)


@nnx.jit
def _sims_block(model: XPool, text: jax.Array, frames: jax.Array, frame_mask: jax.Array) -> jax.Array:
    return model(text, frames, frame_mask=frame_mask)


def similarity_matrix(model: XPool, text: Any, frames: Any, *, frame_mask: Any = None,
                      text_chunk: int = 256, video_chunk: int = 256) -> np.ndarray:
    """Full X-Pool ``sims`` ``[T, V]`` computed in ``text_chunk x video_chunk`` blocks.

    The text-conditioned pooling needs a ``[V, T, D]`` tensor for the full matrix (the O(V*T*d)
    memory of upstream's eval); blocks bound it to ``video_chunk * text_chunk * D``. Blocks are
    zero-padded to the chunk sizes so the jitted kernel compiles once.
    """
    text = np.asarray(text, np.float32)
    frames = np.asarray(frames)
    n_t, n_v = text.shape[0], frames.shape[0]
    if frame_mask is None:
        frame_mask = np.ones(frames.shape[:2], bool)
    frame_mask = np.asarray(frame_mask, bool)
    tc, vc = min(text_chunk, n_t), min(video_chunk, n_v)
    out = np.empty((n_t, n_v), np.float32)
    for v0 in range(0, n_v, vc):
        f = _pad_to(frames[v0:v0 + vc], vc)
        m = _pad_to(frame_mask[v0:v0 + vc], vc)
        m[min(vc, n_v - v0):, 0] = True       # padded videos: one dummy frame keeps softmax finite
        for t0 in range(0, n_t, tc):
            t = _pad_to(text[t0:t0 + tc], tc)
            s = np.asarray(_sims_block(model, t, f, m))
            out[t0:t0 + tc, v0:v0 + vc] = s[:min(tc, n_t - t0), :min(vc, n_v - v0)]
    return out


# ----------------------------------------------------------------------------- export / import

def save_xpool(model: XPool, directory: str | os.PathLike) -> Path:
    """``xpool.safetensors`` (flat ``a/b/c`` keys) + ``xpool_config.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v[...], np.float32) for k, v in flat_state(model).items()}
    safetensors.numpy.save_file(flat, str(d / "xpool.safetensors"))
    (d / "xpool_config.json").write_text(json.dumps(dataclasses.asdict(model.config), indent=1) + "\n")
    return d / "xpool.safetensors"


def load_xpool(path: str | os.PathLike) -> XPool:
    """Load :func:`save_xpool`'s output (the file or its directory)."""
    p = Path(path)
    f = p / "xpool.safetensors" if p.is_dir() else p
    cfg_file = f.parent / "xpool_config.json"
    if not f.is_file() or not cfg_file.is_file():
        raise CheckpointError(f"{p}: expected xpool.safetensors and xpool_config.json")
    model = XPool(XPoolConfig(**json.loads(cfg_file.read_text())), rngs=None)
    try:
        flat = safetensors.numpy.load_file(str(f))
    except safetensors.SafetensorError as e:
        raise CheckpointError(f"{f}: not a safetensors file ({e})") from None
    load_flat(model, flat, source=str(f))
    return model
