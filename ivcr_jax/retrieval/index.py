"""The video corpus index: per-frame features of every video, extracted once, stored in shards.

Layout of an index directory::

    manifest.json            what was indexed, with which extractor, which shards are complete
    shard-00000.frames.npy   [n, tokens, dim] per-video frame tokens (float16 by default)
    shard-00000.mean.npy     [n, dim] float32, mean over tokens, L2-normalised (first stage)
    ...

Every video of the corpus is listed once, in a fixed order, and cut into shards of
``shard_size`` consecutive videos. A shard is written to temporary files, renamed into place, and
only then recorded as done in the manifest (also written atomically). An interrupted build
therefore resumes from the completed shards and ends byte-identical to an uninterrupted one: the
order, the shard boundaries and the features are deterministic, and nothing time-dependent is
stored. Unreadable videos are skipped, counted and listed (with the error) in the manifest.

``python -m ivcr_jax.retrieval.index --corpus DIR --out INDEX [--config configs/xpool.py]``
(performance-model.md §3c for feature-cache sizes, §5 for retrieval at scale).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ivcr_jax import cli
from ivcr_jax.data.frames import VIDEO_EXTS, VideoError, load_frames
from ivcr_jax.data.schema import RecordError, resolve_video_root
from ivcr_jax.retrieval.features import Blip2Extractor, FeatureExtractor, extractor_from_spec, l2n

FORMAT = "ivcr_jax.video_index"
VERSION = 1


class VideoIndexError(RuntimeError):
    """An index directory that is missing, incomplete or inconsistent with the request."""


# What the retrieval programs print as one line (``cli.run(body, known=USER_ERRORS)``).
USER_ERRORS = (VideoIndexError, VideoError, RecordError)


# ----------------------------------------------------------------------------- the corpus

def video_root(corpus: str | os.PathLike) -> Path:
    """Video ids are paths relative to this directory (``<source>/<name>.<ext>`` in IVCR): the one
    rule of ``data.schema.resolve_video_root`` for the corpus's ``ivcr.json``."""
    return Path(resolve_video_root(Path(corpus) / "ivcr.json"))


def list_corpus(corpus: str | os.PathLike) -> list[tuple[str, Path]]:
    """``[(video_id, path)]`` of a corpus directory, in a fixed (sorted by id) order.

    ``DIR/videos.json`` (a list of ids, of ``{"video_id"|"id": ..., "path": ...}`` records, or a
    dict id -> path) is used when present; ids are resolved against :func:`video_root`. Otherwise
    every video file under the root is listed, its id being its path relative to the root.
    """
    corpus = Path(corpus)
    if not corpus.is_dir():
        raise FileNotFoundError(f"{corpus}: corpus directory not found")
    root = video_root(corpus)
    listing = corpus / "videos.json"
    out: dict[str, Path] = {}
    if listing.is_file():
        data = json.loads(listing.read_text())
        if isinstance(data, dict) and "videos" in data:
            data = data["videos"]
        items = data.items() if isinstance(data, dict) else data
        for item in items:
            if isinstance(item, tuple):
                vid, rec = item
                path = rec.get("path", vid) if isinstance(rec, dict) else (rec if isinstance(rec, str) else vid)
            elif isinstance(item, str):
                vid, path = item, item
            elif isinstance(item, dict):
                vid = item.get("video_id", item.get("id", item.get("path")))
                path = item.get("path", vid)
            else:
                raise ValueError(f"{listing}: cannot read entry {item!r}")
            p = Path(path)
            if not p.is_absolute():
                p = root / p if (root / p).exists() or not (corpus / p).exists() else corpus / p
            out[str(vid)] = p
    else:
        for p in root.rglob("*"):
            if p.is_file() and p.suffix.lower() in VIDEO_EXTS:
                out[p.relative_to(root).as_posix()] = p
    if not out:
        raise FileNotFoundError(f"{corpus}: no videos found")
    return sorted(out.items())


