"""The batch layout: every array a batch holds, with its shape, dtype and padding value, written once.

The input pipeline fills it (``pipeline.SampleLoader`` per sample, ``pipeline.Batcher`` per batch),
the memory planner builds its abstract batch from it (``train/plan.py``), and the differentiable
aux losses add their target arrays from :data:`AUX` (``train/aux.py``). B = batch size, S = text
bucket, V = videos per sample of a group, T = the group's frames, L = ``timestamp_len``, P = frame
pools, F = frames per pool::

    input_ids          int32 [B, S]   pad = eos (2)
    attention_mask     int32 [B, S]   0 on padding
    labels             int32 [B, S]   -100 where not supervised; not shifted
    video_token_index  int32 [B, S]   row in the sample's video-token sequence, -1 for text
    videos: {group: {pool_index     int32 [B, V, T]      the frame's row in its pool, -1: no frame
                     frame_mask     bool  [B, V, T]
                     video_mask     bool  [B, V]}}       group = "f<T>" ("f12", "f96")
    pool:   {frames         uint8 [P, F, H, W, 3]        what the ViT sees (only real frames, packed)
             timestamp_ids  int32 [P, F, L]   pad 2
             timestamp_mask int32 [P, F, L]}
    kind          int32 [B]      0 chat, 1 retrieval, 2 moment
    target_index  int32 [B]      0-based ground-truth candidate, -1
    gt_span       float32 [B, 2] seconds, -1
    duration      float32 [B]    the moment video's length, -1
    sample_id     int32 [B]      -1 for padding rows
    weight        float32 [B]    0 for padding and skipped rows

Frame packing ("only real frames through the ViT", docs/architecture.md). A row has
``K = sum(V * T)`` frame slots (the paper config: 20 x 12 + 2 x 96 = 432); one IVCR sample fills 96 to
336 of them. The batch's rows are cut into P consecutive blocks of ``B / P`` rows (``pack_groups``:
one block per data-parallel shard, so a shard's pool serves its own rows and the batch-sharded
gather back needs no communication); block p's real frames lie, row by row, at the start of
``pool.*[p]``, and ``videos[g].pool_index`` says where each slot's frame is. F is the same for every
block (a static shape): ``B / P`` times the smallest of ``pool_sizes`` (frames per row) that holds
the fullest block, so a run compiles at most ``len(pool_sizes)`` video shapes. ``pool_sizes=()``
is no packing: every slot, padding included, has its pool row (``pool_index`` the identity), which
is what the ViT saw before packing. The model runs the ViT and the image Q-Former on the pool and
gathers each slot's tokens (zeros for ``pool_index`` -1) before the video Q-Former. The ViT feature
cache replaces ``pool.frames`` by ``pool.vit_features [P, F, 1+N, D]`` (``InterLLaVA.encode_pool``).

Differentiable aux-loss targets (:data:`AUX`; K = 10 candidates, C = 3 continuation tokens, D = 6
digits per number)::

    cand_pos int32 [B] (-1)   cand_first int32 [B, K]   cand_cont int32 [B, K, C]   cand_len int32 [B, K]
    num_pos int32 [B, 2, D] (-1)   num_place float32 [B, 2, D]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

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
FRAME_KEYS = ("frames", "timestamp_ids", "timestamp_mask")   # a frame record's arrays besides "slot"


def _full(shape, f: Field) -> np.ndarray:
    return np.full(shape, f.fill, f.dtype)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """The static shape of a batch: video groups ``{name: (videos per sample, frames)}``, and how the
    frames are pooled for the ViT (``pool_sizes`` frames per row, ``()`` = every slot; at most
    ``pack_groups`` pools, one per block of rows)."""

    groups: Mapping[str, tuple[int, int]]
    frame_size: int
    timestamp_len: int
    pool_sizes: tuple[int, ...] = ()
    pack_groups: int = 1
    # The ViT feature cache (data/features.py): ``(1 + N, D, dtype)`` of a pool row's features, which
    # the pool then holds as ``vit_features`` in place of ``frames``; () = frames.
    vit_features: tuple = ()

    def __post_init__(self):
        sizes = tuple(int(s) for s in self.pool_sizes)
        if any(s <= 0 for s in sizes) or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"pool_sizes must be increasing positive frame counts, got {self.pool_sizes}")
        if int(self.pack_groups) < 1:
            raise ValueError(f"pack_groups must be positive, got {self.pack_groups}")
        object.__setattr__(self, "pool_sizes", sizes)

    # ------------------------------------------------------------------ frame slots and pools
    @property
    def packed(self) -> bool:
        return bool(self.pool_sizes)

    @property
    def slots_per_row(self) -> int:
        """K: a row's frame slots, every group's ``V * T``."""
        return sum(v * t for v, t in self.groups.values())

    def slot_offsets(self) -> dict[str, int]:
        """Where each group's ``V * T`` slots start among a row's K (sorted group names)."""
        out, off = {}, 0
        for g in sorted(self.groups):
            out[g] = off
            off += self.groups[g][0] * self.groups[g][1]
        return out

    def num_pools(self, batch_size: int) -> int:
        """P: the pools of a batch of ``batch_size`` rows (``pack_groups``, or a divisor of the batch)."""
        return math.gcd(int(self.pack_groups), int(batch_size))

    def pool_rows(self, real: int, rows: int) -> int:
        """F for pools of ``rows`` batch rows whose fullest holds ``real`` real frames."""
        K = self.slots_per_row
        for c in self.pool_sizes:
            if c * rows >= real:
                return min(c, K) * rows
        return K * rows

    def video_fields(self, name: str) -> dict[str, Field]:
        V, T = self.groups[name]
        return {
            "pool_index": Field((V, T), np.int32, -1),
            "frame_mask": Field((V, T), np.bool_, False),
            "video_mask": Field((V,), np.bool_, False),
        }

    def pool_fields(self) -> dict[str, Field]:
        """One pool row (one frame)."""
        H, L = self.frame_size, self.timestamp_len
        if self.vit_features:
            n, d, dtype = self.vit_features
            pixels = {"vit_features": Field((int(n), int(d)), _feature_dtype(dtype), 0)}
        else:
            pixels = {"frames": Field((H, H, 3), np.uint8, 0)}
        return {
            **pixels,
            "timestamp_ids": Field((L,), np.int32, PAD_ID),
            "timestamp_mask": Field((L,), np.int32, 0),
        }

    def frame_record(self, n: int) -> dict[str, np.ndarray]:
        """Room for one sample's ``n`` real frames: ``slot int32 [n]`` (the frame's slot among the
        row's K: its group's offset + ``v * T + t``) and the pool arrays ``[n, ...]``."""
        out = {k: _full((n,) + f.shape, f) for k, f in self.pool_fields().items()}
        out["slot"] = np.zeros((n,), np.int32)
        return out

    def pack(self, records: Sequence[Mapping | None], batch_size: int,
             agree: Callable[[int], int] | None = None) -> tuple[dict, dict]:
        """``(pool, {group: pool_index [B, V, T]})`` of the rows' frame records (:meth:`frame_record`;
        ``None`` or missing rows have no frame). ``agree(F) -> F'`` (``F' >= F``, several processes:
        the largest) fixes the frames per pool."""
        B, K = int(batch_size), self.slots_per_row
        P = self.num_pools(B)
        r = B // P
        recs = list(records) + [None] * (B - len(records))
        if len(recs) != B:
            raise ValueError(f"{len(records)} rows for a batch of {B}")
        n = [0 if x is None else len(x["slot"]) for x in recs]
        F = self.pool_rows(max(sum(n[p * r:(p + 1) * r]) for p in range(P)), r)
        if agree is not None:
            F = int(agree(F))
        pool = {k: _full((P, F) + f.shape, f) for k, f in self.pool_fields().items()}
        index = np.full((B, K), -1, np.int32)
        if not self.packed:   # every slot has its row: [P, r * K] in slot order
            index[:] = (np.arange(B) % r)[:, None] * K + np.arange(K, dtype=np.int32)[None, :]
        cursor = [0] * P
        for i, x in enumerate(recs):
            if not n[i]:
                continue
            p, j = divmod(i, r)
            slot = np.asarray(x["slot"], np.int64)
            if self.packed:
                pos = cursor[p] + np.arange(n[i])
                cursor[p] += n[i]
            else:
                pos = j * K + slot
            for k in pool:
                pool[k][p, pos] = x[k]
            index[i, slot] = pos
        off = self.slot_offsets()
        idx = {g: index[:, off[g]:off[g] + V * T].reshape(B, V, T) for g, (V, T) in sorted(self.groups.items())}
        return pool, idx

    def balanced_order(self, counts: Sequence[int], batch_size: int) -> np.ndarray | None:
        """A row order that needs smaller pools: the rows (real frames ``counts``) dealt to the P
        blocks largest first, each to the emptiest block with room (each block then keeps its rows in
        batch order); ``None`` when the batch order needs no larger pool."""
        B = int(batch_size)
        P = self.num_pools(B)
        r = B // P
        if not self.packed or P == 1 or r == 1:
            return None
        c = np.zeros(B, np.int64)
        c[:len(counts)] = counts
        sums, members = np.zeros(P, np.int64), [[] for _ in range(P)]
        for i in np.argsort(-c, kind="stable"):
            room = [p for p in range(P) if len(members[p]) < r]
            p = min(room, key=lambda q: (sums[q], q))
            sums[p] += c[i]
            members[p].append(int(i))
        before = self.pool_rows(int(c.reshape(P, r).sum(1).max()), r)
        if self.pool_rows(int(sums.max()), r) >= before:
            return None
        return np.array([i for m in members for i in sorted(m)], np.int64)

    # ------------------------------------------------------------------ whole batches
    def fields(self, seq_len: int, *, aux: bool = False) -> dict:
        """The nested ``{name: Field}`` of one row, the text axis of length ``seq_len`` (the pool,
        not a per-row array, is apart: :meth:`pool_fields`)."""
        out: dict = {k: Field((seq_len,), f.dtype, f.fill) for k, f in TEXT.items()}
        out["videos"] = {g: self.video_fields(g) for g in sorted(self.groups)}
        out.update(ROW)
        if aux:
            out.update(AUX)
        return out

    def empty(self, batch_size: int, seq_len: int, *, aux: bool = False, frames: Sequence[Mapping | None] = (),
              agree: Callable[[int], int] | None = None) -> dict:
        """A numpy batch of padding (every row weight 0), its pool holding the rows' ``frames``
        (frame records, :meth:`pack`; none by default)."""
        out = _map(lambda f: _full((batch_size,) + f.shape, f), self.fields(seq_len, aux=aux))
        out["pool"], idx = self.pack(frames, batch_size, agree)
        for g, a in idx.items():
            out["videos"][g]["pool_index"] = a
        return out

    def empty_videos(self) -> dict:
        """One sample's video masks (no batch axis), all padding."""
        return {g: {k: _full(f.shape, f) for k, f in self.video_fields(g).items() if k != "pool_index"}
                for g in sorted(self.groups)}

    def abstract(self, batch_size: int, seq_len: int, sharding: Callable[[tuple[int, ...]], Any] | None = None,
                 *, aux: bool = False, frames_per_row: int | None = None) -> dict:
        """``jax.ShapeDtypeStruct``s of a batch; ``sharding(shape)`` gives each array's sharding (the
        pool's leading axis P is a batch axis too). The pool holds ``frames_per_row`` frames per row
        (default: the largest pool, ``pool_rows`` of every slot)."""
        import jax  # the data layer itself needs no jax; only abstract batches do

        def sds(shape, f: Field):
            return jax.ShapeDtypeStruct(shape, f.dtype, sharding=None if sharding is None else sharding(shape))
        out = _map(lambda f: sds((batch_size,) + f.shape, f), self.fields(seq_len, aux=aux))
        P = self.num_pools(batch_size)
        r = batch_size // P
        F = r * (self.slots_per_row if frames_per_row is None else min(int(frames_per_row), self.slots_per_row))
        out["pool"] = {k: sds((P, F) + f.shape, f) for k, f in self.pool_fields().items()}
        return out


