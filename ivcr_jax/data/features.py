"""The ViT feature cache: the frozen ViT's output (``ln_vision`` applied) stored once, read by every epoch.

The ViT (EVA ViT-g, frozen) and its ``ln_vision`` never change in training, yet encoding the frames is
most of a step's vision cost. ``python -m ivcr_jax.train.vit_cache --config C --corpus DIR --out DIR``
(the program: it needs the model, which this data-layer module may not import) runs
``InterLLaVA.image_features`` once over every distinct (video, frame count) of a split — the same
enumeration as ``data/prepare.py`` (:func:`~ivcr_jax.data.prepare.split_videos`) — and writes a TFDS
``array_record`` dataset (builder ``ivcr_vit_features``) with, per record, the keys and metadata of a
prepared dataset (``key``, ``video_id``, ``num_frames``, ``timestamps``, ``indices``, ``duration``,
``fps``) and ``features [T, 1 + N, D]`` in place of the pixels. Stored dtype: ``bfloat16`` (the
default) as its ``uint16`` bit patterns (a TFDS ``Tensor`` feature cannot hold bfloat16), read back
as ``ml_dtypes.bfloat16``; or ``float32`` (exact, for tests and fp32 runs). Beside it, ``vit_model.json``
says what produced the features: the ViT config, the frame size, the dtypes and a digest of the ViT
weights (:func:`vit_signature`). Training and evaluation refuse, with one line, a cache written by
another ViT (:func:`vision_line`).

Frames. Evaluation frames are the uniform frames (as a prepared dataset stores them). With
``--grid G`` (default 1) the cache also stores, per video, the features of ``G x T`` uniform frames
(record key ``"<video>@<T>#gridG"``): a training draw (``mode="random"``) takes, per segment of
the T, one of the G grid frames inside it at random (uniform grids nest: segment t holds grid frames
``[t·G, (t+1)·G)``; a video of fewer than G x T frames has empty grid segments, whose start frame
may be the next segment's first) — G choices per segment where raw decoding draws from every frame
of the segment. With ``G = 1`` **training from the cache sees the evaluation frames every epoch**, as
training from a prepared dataset does.

Reading: ``--config.data.vit_features=PATH`` (``PipelineConfig.vit_features``): the pipeline's video
source is :class:`VitFeatures`, and the batch's pool holds ``vit_features [P, F, 1+N, D]`` in place
of ``frames`` (``data/batch.py``); ``InterLLaVA.encode_pool`` skips the ViT.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ivcr_jax.cli import UsageError
from ivcr_jax.data import frames as frames_lib
from ivcr_jax.data.prepare import (DIALOGUES_FILE, corpus_paths, find_data_dir, tfds_module,
                                   video_key, video_records_builder)
from ivcr_jax.data.samples import VideoRequest

log = logging.getLogger(__name__)

MODEL_FILE = "vit_model.json"
DTYPES = ("bfloat16", "float32")


class FeatureCacheMismatch(UsageError):
    """A ViT feature cache written by another ViT (or frame size) than the run's: one line."""


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float32)


_CLASSES = None


def _builder_classes():
    """Defined lazily so that importing this module does not import tensorflow_datasets."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    tfds = tfds_module()

    @dataclasses.dataclass
    class IvcrVitFeaturesConfig(tfds.core.BuilderConfig):
        retrieval_frames: int = 12
        moment_frames: int = 96
        size: int = 224
        tokens: int = 257
        width: int = 1408
        dtype: str = "bfloat16"
        grid: int = 1

    class IvcrVitFeatures(video_records_builder()):
        """The frozen ViT's features of the videos an IVCR-200K split shows (see module docstring)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Per (video, frame count) ViT + ln_vision features, uniform frames."}
        BUILDER_CONFIG_CLASS = IvcrVitFeaturesConfig
        LOG_PREFIX = "vit features"

        def __init__(self, *, encode=None, **kw):
            self._encode = encode
            super().__init__(**kw)

        def _info(self):
            c = self.builder_config
            store = np.uint16 if c.dtype == "bfloat16" else np.float32
            # bfloat16 as its uint16 bit patterns (a Tensor feature has no bfloat16)
            return self._video_info("IVCR-200K videos through the frozen EVA ViT (+ ln_vision) for ivcr_jax.", {
                "features": tfds.features.Tensor(shape=(None, c.tokens, c.width), dtype=store)})

        def _video_records(self, key, video):
            c = self.builder_config
            # the uniform (evaluation) frames, then with grid > 1 the training grid's
            todo = [(key, video.num_frames)] + ([(grid_key(key, c.grid), c.grid * video.num_frames)]
                                                if c.grid > 1 else [])
            decoded = [(kk, frames_lib.load_frames(video.path, n, mode="uniform", size=c.size)) for kk, n in todo]
            out = []
            for kk, fr in decoded:
                feats = np.asarray(self._encode(fr.pixels), _np_dtype(c.dtype))
                if feats.shape != (len(fr.pixels), c.tokens, c.width):
                    raise ValueError(f"{kk}: features of shape {feats.shape}, expected "
                                     f"{(len(fr.pixels), c.tokens, c.width)}")
                out.append((kk, fr, {"features": feats.view(np.uint16) if c.dtype == "bfloat16" else feats}))
            return out

        def _extra_metadata(self):
            c = self.builder_config
            return {"tokens": c.tokens, "width": c.width, "dtype": c.dtype, "grid": c.grid}

    _CLASSES = (IvcrVitFeaturesConfig, IvcrVitFeatures)
    return _CLASSES


