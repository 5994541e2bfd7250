"""TimeChat's sliding-window video Q-Former: per-frame tokens -> 32 tokens per window of frames.

Follows reference-architecture.md §3 (TimeChat ``encode_videoQformer_visual``) and §4 (the same
2-layer module in Video-LLaMA):

1. a learned frame-position embedding, indexed by the *absolute* frame index ``0..T-1``, is added
   to every token of frame ``t`` (the 32 image queries and the kept timestamp-text positions);
2. ``for i in range(0, T, stride)``: the frames ``[i, i + window)`` are flattened to
   ``window * L`` keys and a query-only BERT (2 layers, cross-attention in every layer) turns its
   32 learned queries into 32 outputs;
3. the windows' outputs are concatenated: ``32 * ceil(T / stride)`` tokens.

All windows run as one batched computation (windows folded into the batch axis). A window that
runs past the last frame is padded to full length and its padded frames are masked out of the
cross-attention, which is exactly the reference's shorter last window (masked keys get zero
weight). ``window <= 0`` is Video-LLaMA's single pass over all frames.

Reference quirk (§2, quirk 2): TimeChat cross-attends to every kept timestamp-text position,
padded ones included, up to the longest timestamp text of the video. ``token_mask`` lets the
caller choose: all True up to that length reproduces the reference; masking the padded text
positions turns the quirk off.

TimeChat / Video-LLaMA / IVCR weights are loaded by ``ivcr_jax.convert.qformer.video_from_lavis``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax.models.layers import make_param, normal_02
from ivcr_jax.models.qformer import QFormer, QFormerConfig


@dataclasses.dataclass(frozen=True)
class VideoQFormerConfig:
    """TimeChat/IVCR video Q-Former (§3): BERT-base width, 2 layers, 32 queries, windows 32/32."""

    hidden: int = 768
    layers: int = 2
    heads: int = 12
    mlp_dim: int = 3072
    eps: float = 1e-12
    encoder_width: int = 768         # the image Q-Former's width
    num_query_tokens: int = 32
    max_frame_pos: int = 96          # 32 in Video-LLaMA checkpoints (resized on load)
    window: int = 32                 # <= 0: one window over all frames (Video-LLaMA)
    stride: int = 32
    dropout: float = 0.1

    def bert_config(self) -> QFormerConfig:
        """The query-only BERT: no text branch, cross-attention in every layer, no own queries."""
        return QFormerConfig(vocab_size=0, hidden=self.hidden, layers=self.layers, heads=self.heads,
                             mlp_dim=self.mlp_dim, eps=self.eps, max_positions=0, cross_attention_freq=1,
                             encoder_width=self.encoder_width, num_query_tokens=0, has_text=False,
                             dropout=self.dropout)

    def windows(self, num_frames: int) -> tuple[int, int, int]:
        """``(window, stride, n_windows)`` for a clip of ``num_frames`` frames."""
        if self.window <= 0:
            return num_frames, num_frames, 1
        stride = self.stride if self.stride > 0 else self.window
        return self.window, stride, math.ceil(num_frames / stride)


def num_video_tokens(num_frames: int, config: VideoQFormerConfig) -> int:
    """Tokens a clip of ``num_frames`` frames yields: 96 -> 96, 12 -> 32, 40 -> 64 (32/32 windows)."""
    return config.num_query_tokens * config.windows(num_frames)[2]


def interpolate_frame_pos(table, new_len: int):
    """TimeChat's ``interpolate_frame_pos_embed``: nearest 1-D resize of a ``[n, D]`` table.

    Same indices as ``torch.nn.functional.interpolate(mode="nearest")`` on CPU:
    ``src = min(floor(dst * float32(n / new_len)), n - 1)`` computed in float32, with torch's exact
    special cases (same size: identity; doubling: ``dst // 2``). Works on numpy and jax arrays.
    """
    old = int(table.shape[0])
    if new_len == old:
        idx = np.arange(new_len)
    elif new_len == 2 * old:
        idx = np.arange(new_len) >> 1
    else:
        scale = np.float32(old) / np.float32(new_len)
        idx = np.floor(np.arange(new_len, dtype=np.float32) * scale).astype(np.int64)
        idx = np.minimum(idx, old - 1)
    return table[idx]


class VideoQFormer(nnx.Module):
    """Frame-position embedding + sliding windows + query-only BERT (§3)."""

    def __init__(self, config: VideoQFormerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        d = config.hidden
        self.video_query_tokens = make_param(rngs, normal_02, (1, config.num_query_tokens, d), param_dtype,
                                             (None, "query", "embed"))
        self.frame_position_embedding = make_param(rngs, normal_02, (config.max_frame_pos, d), param_dtype,
                                                   ("pos", "embed"))
        self.bert = QFormer(config.bert_config(), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, frame_tokens: jax.Array, *, frame_mask: jax.Array | None = None,
                 token_mask: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
        """``frame_tokens [B, T, L, D]`` -> ``[B, n_windows * Q, D]``.

        frame_mask ``[B, T]``: False for padded frames (shorter videos in a batch). token_mask
        ``[B, T, L]``: False for individual keys. The windows of a video that lie entirely in its
        padded frames have no valid key; their outputs are meaningless and must be dropped by the
        caller (``num_video_tokens`` of the video's true length gives the valid prefix).
        """
        b, t, l, d = frame_tokens.shape
        cfg = self.config
        if t > cfg.max_frame_pos:
            raise ValueError(f"{t} frames exceed the frame-position table (max_frame_pos={cfg.max_frame_pos}); "
                             "sample fewer frames or resize the table with interpolate_frame_pos")
        if d != cfg.encoder_width:
            raise ValueError(f"frame tokens have width {d}, the video Q-Former expects {cfg.encoder_width}")
        window, stride, n = cfg.windows(t)

        pos = self.frame_position_embedding[...][:t].astype(jnp.float32)
        x = (frame_tokens.astype(jnp.float32) + pos[None, :, None, :]).astype(self.dtype)

        keep = jnp.ones((b, t, l), bool)
        if frame_mask is not None:
            keep = keep & jnp.asarray(frame_mask).astype(bool)[:, :, None]
        if token_mask is not None:
            keep = keep & jnp.asarray(token_mask).astype(bool)

        # frame index of every (window, slot); slots past the last frame are padding
        idx = np.arange(n)[:, None] * stride + np.arange(window)[None, :]      # [n, window]
        valid = idx < t
        masked = frame_mask is not None or token_mask is not None or not valid.all()
        if stride == window:
            pad = n * window - t
            xw = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, window, l, d)
            kw = jnp.pad(keep, ((0, 0), (0, pad), (0, 0))).reshape(b, n, window, l)
        else:
            idx_c = np.minimum(idx, t - 1)
            xw = jnp.take(x, idx_c, axis=1)                                    # [B, n, window, L, D]
            kw = jnp.take(keep, idx_c, axis=1) & valid[None, :, :, None]
        xw = xw.reshape(b * n, window * l, d)
        kw = kw.reshape(b * n, window * l) if masked else None

        queries = jnp.broadcast_to(self.video_query_tokens[...], (b * n,) + self.video_query_tokens[...].shape[1:])
        out = self.bert(query_embeds=queries, encoder_hidden_states=xw, encoder_attention_mask=kw, rng=rng)
        return out.reshape(b, n * cfg.num_query_tokens, cfg.hidden)