def _feature_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _map(fn, tree):
    return {k: _map(fn, v) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


def empty_aux(batch_size: int) -> dict[str, np.ndarray]:
    """The differentiable aux-loss target arrays of a batch, all "no target"."""
    return {k: _full((batch_size,) + f.shape, f) for k, f in AUX.items()}


# ----------------------------------------------------------------------------- helpers (tests, tools)

def layout_of(batch: Mapping[str, Any], *, pool_sizes: Sequence[int] = (), pack_groups: int = 1) -> BatchLayout:
    """The layout of a batch's video arrays (with other pooling: ``pool_sizes``, ``pack_groups``)."""
    groups = {g: tuple(np.shape(a["pool_index"])[1:]) for g, a in batch["videos"].items()}
    pool = batch["pool"]
    return BatchLayout(groups, int(np.shape(pool["frames"])[2]), int(np.shape(pool["timestamp_ids"])[-1]),
                       tuple(pool_sizes), pack_groups)


def slot_view(batch: Mapping[str, Any]) -> dict:
    """Each slot's frame as the unpacked layout had it: ``{group: {frames [B, V, T, H, W, 3],
    timestamp_ids [B, V, T, L], timestamp_mask [B, V, T, L]}}`` (numpy; padding where no frame)."""
    pool = {k: np.asarray(v) for k, v in batch["pool"].items() if k in FRAME_KEYS}
    fields = layout_of(batch).pool_fields()
    out = {}
    for g, grp in batch["videos"].items():
        idx = np.asarray(grp["pool_index"])                       # [B, V, T]
        B = idx.shape[0]
        P = pool["frames"].shape[0]
        p = (np.arange(B) // (B // P))[:, None, None]
        out[g] = {}
        for k, a in pool.items():
            x = a[np.broadcast_to(p, idx.shape), np.maximum(idx, 0)]
            out[g][k] = np.where((idx >= 0).reshape(idx.shape + (1,) * (x.ndim - 3)), x, fields[k].fill).astype(a.dtype)
    return out


def frame_records(layout: BatchLayout, videos: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """Per-row frame records (:meth:`BatchLayout.frame_record`) of videos in the unpacked per-slot
    layout (``{group: {frames [B, V, T, H, W, 3], timestamp_ids, timestamp_mask, frame_mask}}``):
    the slots whose ``frame_mask`` is set."""
    off = layout.slot_offsets()
    B = int(np.shape(next(iter(videos.values()))["frame_mask"])[0])
    recs = []
    for i in range(B):
        parts = []
        for g in sorted(layout.groups):
            grp = videos[g]
            m = np.asarray(grp["frame_mask"][i]).astype(bool).reshape(-1)
            sel = np.nonzero(m)[0]
            V, T = layout.groups[g]
            part = {"slot": (off[g] + sel).astype(np.int32)}
            for k in FRAME_KEYS:
                a = np.asarray(grp[k][i])
                part[k] = a.reshape((V * T,) + a.shape[2:])[sel]
            parts.append(part)
        recs.append({k: np.concatenate([p[k] for p in parts]) for k in ("slot",) + FRAME_KEYS})
    return recs


def pack_videos(layout: BatchLayout, videos: Mapping[str, Mapping[str, Any]]) -> tuple[dict, dict]:
    """``(videos, pool)`` of the batch layout from videos in the unpacked per-slot layout (see
    :func:`frame_records`; ``video_mask`` and ``frame_mask`` are kept): for hand-built batches."""
    B = int(np.shape(next(iter(videos.values()))["frame_mask"])[0])
    pool, idx = layout.pack(frame_records(layout, videos), B)
    out = {g: {"pool_index": idx[g], "frame_mask": np.asarray(videos[g]["frame_mask"]).astype(bool),
               "video_mask": np.asarray(videos[g]["video_mask"]).astype(bool)} for g in sorted(layout.groups)}
    return out, pool


def take_rows(batch: Mapping[str, Any], rows: Sequence[int], layout: BatchLayout | None = None) -> dict:
    """The batch of ``rows`` of ``batch`` (numpy), its frames pooled again by ``layout`` (default:
    :func:`layout_of`, no packing)."""
    rows = np.asarray(rows, np.int64)
    layout = layout or layout_of(batch)
    view = slot_view(batch)
    dense = {g: {**{k: v[rows] for k, v in view[g].items()},
                 "frame_mask": np.asarray(batch["videos"][g]["frame_mask"])[rows],
                 "video_mask": np.asarray(batch["videos"][g]["video_mask"])[rows]} for g in view}
    out = {k: np.asarray(v)[rows] for k, v in batch.items() if k not in ("videos", "pool")}
    out["videos"], out["pool"] = pack_videos(layout, dense)
    return out
