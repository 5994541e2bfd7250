"""The batch layout: every array a batch holds, with its shape, dtype and padding value, written once.

The input pipeline fills it (``pipeline.SampleLoader`` per sample, ``pipeline.Batcher`` per batch),
the memory planner builds its abstract batch from it (``train/plan.py``), and the differentiable
aux losses add their target arrays from :data:`AUX` (``train/aux.py``). B = batch size, S = text
bucket, V = videos per sample of a group, T = the group's frames, L = ``timestamp_len``::

    input_ids          int32 [B, S]   pad = eos (2)
    attention_mask     int32 [B, S]   0 on padding
    labels             int32 [B, S]   -100 where not supervised; not shifted
    video_token_index  int32 [B, S]   row in the sample's video-token sequence, -1 for text
    videos: {group: {frames         uint8 [B, V, T, H, W, 3]
                     timestamp_ids  int32 [B, V, T, L]   pad 2
                     timestamp_mask int32 [B, V, T, L]
                     frame_mask     bool  [B, V, T]
                     video_mask     bool  [B, V]}}       group = "f<T>" ("f12", "f96")
    kind          int32 [B]      0 chat, 1 retrieval, 2 moment
    target_index  int32 [B]      0-based ground-truth candidate, -1
    gt_span       float32 [B, 2] seconds, -1
    duration      float32 [B]    the moment video's length, -1
    sample_id     int32 [B]      -1 for padding rows
    weight        float32 [B]    0 for padding and skipped rows

Differentiable aux-loss targets (:data:`AUX`; K = 10 candidates, C = 3 continuation tokens, D = 6
digits per number)::

    cand_pos int32 [B] (-1)   cand_first int32 [B, K]   cand_cont int32 [B, K, C]   cand_len int32 [B, K]
    num_pos int32 [B, 2, D] (-1)   num_place float32 [B, 2, D]
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from ivcr_jax.tokenizer import PAD_ID

IGNORE = -100  # label of an unsupervised position


class Field(NamedTuple):
    shape: tuple[int, ...]  # without the batch axis; "S" marks the text axis
    dtype: Any
    fill: Any


TEXT = {
    "input_ids": Field(("S",), np.int32, PAD_ID),
    "attention_mask": Field(("S",), np.int32, 0),
    "labels": Field(("S",), np.int32, IGNORE),
    "video_token_index": Field(("S",), np.int32, -1),
}
ROW = {
    "kind": Field((), np.int32, 0),
    "target_index": Field((), np.int32, -1),
    "gt_span": Field((2,), np.float32, -1.0),
    "duration": Field((), np.float32, -1.0),
    "sample_id": Field((), np.int32, -1),
    "weight": Field((), np.float32, 0.0),
}
NUM_CANDIDATES = 10
CONT = 3          # tokens of a candidate's answer after its first digit ("0" of 10, then a terminator)
MAX_DIGITS = 6    # digits per number of a moment span
AUX = {
    "cand_pos": Field((), np.int32, -1),
    "cand_first": Field((NUM_CANDIDATES,), np.int32, 0),
    "cand_cont": Field((NUM_CANDIDATES, CONT), np.int32, 0),
    "cand_len": Field((NUM_CANDIDATES,), np.int32, 0),
    "num_pos": Field((2, MAX_DIGITS), np.int32, -1),
    "num_place": Field((2, MAX_DIGITS), np.float32, 0.0),
}
TEXT_PAD = {k: f.fill for k, f in TEXT.items()}


def _full(shape, f: Field) -> np.ndarray:
    return np.full(shape, f.fill, f.dtype)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """The static shape of a batch: video groups ``{name: (videos per sample, frames)}``."""

    groups: Mapping[str, tuple[int, int]]
    frame_size: int
    timestamp_len: int

    def video_fields(self, name: str) -> dict[str, Field]:
        V, T = self.groups[name]
        H, L = self.frame_size, self.timestamp_len
        return {
            "frames": Field((V, T, H, H, 3), np.uint8, 0),
            "timestamp_ids": Field((V, T, L), np.int32, PAD_ID),
            "timestamp_mask": Field((V, T, L), np.int32, 0),
            "frame_mask": Field((V, T), np.bool_, False),
            "video_mask": Field((V,), np.bool_, False),
        }

    def fields(self, seq_len: int, *, aux: bool = False) -> dict:
        """The nested ``{name: Field}`` of one row, the text axis of length ``seq_len``."""
        out: dict = {k: Field((seq_len,), f.dtype, f.fill) for k, f in TEXT.items()}
        out["videos"] = {g: self.video_fields(g) for g in sorted(self.groups)}
        out.update(ROW)
        if aux:
            out.update(AUX)
        return out

    def empty(self, batch_size: int, seq_len: int, *, aux: bool = False) -> dict:
        """A numpy batch of padding (every row weight 0)."""
        return _map(lambda f: _full((batch_size,) + f.shape, f), self.fields(seq_len, aux=aux))

    def empty_videos(self) -> dict:
        """One sample's video arrays (no batch axis), all padding."""
        return {g: {k: _full(f.shape, f) for k, f in self.video_fields(g).items()} for g in sorted(self.groups)}

    def abstract(self, batch_size: int, seq_len: int, sharding: Callable[[tuple[int, ...]], Any] | None = None,
                 *, aux: bool = False) -> dict:
        """``jax.ShapeDtypeStruct``s of a batch; ``sharding(shape)`` gives each array's sharding."""
        import jax  # the data layer itself needs no jax; only abstract batches do

        def sds(f: Field):
            shape = (batch_size,) + f.shape
            return jax.ShapeDtypeStruct(shape, f.dtype, sharding=None if sharding is None else sharding(shape))
        return _map(sds, self.fields(seq_len, aux=aux))


def _map(fn, tree):
    return {k: _map(fn, v) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


def empty_aux(batch_size: int) -> dict[str, np.ndarray]:
    """The differentiable aux-loss target arrays of a batch, all "no target"."""
    return {k: _full((batch_size,) + f.shape, f) for k, f in AUX.items()}
