"""The Grain input pipeline: sample references → decoded, padded, static-shape numpy batches.

Follows jax-codebases §3.5 / §3.6 (Grain dataset API, checkpointable iterators) and
reference-architecture §8.2–§8.3 (what a sample holds). The chain is::

    MapDataset.source(samples)
      .seed(seed).shuffle().repeat(num_epochs)        # training only: a new order every epoch
      .map_with_index(tag each element with its epoch)
      [this process's block of every global batch]    # per-process shard (_ProcessBlocks)
      .map(load)                                      # decode frames, build tokens, pad videos
      .to_iter_dataset(ReadOptions(...))
      .mp_prefetch(MultiprocessingOptions(num_workers))   # when num_workers > 0
      .filter(count and drop skipped samples)         # training; runs in this process
      .batch(batch_size, batch_fn=pad to a text bucket)

``iter(pipeline)`` is a ``grain.DatasetIterator``: ``get_state`` / ``set_state`` and
``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` (with Orbax) resume it exactly.
Training frames are drawn with ``mode="random"`` from ``np.random.default_rng([seed, epoch,
sample_id])``, so a resumed run decodes the same frames; evaluation uses ``mode="uniform"``.

Static shapes. Text is right-padded to the smallest bucket of ``buckets`` that holds the batch's
longest sample (the choice made here: pad each batch to its own bucket, which keeps the sample order
— and so determinism and resumption — independent of lengths; a batch compiles one of
``len(buckets)`` shapes). Videos are grouped by frame count (``"f12"``, ``"f96"``; one ``"f64"`` group
in the HEAD setting); each group is padded to a fixed number of videos per sample (the config's caps,
else the largest count any sample of the run needs) with ``video_mask``. Frames are not padded
per slot: each sample carries only its real frames (a frame record, ``SampleLoader.pack``), and the
:class:`Batcher` packs a batch's into the ViT's frame pool, one pool per block of rows (per
data-parallel shard), its size the smallest of ``frame_pool`` (frames per row) that holds them
(``data/batch.py``; training batches reorder their rows when that needs smaller pools; several
processes agree the size with one small all-gather per batch).

The batch's arrays, shapes, dtypes and padding values are those of ``ivcr_jax.data.batch``
(:class:`~ivcr_jax.data.batch.BatchLayout`).

The video-token sequence of a sample is, group by group in sorted group-name order, slot by slot
(padded slots included), each video's ``n_tok = 32·ceil(T/32)`` tokens: the model computes
``[B, V, n_tok, D]`` per group, flattens and concatenates the groups, and gathers with
``video_token_index``. Timestamp texts are "This frame is sampled at {t} second." tokenised with
the LLaMA tokenizer including BOS (TimeChat's quirk, reproduced on purpose: the released image
Q-Former weights were trained on LLaMA ids fed to BERT embeddings), truncated to ``timestamp_len``
(TimeChat: ``max_length=32``) and right-padded with the pad id 2 under ``timestamp_mask``.

Batching runs in this process, after the (optional) worker processes: skipped samples are counted
where the counters live and a batch is always full. Workers decode and pad each sample.

A sample the builder rejects is skipped and counted (``Pipeline.stats``, ``Pipeline.summary()``),
and the run goes on: its video is missing or corrupt (``frames.VideoError``), it cannot fit even
without history (``samples.SampleTooLong``), its text holds the template's special strings
(``samples.SampleError``), or its moment span ends past the decoded video (:func:`check_span`,
``samples.SpanBeyondVideo``). In training it is filtered out; in evaluation it becomes a weight-0
row (its ``sample_id`` kept), so every process yields the same number of batches. Counts are of
distinct samples: a sample skipped in every epoch counts once (the draws are counted beside).

Config (:class:`PipelineConfig`; :meth:`PipelineConfig.from_config` reads an ml_collections
``config.data`` node with keys ``retrieval_frames, moment_frames, frame_size, timestamp_len,
max_turns, max_sample_turns, max_len, text_buckets, max_retrieval_videos, max_moment_videos,
workers, decode_threads, video_root, prepared, vit_features, frame_pool`` — missing keys keep the defaults).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import threading
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from ivcr_jax.cli import UsageError
from ivcr_jax.data import frames as frames_lib
from ivcr_jax.data.batch import ROW, TEXT_PAD, BatchLayout
from ivcr_jax.data.samples import (
    Sample, SampleConfig, SampleError, SampleRef, SpanBeyondVideo, VideoRequest, build_sample, group_name,
    kind_code, prefix_videos,
)
from ivcr_jax.data.schema import MOMENT, Dialogue

log = logging.getLogger(__name__)

# How far past the decoded end of its video a moment span may end. The annotation's times come from
# the source's metadata, the decoded duration from the file as transcoded (frames / average fps):
# the two differ by a trailing GOP or a few dropped frames, and the average-fps estimate of a
# variable-frame-rate file by a per cent or two, so a span ending at the source's "end of video" is
# not an error. Much beyond that the span belongs to another video or is in another unit.
SPAN_TOLERANCE_S = 0.5
SPAN_TOLERANCE_FRACTION = 0.02


def span_tolerance(duration: float) -> float:
    """Seconds a span may end past a video of ``duration`` seconds: max(0.5 s, 2 %)."""
    return max(SPAN_TOLERANCE_S, SPAN_TOLERANCE_FRACTION * float(duration))


def check_span(dialogue: Dialogue, turn_idx: int, duration: float, video: str) -> None:
    """Raise :class:`~ivcr_jax.data.samples.SpanBeyondVideo` when turn ``turn_idx`` is a moment
    turn whose ``gt_se`` ends past ``duration`` (the decoded length of ``video``, its ground-truth
    video) by more than :func:`span_tolerance`. Other turns pass."""
    turn = dialogue.turns[turn_idx]
    if turn.kind != MOMENT or turn.gt_se is None:
        return
    tol = span_tolerance(duration)
    if turn.gt_se[1] > float(duration) + tol:
        raise SpanBeyondVideo(
            f"dialogue {dialogue.index} ({dialogue.id!r}) turn {turn_idx} (text_id {turn.text_id!r}): gt_se "
            f"[{turn.gt_se[0]:g}, {turn.gt_se[1]:g}] ends past the end of {video} ({float(duration):.2f} s "
            f"decoded, {tol:.2f} s tolerance)")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Batching, decoding and parallelism; ``sample`` says how samples are built."""

    sample: SampleConfig = SampleConfig()
    batch_size: int = 1
    buckets: tuple[int, ...] = (512, 1024, 2048, 4096)
    frame_size: int = 224
    timestamp_len: int = 32  # TimeChat: max_length=32, truncation=True
    num_epochs: int | None = None  # training passes over the data; None = repeat forever
    drop_remainder: bool = True  # training only; evaluation pads its last batch with weight-0 rows
    num_workers: int = 0  # Grain worker processes (0: decode in this process)
    worker_buffer_size: int = 1
    read_threads: int = 1  # threads that run `load` when num_workers == 0 (each holds a sample)
    read_prefetch: int = 2
    decode_threads: int = 0  # decord threads per video; 0 = auto (:meth:`decoder_threads`)
    cache_videos: int = 0  # videos kept decoded (every frame, at frame_size) in memory; 0 = none
    prepared: str | None = None  # a dataset written by ivcr_jax.data.prepare (else raw videos)
    vit_features: str | None = None  # a ViT feature cache (data/features.py): the pool holds features
    # The ViT's frame pool (data/batch.py): capacities in frames per batch row, () = every slot;
    # pack_groups pools per (this process's) batch, one per data-parallel shard (Experiment.pipeline).
    frame_pool: tuple[int, ...] = ()
    pack_groups: int = 1

    def decoder_threads(self) -> int:
        """Decoder threads per video: ``decode_threads``, or with 0 the host's cores shared among
        the loaders that decode at once (``num_workers`` processes, or ``read_threads`` threads
        without workers). A video decodes 1.5x faster with 2 threads than with 1 on 2 idle cores,
        and more threads than cores only contend (docs/benchmarks.md, "Input pipeline")."""
        if self.decode_threads > 0:
            return self.decode_threads
        loaders = self.num_workers if self.num_workers > 0 else self.read_threads
        return max(1, (os.cpu_count() or 1) // max(1, loaders))

    def __post_init__(self):
        pool = tuple(self.frame_pool or ())
        if any(int(c) <= 0 for c in pool) or list(pool) != sorted(set(pool)):
            raise ValueError(f"frame_pool must be increasing positive frame counts, got {self.frame_pool}")
        if self.pack_groups <= 0:
            raise ValueError(f"pack_groups must be positive, got {self.pack_groups}")
        if not self.buckets or list(self.buckets) != sorted(self.buckets):
            raise ValueError(f"buckets must be a non-empty increasing tuple, got {self.buckets}")
        if self.sample.max_len > self.buckets[-1]:
            raise ValueError(f"sample.max_len {self.sample.max_len} exceeds the largest text bucket "
                             f"{self.buckets[-1]}; samples could not be padded to a static shape")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")

    @classmethod
    def from_config(cls, d: Any, **overrides) -> "PipelineConfig":
        """From an ml_collections ``config.data`` node (or any mapping / attribute object)."""
        def get(k, default):
            try:
                v = d[k] if isinstance(d, Mapping) else getattr(d, k)
            except (KeyError, AttributeError):
                return default
            return default if v is None and default is not None else v

        sc = SampleConfig()
        sample = SampleConfig(
            retrieval_frames=int(get("retrieval_frames", sc.retrieval_frames)),
            moment_frames=int(get("moment_frames", sc.moment_frames)),
            max_turns=int(get("max_turns", sc.max_turns)),
            max_sample_turns=get("max_sample_turns", sc.max_sample_turns),
            long_prefix=get("long_prefix", sc.long_prefix),
            max_len=int(get("max_len", sc.max_len)),
            max_retrieval_videos=get("max_retrieval_videos", None),
            max_moment_videos=get("max_moment_videos", None),
            frame_message=bool(get("frame_message", sc.frame_message)),
            double_dot=bool(get("double_dot", sc.double_dot)),
            video_root=get("video_root", None) or None,
        )
        kw = dict(
            sample=sample,
            buckets=tuple(int(b) for b in get("text_buckets", cls.buckets)),
            frame_size=int(get("frame_size", cls.frame_size)),
            timestamp_len=int(get("timestamp_len", cls.timestamp_len)),
            num_workers=int(get("workers", cls.num_workers)),
            decode_threads=int(get("decode_threads", cls.decode_threads)),
            cache_videos=int(get("cache_videos", cls.cache_videos)),
            prepared=get("prepared", None) or None,
            vit_features=get("vit_features", None) or None,
            frame_pool=tuple(int(c) for c in (get("frame_pool", ()) or ())),
        )
        kw.update(overrides)
        return cls(**kw)


class RawVideos:
    """Decodes videos from files with ``frames.load_frames``.

    With ``cache > 0`` the last ``cache`` videos used are kept decoded in memory, every frame at
    ``size`` (``frames.decode_video``), and requests sample from there: the same frames, without
    decoding each video again for every sample that shows it. For corpora that fit in memory
    (the demo's 124 clips at 56 px: ~120 MB).
    """

    def __init__(self, size: int, decode_threads: int = 1, cache: int = 0):
        self.size, self.decode_threads, self.cache = size, decode_threads, int(cache)
        self._decoded: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):  # Grain workers get a copy: without the lock (unpicklable) and the cache
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_decoded")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._decoded, self._lock = collections.OrderedDict(), threading.Lock()

    def load(self, req: VideoRequest, mode: str, rng: np.random.Generator | None) -> frames_lib.Frames:
        if self.cache <= 0:
            return frames_lib.load_frames(req.path, req.num_frames, mode=mode, rng=rng, size=self.size,
                                          num_threads=self.decode_threads)
        key = str(req.path)
        with self._lock:
            video = self._decoded.get(key)
            if video is not None:
                self._decoded.move_to_end(key)
        if video is None:
            video = frames_lib.decode_video(req.path, size=self.size, num_threads=self.decode_threads)
            with self._lock:
                self._decoded[key] = video
                while len(self._decoded) > self.cache:
                    self._decoded.popitem(last=False)
        return video.frames(req.num_frames, mode=mode, rng=rng)

    def load_many(self, reqs: Sequence[VideoRequest], mode: str, rng: np.random.Generator | None) -> dict:
        """``{(path, num_frames): Frames}`` of a sample's requests: each file opened once and decoded in
        one pass for all its frame counts (``frames.VideoFile``). The indices are drawn in request
        order, as calling :meth:`load` per distinct (path, frame count) draws them, so the frames are
        the same."""
        keys = list(dict.fromkeys((r.path, r.num_frames) for r in reqs))
        if self.cache > 0:
            by_key = {(r.path, r.num_frames): r for r in reqs}
            return {k: self.load(by_key[k], mode, rng) for k in keys}
        last = {path: i for i, (path, _) in enumerate(keys)}
        open_: dict[str, tuple[frames_lib.VideoFile, list]] = {}
        out = {}
        try:
            for i, (path, n) in enumerate(keys):
                if path not in open_:
                    open_[path] = (frames_lib.VideoFile(path, size=self.size, num_threads=self.decode_threads), [])
                video, wanted = open_[path]
                wanted.append((n, frames_lib.sample_indices(video.num_frames, n, mode, rng)))
                if last[path] == i:  # every frame count of this file drawn: one decode pass, then close
                    for (m, _), f in zip(wanted, video.frames([ix for _, ix in wanted])):
                        out[(path, m)] = f
                    open_.pop(path)[0].close()
        finally:
            for video, _ in open_.values():
                video.close()
        return out

    def __repr__(self):
        return f"RawVideos(size={self.size})"


