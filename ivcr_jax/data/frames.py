"""Video frames through decord: frame sampling, timestamps and the timestamp texts.

Follows reference-architecture §1 (input normalisation), §2 (per-frame timestamp text) and §3
(frame sampling; the TimeChat/IVCR ``load_video`` in ``processors/video_processor.py``).

What the reference does, and where this file differs:

* Decoding: ``decord.VideoReader(path, width=size, height=size)`` then one ``get_batch``; frames are
  resized straight to ``size x size`` by the decoder, the aspect ratio is not kept (as the reference).
* Timestamps: ``round(idx / fps, 1)`` with ``fps = vr.get_avg_fps()`` (as the reference).
* ``"uniform"`` (evaluation) takes the middle frame of each of ``num_frames`` equal segments,
  ``floor((i + 1/2) * vlen / num_frames)``. The reference's ``load_video(sampling="uniform")`` takes
  the *first* frame of each segment, ``np.arange(0, vlen, vlen / n).astype(int)``; that variant is
  available as ``mode="timechat"`` for runs that must see exactly the reference's frames.
* ``"random"`` (training) draws one frame uniformly from each equal segment. The reference
  (``sampling="rand"``) draws from ``range(start, end - 1)``, which never picks the last frame of a
  segment and falls back to a random permutation when a segment has fewer than two frames; both are
  accidents of that code and are not reproduced.
* Short videos: when the video has fewer frames than ``num_frames`` the reference returns only
  ``vlen`` frames. Here indices repeat instead, so every video yields exactly ``num_frames`` frames
  and compiled shapes stay static. Repeated frames carry their true (repeated) timestamps.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

# File suffixes taken for videos when a corpus directory is listed (chat, retriever index).
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MODES = ("uniform", "random", "timechat")


class VideoError(Exception):
    """A video that cannot be used: missing, unreadable / corrupt, or without frames."""


@dataclasses.dataclass(frozen=True)
class Frames:
    pixels: np.ndarray  # uint8 [T, size, size, 3], RGB
    timestamps: np.ndarray  # float32 [T], seconds, round(idx / fps, 1)
    indices: np.ndarray  # int64 [T], frame indices into the video
    duration: float  # seconds, num_video_frames / fps
    fps: float


def sample_indices(
    num_video_frames: int, num_frames: int, mode: str, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Frame indices ``int64 [num_frames]``, non-decreasing, all in ``[0, num_video_frames)``.

    Segment ``i`` of ``num_frames`` equal segments covers frames
    ``[floor(i * V / N), floor((i + 1) * V / N))`` (V = video frames, N = ``num_frames``); integer
    arithmetic keeps the boundaries exact.

    * ``"uniform"``: the middle frame of each segment.
    * ``"random"``: one frame drawn uniformly from each segment; needs ``rng``. A segment shorter
      than one frame (V < N) contributes its start frame, so indices repeat.
    * ``"timechat"``: the first frame of each segment, as the reference's ``sampling="uniform"``.
    """
    v, n = int(num_video_frames), int(num_frames)
    if v <= 0:
        raise ValueError(f"num_video_frames must be positive, got {v}")
    if n <= 0:
        raise ValueError(f"num_frames must be positive, got {n}")
    i = np.arange(n, dtype=np.int64)
    if mode == "uniform":
        return ((2 * i + 1) * v) // (2 * n)
    if mode == "timechat":
        if v >= n:
            # The reference's exact float arithmetic (it can differ from i * v // n by rounding).
            return np.arange(0, v, v / n).astype(np.int64)[:n]
        return (i * v) // n
    if mode == "random":
        if rng is None:
            raise ValueError("mode='random' needs an rng (np.random.Generator)")
        start = (i * v) // n
        stop = np.maximum(((i + 1) * v) // n, start + 1)
        return start + np.floor(rng.random(n) * (stop - start)).astype(np.int64)
    raise ValueError(f"unknown sampling mode {mode!r}; expected one of {MODES}")


def frame_timestamps(indices: np.ndarray, fps: float) -> np.ndarray:
    """``round(idx / fps, 1)`` per frame (Python rounding, as the reference), float32."""
    return np.array([round(int(k) / fps, 1) for k in indices], dtype=np.float32)


def _fmt(t: float) -> str:
    # The reference prints Python floats: str(round(idx / fps, 1)) -> "0.0", "1.2", "12.0".
    # Re-rounding undoes the float32 storage (float32(1.2) prints as 1.2000000476837158).
    return str(round(float(t), 1))


def timestamp_text(t: float) -> str:
    """The per-frame text fed to the image Q-Former (reference-architecture §2)."""
    return f"This frame is sampled at {_fmt(t)} second."


def frames_message(timestamps) -> str:
    """The frame-time message of a moment turn, as returned by IVCR's ``load_video``.

    ``"The video contains N frames sampled at t1, t2, ..., tN seconds"`` with no final period: the
    IVCR dataset inserts it as ``"</VIDEO>. " + message + rest_of_turn``, where the rest starts with
    ``"."`` (reference-architecture §8.3). TimeChat's own copy ends in ``" seconds. "`` instead.
    """
    ts = [_fmt(t) for t in np.asarray(timestamps).reshape(-1)]
    return f"The video contains {len(ts)} frames sampled at {', '.join(ts)} seconds"


def normalize(pixels_uint8: np.ndarray) -> np.ndarray:
    """CLIP normalisation ``(x / 255 - mean) / std`` over the last (RGB) axis, float32."""
    x = np.asarray(pixels_uint8, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    return (x - mean) / std


def load_frames(
    path: str | os.PathLike,
    num_frames: int,
    *,
    mode: str = "uniform",
    rng: np.random.Generator | None = None,
    size: int = 224,
    num_threads: int = 1,
) -> Frames:
    """Decodes ``num_frames`` frames of ``path`` resized to ``size x size`` RGB uint8.

    ``num_threads`` is decord's decoder thread count (0 = decord's automatic choice); the default 1
    suits data loaders that already run one decoder per worker process.
    Raises ``VideoError`` naming the file when it is missing, unreadable or has no frames.
    """
    return _decode(path, size, num_threads, lambda vlen: sample_indices(vlen, num_frames, mode, rng))


@dataclasses.dataclass(frozen=True)
class DecodedVideo:
    """Every frame of a video at one size (:func:`decode_video`), to sample from repeatedly."""

    pixels: np.ndarray  # uint8 [N, size, size, 3]
    fps: float

    def frames(self, num_frames: int, *, mode: str = "uniform", rng: np.random.Generator | None = None) -> Frames:
        """The frames :func:`load_frames` decodes for the same arguments, taken from memory."""
        n = len(self.pixels)
        indices = sample_indices(n, num_frames, mode, rng)
        return Frames(pixels=np.ascontiguousarray(self.pixels[indices]), timestamps=frame_timestamps(indices, self.fps),
                      indices=indices, duration=n / self.fps, fps=self.fps)


def decode_video(path: str | os.PathLike, *, size: int = 224, num_threads: int = 1) -> DecodedVideo:
    """All frames of ``path`` at ``size x size`` (for small corpora kept in memory)."""
    f = _decode(path, size, num_threads, lambda vlen: np.arange(vlen))
    return DecodedVideo(f.pixels, f.fps)


def _decode(path, size: int, num_threads: int, choose) -> Frames:
    """Open ``path``, decode the frames ``choose(num_frames_in_file)`` picks."""
    with VideoFile(path, size=size, num_threads=num_threads) as v:
        return v.frames([choose(v.num_frames)])[0]


class VideoFile:
    """One open video (decord, frames resized to ``size x size`` by the decoder): its frame count
    and fps, and the frames of several index sets decoded in **one** ``get_batch`` pass.

    Decord's ``get_batch`` over sorted indices decodes forward within a key-frame interval and seeks
    only to a later interval (or backwards), so one call over the union of a sample's index sets
    (a moment video that is also a retrieval candidate: 96 + 12 frames) costs one decode pass, not
    two; the frames are those :func:`load_frames` decodes for each set (bit-identical).
    Raises ``VideoError`` naming the file when it is missing, unreadable or has no frames.
    """

    def __init__(self, path: str | os.PathLike, *, size: int = 224, num_threads: int = 1):
        self.path = path = Path(path)
        self.size = int(size)
        if not path.is_file():
            raise VideoError(f"{path}: video file not found")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        import decord  # imported here so that the rest of the package does not need it

        try:
            self._vr = decord.VideoReader(str(path), width=size, height=size, num_threads=num_threads)
        except Exception as e:  # decord raises RuntimeError / DECORDError on unreadable files
            raise VideoError(f"{path}: cannot open video ({_short(e)})") from e
        try:
            self.num_frames = vlen = len(self._vr)
            if vlen <= 0:
                raise VideoError(f"{path}: video has zero frames")
            self.fps = fps = float(self._vr.get_avg_fps())
            if not np.isfinite(fps) or fps <= 0:
                raise VideoError(f"{path}: invalid frame rate {fps}")
        except BaseException:
            self.close()
            raise

    def frames(self, index_sets) -> list[Frames]:
        """The :class:`Frames` of each index set (``int [T]`` arrays in ``[0, num_frames)``)."""
        path, size = self.path, self.size
        index_sets = [np.asarray(i, np.int64) for i in index_sets]
        # Decode each distinct frame once; repeats (short videos, shared frames) are expanded afterwards.
        unique, inverse = np.unique(np.concatenate(index_sets), return_inverse=True)
        try:
            batch = self._vr.get_batch(unique.tolist())
        except Exception as e:
            if "DECORDArrayCopyFromTo" in str(e):
                # decord 0.6 mis-sizes its output buffer for some small widths (8, 12, 16, 24, 48,
                # 72 on every file tried): a setting problem, not a bad file, so not a VideoError.
                raise ValueError(
                    f"{path}: decord cannot resize frames to {size}x{size} (a decord bug for some "
                    f"small widths, e.g. 16, 24, 48, 72); choose another size ({_short(e)})") from e
            raise VideoError(f"{path}: cannot decode frames ({_short(e)})") from e
        pixels = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
        if pixels.shape != (len(unique), size, size, 3):
            raise VideoError(f"{path}: decoder returned frames of shape {pixels.shape}")
        out, start = [], 0
        for indices in index_sets:
            inv = inverse[start:start + len(indices)]
            start += len(indices)
            out.append(Frames(pixels=np.ascontiguousarray(pixels[inv], dtype=np.uint8),
                              timestamps=frame_timestamps(indices, self.fps), indices=indices,
                              duration=self.num_frames / self.fps, fps=self.fps))
        return out

    def close(self) -> None:
        self._vr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