def write_features(
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    *,
    encode: Callable[[np.ndarray], np.ndarray],
    signature: dict,
    tokens: int,
    width: int,
    split: str | None = None,
    retrieval_frames: int = 12,
    moment_frames: int = 96,
    size: int = 224,
    dtype: str = "bfloat16",
    grid: int = 1,
    videos: str | os.PathLike | None = None,
    lang: str = "en",
    exclude_types=((0,),),
    num_candidates: int | None = 10,
) -> Path:
    """Write the cache under ``out`` and return its directory (pass it as ``data.vit_features``).

    ``encode(uint8 [T, size, size, 3]) -> [T, tokens, width]``: the ViT with ``ln_vision``;
    ``signature``: :func:`vit_signature` of the model it runs, saved as ``vit_model.json``.
    """
    if dtype not in DTYPES:
        raise UsageError(f"the feature dtype must be one of {DTYPES}, got {dtype!r}")
    if int(grid) < 1:
        raise UsageError(f"the training grid must be a positive multiple of the frame count, got {grid}")
    json_path, root = corpus_paths(corpus, videos)
    Config, Builder = _builder_classes()
    name = (f"{split or 'full'}_r{retrieval_frames}_m{moment_frames}_s{size}_{signature['digest'][:12]}"
            f"_{dtype}_g{int(grid)}")
    cfg = Config(name=name, retrieval_frames=retrieval_frames, moment_frames=moment_frames, size=size,
                 tokens=int(tokens), width=int(width), dtype=dtype, grid=int(grid),
                 description=f"split {split or 'full'} of {json_path}")
    b = Builder(config=cfg, data_dir=str(out), corpus_json=str(json_path), video_root=str(root), split=split,
                lang=lang, exclude_types=exclude_types, num_candidates=num_candidates, encode=encode)
    b.download_and_prepare(file_format="array_record")
    data_dir = Path(b.data_dir)
    if b.records or not (data_dir / DIALOGUES_FILE).exists():
        (data_dir / DIALOGUES_FILE).write_text(json.dumps(b.records, ensure_ascii=False), encoding="utf-8")
    (data_dir / MODEL_FILE).write_text(json.dumps({**signature, "size": int(size), "dtype": dtype}, indent=1),
                                       encoding="utf-8")
    return data_dir


# ----------------------------------------------------------------------------- what produced them

def grid_key(key: str, grid: int) -> str:
    """The record key of a video's training grid (``grid`` x its frame count, uniform)."""
    return f"{key}#grid{int(grid)}"