# ----------------------------------------------------------------------------- building

def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(out: Path, manifest: dict) -> None:
    _atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def _default_loader(path: Path, num_frames: int, size: int) -> np.ndarray:
    return load_frames(path, num_frames, mode="uniform", size=size).pixels


_LOADER_ERRORS: tuple[type[BaseException], ...] = (VideoError, OSError)


def build_index(corpus: str | os.PathLike | Sequence[tuple[str, str | os.PathLike]], out: str | os.PathLike,
                extractor: FeatureExtractor, *, shard_size: int = 256, dtype: str = "float16",
                batch_videos: int = 8, workers: int = 2,
                frame_loader: Callable[[Path, int, int], np.ndarray] | None = None,
                log: Callable[[str], None] | None = print) -> dict:
    """Extract the features of every video once and store them in shards; resumable.

    ``corpus`` is a directory (:func:`list_corpus`) or an explicit ``[(video_id, path)]`` list.
    ``frame_loader(path, num_frames, size) -> uint8 [T, size, size, 3]`` defaults to uniform
    sampling through ``ivcr_jax.data.frames.load_frames``; its ``VideoError``/``OSError`` mark a
    video as unreadable (skipped and listed). Errors of the extractor itself propagate.
    Returns the final manifest.
    """
    videos = list_corpus(corpus) if isinstance(corpus, (str, os.PathLike)) else [(str(v), Path(p)) for v, p in corpus]
    if len({v for v, _ in videos}) != len(videos):
        raise ValueError("duplicate video ids in the corpus listing")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loader = frame_loader or _default_loader
    skip_errors = _LOADER_ERRORS
    log = log or (lambda s: None)
    num_frames, size = int(extractor.num_frames), int(extractor.frame_size)
    header = {
        "format": FORMAT, "version": VERSION,
        "extractor": extractor.spec(),
        "num_frames": num_frames, "tokens_per_frame": int(extractor.tokens_per_frame),
        "dim": int(extractor.dim), "dtype": str(np.dtype(dtype)), "shard_size": int(shard_size),
        "videos": [{"id": v, "path": str(p)} for v, p in videos],
    }
    manifest = _resume_manifest(out, header)
    n_shards = (len(videos) + shard_size - 1) // shard_size
    done = {s["name"] for s in manifest["shards"]}
    for s in range(n_shards):
        name = f"shard-{s:05d}"
        if name in done:
            continue
        t0 = time.time()
        chunk = videos[s * shard_size:(s + 1) * shard_size]
        entry = _build_shard(out, name, s * shard_size, chunk, extractor, loader, skip_errors,
                             np.dtype(dtype), batch_videos, workers, num_frames, size)
        manifest["shards"].append(entry)
        _write_manifest(out, manifest)
        log(f"[index] {name}: {entry['num_indexed']} videos, {len(entry['skipped'])} skipped "
            f"({time.time() - t0:.1f}s) [{s + 1}/{n_shards}]")
    manifest["shards"].sort(key=lambda e: e["name"])
    skipped = [x for e in manifest["shards"] for x in e["skipped"]]
    manifest.update(complete=True, num_indexed=sum(e["num_indexed"] for e in manifest["shards"]),
                    num_skipped=len(skipped), skipped=skipped)
    _write_manifest(out, manifest)
    log(f"[index] done: {manifest['num_indexed']} videos indexed, {manifest['num_skipped']} skipped -> {out}")
    return manifest


def _resume_manifest(out: Path, header: dict) -> dict:
    path = out / "manifest.json"
    if not path.is_file():
        return {**header, "shards": [], "complete": False}
    old = json.loads(path.read_text())
    for key, val in header.items():
        if old.get(key) != val:
            raise VideoIndexError(f"{path}: existing index was built with a different {key!r}; "
                              "use a new output directory (or delete it) to rebuild")
    old["complete"] = False
    for k in ("num_indexed", "num_skipped", "skipped"):
        old.pop(k, None)
    return old