class EverySampleSkipped(UsageError):
    """The pipeline met only skipped samples for ``max_consecutive_skips`` draws (a wrong video root,
    a corrupt corpus): one line with the reasons; a program exits 2 on it (``cli.run``)."""


@dataclasses.dataclass
class PipelineStats:
    """Counts of what the pipeline read, skipped or shortened (as seen by this process since creation).

    ``counts``: ``samples`` is the samples read (draws: one read in 3 epochs counts 3) and
    ``distinct_samples`` the different ones among them; ``skipped_<reason>``,
    ``samples_with_history_dropped`` and ``history_turns_dropped`` count **distinct** samples (one
    skipped in every epoch counts once; :attr:`skipped` is their sum); ``draws_skipped`` is the draws
    that were skipped. Reasons: ``video``, ``too_long``, ``bad_text``, ``span_beyond_video``.
    """

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    errors: list[str] = dataclasses.field(default_factory=list)
    max_errors: int = 20
    # A run that only ever skips (a wrong video root, a corrupt corpus) would otherwise spin
    # forever in training: stop it with the reasons instead.
    max_consecutive_skips: int = 1000
    _run: int = 0
    _skipped_ids: set = dataclasses.field(default_factory=set, repr=False)
    _read_ids: set = dataclasses.field(default_factory=set, repr=False)
    _shortened_ids: set = dataclasses.field(default_factory=set, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def record(self, el: Mapping) -> None:
        with self._lock:
            sid = int(el.get("sample_id", -1))
            if el.get("skip"):
                self.counts["draws_skipped"] += 1
                self._run += 1
                if sid not in self._skipped_ids:  # a sample met again in a later epoch is not a new skip
                    self._skipped_ids.add(sid)
                    self.counts[f"skipped_{el['skip']}"] += 1
                    if len(self.errors) < self.max_errors:
                        self.errors.append(el.get("error", ""))
                        log.warning("skipped sample %s: %s", sid, el.get("error", ""))
                if self._run >= self.max_consecutive_skips:
                    reasons = ", ".join(f"{k.removeprefix('skipped_')}: {v}" for k, v in sorted(self.counts.items())
                                        if k.startswith("skipped_"))
                    raise EverySampleSkipped(
                        f"{self._run} consecutive samples were skipped ({self.skipped} distinct; {reasons}; "
                        f"e.g. {self.errors[0] if self.errors else '?'}); is the video root right?")
            elif el.get("pad_row"):
                pass
            else:
                self._run = 0
                self.counts["samples"] += 1
                if sid not in self._read_ids:
                    self._read_ids.add(sid)
                    self.counts["distinct_samples"] += 1
                if el.get("dropped_turns", 0) and sid not in self._shortened_ids:
                    self._shortened_ids.add(sid)
                    self.counts["samples_with_history_dropped"] += 1
                    self.counts["history_turns_dropped"] += int(el["dropped_turns"])

    @property
    def skipped(self) -> int:
        """Distinct samples skipped."""
        return sum(v for k, v in self.counts.items() if k.startswith("skipped_"))

    def summary(self) -> str:
        c = self.counts
        draws = c["draws_skipped"]
        parts = [f"{c['samples']} samples read ({c['distinct_samples']} distinct)",
                 f"{self.skipped} skipped (distinct samples; {draws} draw{'' if draws == 1 else 's'})"]
        parts += [f"{k.removeprefix('skipped_')}: {v}" for k, v in sorted(c.items()) if k.startswith("skipped_")]
        parts.append(f"{c['history_turns_dropped']} history turns dropped from "
                     f"{c['samples_with_history_dropped']} over-long samples")
        lines = ["input pipeline: " + ", ".join(parts)]
        lines += [f"  e.g. {e}" for e in self.errors[:5]]
        return "\n".join(lines)


def group_frames(cfg: SampleConfig) -> dict[str, int]:
    """Frame count of each video group of the config."""
    return {group_name(n): n for n in (cfg.retrieval_frames, cfg.moment_frames)}


def batch_layout(cfg: PipelineConfig, capacity: Mapping[str, int]) -> BatchLayout:
    """The batch layout of ``cfg`` with ``capacity`` videos per sample in each group."""
    frames = group_frames(cfg.sample)
    return BatchLayout({g: (int(capacity[g]), frames[g]) for g in frames}, cfg.frame_size, cfg.timestamp_len,
                       tuple(cfg.frame_pool), int(cfg.pack_groups))


def group_capacity(cfg: SampleConfig, samples: Sequence[SampleRef]) -> dict[str, int]:
    """Videos per sample of each group: the config's caps, else the largest count in ``samples``."""
    caps = cfg.group_capacity()
    if any(v is None for v in caps.values()):
        need: dict[str, int] = {g: 0 for g in caps}
        for ref in samples:
            if ref is None:
                continue
            counts = collections.Counter(v.group for v in prefix_videos(ref.dialogue, ref.turn_idx, cfg))
            for g, n in counts.items():
                need[g] = max(need[g], n)
        caps = {g: (need[g] if c is None else c) for g, c in caps.items()}
    return {g: max(int(c), 1) for g, c in caps.items()}  # at least one slot: static, non-empty shapes


class _TagEpoch:
    """``(index, ref)`` → ``(epoch, ref)`` for a dataset of ``n`` samples repeated."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, i: int, ref):
        return i // self.n, ref


class SampleLoader:
    """``(epoch, SampleRef | None)`` → one sample's arrays (the text unpadded), or a skip record.

    ``pack`` turns an already built :class:`~ivcr_jax.data.samples.Sample` and its decoded frames
    into the same arrays (inference prompts, ``ivcr_jax.data.prompts``).
    """

    def __init__(self, cfg: PipelineConfig, tokenizer, layout: BatchLayout, *, train: bool, seed: int, videos):
        self.cfg, self.tokenizer, self.layout = cfg, tokenizer, layout
        self.train, self.seed, self.videos = train, int(seed), videos
        self._ts_cache: dict[str, list[int]] = {}

    def timestamp_tokens(self, t: float) -> list[int]:
        text = frames_lib.timestamp_text(t)
        ids = self._ts_cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text)["input_ids"])[: self.cfg.timestamp_len]  # with BOS
            self._ts_cache[text] = ids
        return ids

    def __call__(self, item):
        epoch, ref = item
        if ref is None:
            return {"pad_row": True}
        scfg = self.cfg.sample
        rng = np.random.default_rng([self.seed, int(epoch), int(ref.sample_id)]) if self.train else None
        mode = "random" if self.train else "uniform"
        decoded: dict[tuple[str, int], frames_lib.Frames] = {}
        reqs = prefix_videos(ref.dialogue, ref.turn_idx, scfg)
        try:
            if hasattr(self.videos, "load_many"):  # each file opened once, one decode pass per file
                decoded = self.videos.load_many(reqs, mode, rng)
            else:
                for r in reqs:
                    key = (r.path, r.num_frames)
                    if key not in decoded:  # a video shown twice in a sample is decoded once
                        decoded[key] = self.videos.load(r, mode, rng)
        except frames_lib.VideoError as e:
            return {"skip": "video", "sample_id": ref.sample_id, "error": f"sample {ref.key}: {e}"}
        timestamps = {r.turn: decoded[(r.path, r.num_frames)].timestamps for r in reqs if r.role == "moment"}
        try:
            for r in reqs:  # the supervised turn's span, against its own (ground-truth) video
                if r.role == "moment" and r.turn == ref.turn_idx:
                    check_span(ref.dialogue, ref.turn_idx, decoded[(r.path, r.num_frames)].duration, r.video_id)
            s = build_sample(ref.dialogue, ref.turn_idx, self.tokenizer, scfg, timestamps=timestamps,
                             sample_id=ref.sample_id)
        except SampleError as e:  # too long, text holding special strings, a span past the video
            return {"skip": e.reason, "sample_id": ref.sample_id, "error": str(e)}
        return self.pack(s, decoded)

    def pack(self, s: Sample, decoded) -> dict:
        """The sample's arrays: its video masks, and its real frames only, as a frame record
        (``BatchLayout.frame_record``: each frame with its slot among the row's K), which the
        :class:`Batcher` packs into the batch's frame pool."""
        pix, want = next((k, f.shape) for k, f in self.layout.pool_fields().items() if k in ("frames", "vit_features"))
        groups = self.layout.empty_videos()
        offsets = self.layout.slot_offsets()
        duration = -1.0
        shown = []
        for v, slot in zip(s.videos, s.video_slots()):
            f = decoded[(v.path, v.num_frames)]
            gr, n = groups[v.group], min(len(f.pixels), v.num_frames)
            if f.pixels.shape[1:] != want:
                raise ValueError(f"{v.path}: {pix} of shape {f.pixels.shape[1:]}, expected {want}")
            gr["frame_mask"][slot, :n] = True
            gr["video_mask"][slot] = True
            shown.append((offsets[v.group] + slot * self.layout.groups[v.group][1], f, n))
            if v.role == "moment" and v.turn == s.turn_idx:
                duration = float(f.duration)
        rec = self.layout.frame_record(sum(n for _, _, n in shown))
        i = 0
        for first, f, n in shown:
            rec["slot"][i:i + n] = first + np.arange(n)
            rec[pix][i:i + n] = f.pixels[:n]
            for j, t in enumerate(f.timestamps[:n]):
                ids = self.timestamp_tokens(float(t))
                rec["timestamp_ids"][i + j, : len(ids)] = ids
                rec["timestamp_mask"][i + j, : len(ids)] = 1
            i += n
        span = s.gt_span if s.gt_span is not None else (-1.0, -1.0)
        return {
            "input_ids": s.input_ids,
            "labels": s.labels,
            "video_token_index": s.video_token_index({g: v for g, (v, _) in self.layout.groups.items()}),
            "videos": groups,
            "frames": rec,
            "kind": np.int32(kind_code(s.kind)),
            "target_index": np.int32(s.target_index - 1 if s.target_index is not None else -1),
            "gt_span": np.asarray(span, np.float32),
            "duration": np.float32(duration),
            "sample_id": np.int32(s.sample_id),
            "weight": np.float32(1.0),
            "dropped_turns": np.int32(s.dropped_turns),
        }


class _ProcessBlocks(grain.MapDataset):
    """Process ``index`` of ``count`` reads, of each run of ``count·b`` consecutive elements (one
    global batch), the block ``[index·b, (index+1)·b)``: stacked in process order the local batches
    form the same global batch, rows in the same order, as one process reading with batch
    ``count·b`` — so a run's losses do not depend on how many hosts feed it (as long as no sample
    is skipped: a skip shifts only the stream of the process that met it)."""

    def __init__(self, parent, index: int, count: int, local_batch: int):
        super().__init__(parent)
        self._index, self._count, self._b = index, count, local_batch
        n, span = len(parent), local_batch * count
        self._len = (n // span) * local_batch + min(local_batch, max(0, n % span - index * local_batch))

    def __len__(self):
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        g, r = divmod(i, self._b)
        return self._parent[(g * self._count + self._index) * self._b + r]

    def __str__(self):
        return f"ProcessBlocks[{self._index} of {self._count}, {self._b} rows]"


def pad_text(batch: dict, length: int) -> dict:
    """Right-pad the ``[B, S]`` text arrays of a batch to ``length`` (another bucket)."""
    S = batch["input_ids"].shape[1]
    if length < S:
        raise ValueError(f"cannot pad a batch of {S} tokens to {length}")
    if length == S:
        return batch
    out = dict(batch)
    for k, v in TEXT_PAD.items():
        out[k] = np.pad(batch[k], ((0, 0), (0, length - S)), constant_values=v)
    return out


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest text bucket that holds ``n`` tokens."""
    for b in buckets:
        if n <= b:
            return int(b)
    raise ValueError(f"a sample of {n} tokens exceeds the largest text bucket {buckets[-1]}")


class Batcher:
    """Stacks samples into the layout, text padded to a bucket, the batch to ``batch_size`` rows (weight 0),
    the rows' real frames packed into the batch's frame pool (``BatchLayout.pack``).

    ``balance`` (training): reorder the rows when another order needs smaller pools (the pools serve
    consecutive blocks of rows, one per data-parallel shard; the loss does not depend on the order).
    ``agree(F) -> F'``: several processes agree the frames per pool (each builds its own rows).
    """

    def __init__(self, layout: BatchLayout, buckets: Sequence[int], batch_size: int, *, balance: bool = False,
                 agree=None):
        self.layout, self.buckets, self.batch_size = layout, tuple(buckets), int(batch_size)
        self.balance, self.agree = bool(balance), agree

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        rows = list(rows)
        if self.balance:
            order = self.layout.balanced_order([len(r["frames"]["slot"]) if "frames" in r else 0 for r in rows],
                                               self.batch_size)
            if order is not None:
                rows = [rows[i] if i < len(rows) else {"pad_row": True} for i in order]
        real = [r for r in rows if "input_ids" in r]
        S = bucket_for(max([len(r["input_ids"]) for r in real], default=1), self.buckets)
        out = self.layout.empty(self.batch_size, S, frames=[r.get("frames") for r in rows], agree=self.agree)
        for i, r in enumerate(rows):
            if "input_ids" not in r:  # a skipped sample (evaluation) or a padding row
                if r.get("skip"):
                    out["sample_id"][i] = r["sample_id"]
                continue
            n = len(r["input_ids"])
            out["input_ids"][i, :n] = r["input_ids"]
            out["attention_mask"][i, :n] = 1
            out["labels"][i, :n] = r["labels"]
            out["video_token_index"][i, :n] = r["video_token_index"]
            for g, arrs in r["videos"].items():
                for k, a in arrs.items():
                    out["videos"][g][k][i] = a
            for k in ROW:
                out[k][i] = r[k]
        return out


def _agree_largest(n: int) -> int:
    """The largest ``n`` of every process (one small all-gather; each process calls it per batch)."""
    # Lazy: distributed.py imports jax, which only a pipeline of several processes needs here.
    from ivcr_jax import distributed

    return int(np.max(distributed.allgather(np.int64(n))))


class Pipeline:
    """A configured input pipeline. ``iter()`` gives a checkpointable ``grain.DatasetIterator``."""

    def __init__(self, dataset, stats: PipelineStats, capacity: Mapping[str, int], num_local: int,
                 cfg: PipelineConfig, train: bool):
        self.dataset, self.stats, self.capacity = dataset, stats, dict(capacity)
        self.num_local_samples, self.cfg, self.train = num_local, cfg, train

    def __iter__(self):
        return iter(self.dataset)

    @property
    def num_batches(self) -> int | None:
        """Batches per process in evaluation (None in training: it depends on skips and epochs)."""
        return None if self.train else math.ceil(self.num_local_samples / self.cfg.batch_size)

    def summary(self) -> str:
        return self.stats.summary()


def make_pipeline(
    cfg: PipelineConfig,
    samples: Sequence[SampleRef],
    *,
    train: bool,
    seed: int,
    tokenizer,
    process_index: int | None = None,
    process_count: int | None = None,
    videos=None,
) -> Pipeline:
    """Build the Grain pipeline over ``samples`` (from :func:`samples.enumerate_samples`).

    Args:
      train: shuffle every epoch, sample frames at random, drop skipped samples; else one ordered
        pass with uniform frames, skipped samples as weight-0 rows, last batch padded.
      seed: the shuffle seed and the frame-sampling seed.
      tokenizer: from ``ivcr_jax.tokenizer.load_tokenizer`` (must know ``<VIDEOTOKEN>``).
      process_index / process_count: the shard to read (default: ``jax.process_index/count()``).
      videos: where frames come from: an object with ``load(request, mode, rng) -> Frames``;
        default ``features.VitFeatures(cfg.vit_features)`` when ``cfg.vit_features`` is set (the pool
        then holds ViT features), ``prepare.PreparedVideos(cfg.prepared)`` when ``cfg.prepared`` is set, else
        :class:`RawVideos` decoding the files.
    """

    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if not samples:
        raise ValueError("no samples to iterate over")
    features = None
    if videos is None and cfg.vit_features:
        # Lazy: features.py imports tensorflow_datasets (through prepare.py).
        from ivcr_jax.data.features import VitFeatures

        videos = features = VitFeatures(cfg.vit_features, size=cfg.frame_size)
    if videos is None:
        if cfg.prepared:
            # Lazy: prepare.py imports tensorflow_datasets, a heavy optional dependency of raw-video runs.
            from ivcr_jax.data.prepare import PreparedVideos

            videos = PreparedVideos(cfg.prepared, size=cfg.frame_size)
        else:
            videos = RawVideos(cfg.frame_size, cfg.decoder_threads(), cfg.cache_videos)
    capacity = group_capacity(cfg.sample, samples)
    stats = PipelineStats()
    samples = list(samples)

    if train:
        n = len(samples)
        ds = grain.MapDataset.source(samples).seed(seed).shuffle().repeat(cfg.num_epochs)
        ds = ds.map_with_index(_TagEpoch(n))
        if process_count > 1:
            ds = _ProcessBlocks(ds, process_index, process_count, cfg.batch_size)
        num_local = len(ds) if cfg.num_epochs is not None else -1
    else:
        local = samples[process_index::process_count]
        per_process = math.ceil(len(samples) / process_count)
        # Equal counts on every process, so that multi-host evaluation stays in lock-step.
        local = [(0, r) for r in local] + [(0, None)] * (per_process - len(local))
        ds = grain.MapDataset.source(local)
        num_local = per_process
    layout = batch_layout(cfg, capacity)
    if features is not None:
        layout = dataclasses.replace(layout, vit_features=features.feature_spec)
    ds = ds.map(SampleLoader(cfg, tokenizer, layout, train=train, seed=seed, videos=videos))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_prefetch))
    if cfg.num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))

    def keep(el) -> bool:
        stats.record(el)
        return not (train and el.get("skip"))

    it = it.filter(keep)
    it = it.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder if train else False,
                  batch_fn=Batcher(layout, cfg.buckets, cfg.batch_size, balance=train,
                                   agree=_agree_largest if process_count > 1 else None))
    return Pipeline(it, stats, capacity, num_local, cfg, train)


__all__ = ["EverySampleSkipped", "PipelineConfig", "Pipeline", "PipelineStats", "RawVideos", "SampleLoader", "Batcher",
           "make_pipeline", "batch_layout", "bucket_for", "check_span", "group_capacity", "group_frames", "pad_text",
           "span_tolerance"]