def vit_signature(model) -> dict:
    """``{"vit": config, "digest": hex, "compute_dtype", "frozen_dtype"}`` of an ``InterLLaVA``'s ViT.

    The digest hashes, per ViT parameter (path order), its shape and three float32 reductions
    rounded to 6 significant digits (sum, sum of squares, an index-weighted sum): computed on device,
    so it works on sharded weights without gathering them; two different ViTs (another checkpoint,
    another seed) differ in it.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    flat = sorted(nnx.to_flat_state(nnx.state(model.vit, nnx.Param)), key=lambda kv: tuple(map(str, kv[0])))
    leaves = [v.get_value() for _, v in flat]

    @jax.jit
    def stats(xs):
        out = []
        for x in xs:
            x = x.astype(jnp.float32).reshape(-1)
            w = (jnp.arange(x.shape[0], dtype=jnp.int32) % 97).astype(jnp.float32) / 97.0
            out.append(jnp.stack([x.sum(), (x * x).sum(), (x * w).sum()]))
        return jnp.stack(out)

    s = np.asarray(jax.device_get(stats(leaves)), np.float64)
    h = hashlib.sha256()
    for (path, _), leaf, row in zip(flat, leaves, s):
        h.update(("/".join(map(str, path)) + str(tuple(leaf.shape)) + ",".join(f"{x:.6g}" for x in row)).encode())
    cfg = model.config
    return {"vit": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg.vit).items()},
            "digest": h.hexdigest(), "compute_dtype": str(cfg.compute_dtype), "frozen_dtype": str(cfg.frozen_dtype)}


def vision_line(vit_features: str | None, model=None) -> str:
    """The run's one "vision:" line; with a cache, first check it was written by ``model``'s ViT
    (:class:`FeatureCacheMismatch`, one line, when not)."""
    if not vit_features:
        return "vision: online ViT"
    if model is not None:
        check_signature(vit_features, vit_signature(model))
    return f"vision: cached ViT features from {find_data_dir(Path(vit_features))}"


def check_signature(path: str | os.PathLike, signature: dict) -> None:
    data_dir = find_data_dir(Path(path))
    try:
        saved = json.loads((data_dir / MODEL_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatureCacheMismatch(f"{data_dir}: no {MODEL_FILE}; not a ViT feature cache "
                                   f"(write one with python -m ivcr_jax.train.vit_cache)") from None
    if saved.get("vit") != signature["vit"]:
        diff = sorted(k for k in set(saved.get("vit", {})) | set(signature["vit"])
                      if saved.get("vit", {}).get(k) != signature["vit"].get(k))
        raise FeatureCacheMismatch(f"{data_dir}: ViT features of another ViT config (differs in "
                                   f"{', '.join(diff)}); rewrite the cache for this model or unset data.vit_features")
    if saved.get("digest") != signature["digest"]:
        raise FeatureCacheMismatch(f"{data_dir}: ViT features of other ViT weights (digest "
                                   f"{saved.get('digest', '?')[:12]}, "
                                   f"this model's {signature['digest'][:12]}); rewrite the cache for this model "
                                   f"or unset data.vit_features")


# ----------------------------------------------------------------------------- reading

class VitFeatures:
    """ViT features from a cache: the ``load`` of ``pipeline.RawVideos``, its ``Frames.pixels`` being
    the features ``[T, 1 + N, D]`` (``bfloat16`` or ``float32``). Uniform frames, except
    ``mode="random"`` on a cache with a training grid (``grid > 1``): one grid frame per segment,
    drawn with ``rng`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, size: int | None = None):
        self.path = find_data_dir(Path(path))
        self._source = None
        meta = json.loads((self.path / "metadata.json").read_text(encoding="utf-8"))
        if "tokens" not in meta:
            raise FeatureCacheMismatch(f"{self.path}: not a ViT feature cache (a prepared frames dataset? "
                                       f"use it as data.prepared)")
        self.index: dict[str, int] = meta["index"]
        self.failed: dict[str, str] = meta.get("failed", {})
        self.split: str = meta["split"]
        self.size: int = int(meta["size"])
        self.tokens, self.width, self.dtype = int(meta["tokens"]), int(meta["width"]), str(meta["dtype"])
        self.grid = int(meta.get("grid", 1))
        self.frame_counts = {int(meta["retrieval_frames"]), int(meta["moment_frames"])}
        if size is not None and size != self.size:
            raise FeatureCacheMismatch(f"{self.path}: ViT features of {self.size}px frames, the pipeline asks "
                                       f"for {size}")

    @property
    def feature_spec(self) -> tuple[int, int, str]:
        """``(1 + N, D, dtype)``: a pool row's features (``BatchLayout.vit_features``)."""
        return (self.tokens, self.width, self.dtype)

    @property
    def dialogues_file(self) -> Path:
        return self.path / DIALOGUES_FILE

    def _open(self):
        if self._source is None:
            self._source = tfds_module().builder_from_directory(str(self.path)).as_data_source(self.split)
        return self._source

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def load(self, req: VideoRequest, mode: str = "uniform", rng: Any = None) -> frames_lib.Frames:
        if req.num_frames not in self.frame_counts:
            raise ValueError(f"{self.path}: ViT features of {sorted(self.frame_counts)} frames per video, "
                             f"the pipeline asks for {req.num_frames}")
        k = video_key(req.video_id, req.num_frames)
        i = self.index.get(k)
        if i is None:
            why = self.failed.get(k, "not shown by the cached split's dialogues")
            raise frames_lib.VideoError(f"{self.path}: no ViT features for {k} ({why})")
        pick = None
        if mode == "random" and self.grid > 1:
            # segment t of T holds grid frames [t·G, (t+1)·G) (uniform grids nest): draw one of them
            if rng is None:
                raise ValueError("random frames need an rng")
            k = grid_key(k, self.grid)
            i = self.index[k]
            T = req.num_frames
            pick = np.arange(T) * self.grid + rng.integers(0, self.grid, size=T)
        rec = self._open()[i]
        got = rec["key"].decode() if isinstance(rec["key"], bytes) else rec["key"]
        if got != k:
            raise ValueError(f"{self.path}: record {i} holds {got!r}, expected {k!r}; the cache is inconsistent")
        feats = np.asarray(rec["features"])
        feats = feats.view(_np_dtype("bfloat16")) if self.dtype == "bfloat16" else feats.astype(np.float32)
        ts, idx = np.asarray(rec["timestamps"], np.float32), np.asarray(rec["indices"], np.int64)
        if pick is not None:
            feats, ts, idx = feats[pick], ts[pick], idx[pick]
        return frames_lib.Frames(pixels=feats, timestamps=ts, indices=idx,
                                 duration=float(rec["duration"]), fps=float(rec["fps"]))

    def __repr__(self):
        return f"VitFeatures({str(self.path)!r})"


__all__ = ["FeatureCacheMismatch", "VitFeatures", "check_signature", "vision_line", "vit_signature",
           "write_features"]