def _build_shard(out: Path, name: str, start: int, chunk, extractor, loader, skip_errors, dtype,
                 batch_videos: int, workers: int, num_frames: int, size: int) -> dict:
    ids, frames, skipped = [], [], []

    def load(item):
        vid, path = item
        try:
            px = np.asarray(loader(Path(path), num_frames, size))
        except skip_errors as e:
            return vid, path, None, f"{type(e).__name__}: {e}"
        if px.shape != (num_frames, size, size, 3):
            return vid, path, None, f"bad frame array shape {px.shape}"
        return vid, path, px, None

    pool = ThreadPoolExecutor(max(1, workers)) if workers > 1 else None
    try:
        loaded: Iterator = pool.map(load, chunk) if pool else map(load, chunk)
        batch: list[tuple[str, np.ndarray]] = []

        def flush():
            if not batch:
                return
            px = np.concatenate([b[1] for b in batch])                  # [n*T, S, S, 3]
            feats = np.asarray(extractor.encode_frames(px), np.float32)  # [n*T, tokens, dim]
            feats = feats.reshape(len(batch), -1, feats.shape[-1])       # [n, T*tokens, dim]
            for (vid, _), f in zip(batch, feats):
                ids.append(vid)
                frames.append(f)
            batch.clear()

        for vid, path, px, err in loaded:
            if err is not None:
                skipped.append({"id": vid, "path": str(path), "error": err})
                continue
            batch.append((vid, px))
            if len(batch) >= batch_videos:
                flush()
        flush()
    finally:
        if pool:
            pool.shutdown()
    dim = int(extractor.dim)
    n_tok = num_frames * int(extractor.tokens_per_frame)
    arr = np.stack(frames) if frames else np.zeros((0, n_tok, dim), np.float32)
    if arr.shape[1:] != (n_tok, dim):
        raise ValueError(f"extractor returned {arr.shape[1:]} per video, expected {(n_tok, dim)}")
    mean = l2n(arr.mean(axis=1)) if len(arr) else np.zeros((0, dim), np.float32)
    _atomic_save_npy(out / f"{name}.frames.npy", arr.astype(dtype))
    _atomic_save_npy(out / f"{name}.mean.npy", mean.astype(np.float32))
    return {"name": name, "start": start, "stop": start + len(chunk), "ids": ids,
            "num_indexed": len(ids), "skipped": skipped}


# ----------------------------------------------------------------------------- reading

@dataclasses.dataclass
class VideoIndex:
    """A built index, read back: ids, first-stage embeddings and (memory-mapped) frame tokens."""

    root: Path
    manifest: dict
    ids: list[str]
    paths: list[str]
    mean: np.ndarray                 # [N, dim] float32, L2-normalised
    shard_frames: list[np.ndarray]   # per shard [n_s, tokens, dim]
    offsets: np.ndarray              # [S+1] first index of each shard

    @classmethod
    def load(cls, root: str | os.PathLike, *, mmap: bool = True) -> "VideoIndex":
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise VideoIndexError(f"{root}: not a video index (no manifest.json)")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise VideoIndexError(f"{path}: not a {FORMAT} manifest")
        if not manifest.get("complete"):
            raise VideoIndexError(f"{path}: index build is incomplete; rerun the build to resume it")
        paths_by_id = {v["id"]: v["path"] for v in manifest["videos"]}
        ids, means, frames, offsets = [], [], [], [0]
        for e in sorted(manifest["shards"], key=lambda e: e["name"]):
            f = np.load(root / f"{e['name']}.frames.npy", mmap_mode="r" if mmap else None)
            m = np.load(root / f"{e['name']}.mean.npy")
            if len(f) != e["num_indexed"] or len(m) != e["num_indexed"]:
                raise VideoIndexError(f"{root}/{e['name']}: arrays do not match the manifest")
            ids += e["ids"]
            means.append(m)
            frames.append(f)
            offsets.append(offsets[-1] + len(f))
        dim = int(manifest["dim"])
        mean = np.concatenate(means) if means else np.zeros((0, dim), np.float32)
        return cls(root, manifest, ids, [paths_by_id[i] for i in ids], mean, frames,
                   np.asarray(offsets, np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def tokens(self) -> int:
        return int(self.manifest["num_frames"]) * int(self.manifest["tokens_per_frame"])

    def position(self) -> dict[str, int]:
        """video id -> row in the index."""
        return {v: i for i, v in enumerate(self.ids)}

    def frames(self, rows: np.ndarray) -> np.ndarray:
        """Frame tokens of the given rows (any shape) -> ``[*rows.shape, tokens, dim]`` float32."""
        rows = np.asarray(rows, np.int64)
        flat = rows.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"row out of range [0, {len(self)})")
        out = np.empty((flat.size, self.tokens, self.dim), np.float32)
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            local = flat[sel] - self.offsets[s]
            order = np.argsort(local, kind="stable")        # sorted reads from the memory map
            out[sel[order]] = self.shard_frames[s][local[order]]
        return out.reshape(*rows.shape, self.tokens, self.dim)

    def all_frames(self) -> np.ndarray:
        return self.frames(np.arange(len(self)))

    def extractor(self, **overrides) -> FeatureExtractor:
        """The feature extractor the index was built with (for encoding texts at search time)."""
        return extractor_from_spec(self.manifest["extractor"], **overrides)


# ----------------------------------------------------------------------------- command line

def make_extractor(config: Any | None, blip2: str | None) -> FeatureExtractor:
    """``--blip2 DIR`` selects BLIP-2 ITC features; otherwise ``config.index.extractor`` (a spec)."""
    idx = config.index if config is not None and "index" in config else None
    num_frames = int(idx.num_frames) if idx is not None else 12
    if blip2:
        query_pool = str(idx.query_pool) if idx is not None and "query_pool" in idx else "mean"
        dtype = str(idx.compute_dtype) if idx is not None and "compute_dtype" in idx else "float32"
        return Blip2Extractor.from_pretrained(blip2, num_frames=num_frames, query_pool=query_pool,
                                              dtype=dtype)
    if idx is not None and "extractor" in idx:
        spec = dict(idx.extractor)
        if spec.get("kind") == "blip2" and not spec.get("path"):
            raise cli.UsageError("the config asks for BLIP-2 features: pass --blip2 DIR")
        return extractor_from_spec(spec)
    raise cli.UsageError("no feature extractor: pass --blip2 DIR (a Blip2ForImageTextRetrieval directory) "
                         "or a --config whose index.extractor names one")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ivcr_jax.retrieval.index --corpus DIR --out INDEX [--config configs/xpool.py] [--blip2 DIR]``."""
    p = argparse.ArgumentParser(prog="python -m ivcr_jax.retrieval.index", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="corpus directory (videos/ and optional videos.json)")
    p.add_argument("--out", required=True, help="index directory (created; resumed if it exists)")
    p.add_argument("--blip2", default=None, help="HF Blip2ForImageTextRetrieval directory for BLIP-2 ITC features")
    p.add_argument("--workers", type=int, default=2, help="decoder threads")

    def body() -> int:
        config, args = cli.parse(argv, p, default_config="configs/xpool.py")
        extractor = make_extractor(config, args.blip2)
        manifest = build_index(args.corpus, args.out, extractor, shard_size=int(config.index.shard_size),
                               dtype=str(config.index.dtype), workers=args.workers)
        if manifest["num_skipped"]:
            print(f"[index] skipped {manifest['num_skipped']} unreadable videos:", file=sys.stderr)
            for s in manifest["skipped"][:20]:
                print(f"  {s['id']}: {s['error']}", file=sys.stderr)
        return 0
    return cli.run(body, known=USER_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
