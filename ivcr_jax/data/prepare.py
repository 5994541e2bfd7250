"""Decode a corpus once into a TFDS ``array_record`` dataset, then train and evaluate many times.

    python -m ivcr_jax.data.prepare --corpus DIR --out DIR [--split train] [--config configs/paper.py[:head64]]

Frame counts and size come from the config (``config.data.retrieval_frames``, ``moment_frames``,
``frame_size``, ``lang``). ``--corpus`` is a corpus root holding ``ivcr.json`` and ``videos/`` (the
layout of ``ivcr_jax.data.demo``), or the JSON file itself (videos then resolve against
``config.data.video_root``, default the JSON's ``videos/`` sibling or its directory).

What is stored (a ``tfds.core.GeneratorBasedBuilder``, ``file_format="array_record"``, without
TensorFlow: only ``Tensor`` / ``Text`` / ``Scalar`` features, never ``Image`` / ``Video``): one record
per distinct (video, frame count) that the split's dialogues show — a retrieval candidate at the
candidate frame count, a moment video at the moment frame count — with its uniformly sampled
``uint8 [T, size, size, 3]`` frames, their timestamps, indices, duration and fps. Candidate lists
overlap heavily between dialogues and every prefix sample re-shows its history's videos
(reference-architecture §8.2, §8.7), so storing videos rather than samples decodes each video once.
The split's dialogue records (both languages) are saved beside the records as ``dialogues.json``;
samples (tokens, labels) are rebuilt from them at load time, so one prepared dataset serves any
tokenizer and prompt setting with the same frame counts and size.

Training and evaluation read it with ``--config.data.prepared=PATH`` (``PipelineConfig(prepared=PATH)``,
or ``videos=PreparedVideos(PATH)``)
and then gives the same evaluation batches as decoding the raw videos. Frames are stored as
evaluation ("uniform") frames: training from a prepared dataset sees those frames every epoch,
without the per-epoch random frame sampling of raw decoding.

A video that fails to decode at preparation is left out and listed in the builder's metadata; a
sample that needs it is skipped (and counted) by the pipeline, as with raw videos.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ivcr_jax import cli
from ivcr_jax.data import frames as frames_lib
from ivcr_jax.data.samples import SampleConfig, VideoRequest, turn_videos
from ivcr_jax.data.schema import RecordError, load_dialogues, resolve_video_root

log = logging.getLogger(__name__)

DIALOGUES_FILE = "dialogues.json"
BUILDER_NAME = "ivcr_frames"


def corpus_paths(corpus: str | os.PathLike, videos: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(dialogue JSON, video root) of a corpus directory or JSON file."""
    corpus = Path(corpus)
    if corpus.is_dir():
        json_path = corpus / "ivcr.json"
    elif corpus.is_file():
        json_path = corpus
    else:
        raise FileNotFoundError(f"{corpus}: no such corpus directory or JSON file")
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: the corpus has no ivcr.json")
    return json_path, Path(resolve_video_root(json_path, videos))


def video_key(video_id: str, num_frames: int) -> str:
    return f"{video_id}@{num_frames}"


def split_videos(corpus_json, video_root, *, split: str | None, retrieval_frames: int, moment_frames: int,
                 lang: str = "en", exclude_types=((0,),), num_candidates: int | None = 10):
    """``(dialogues, report, videos)``: the split's dialogues and its distinct (video, frame count)
    requests in first-shown order (what a prepared dataset stores one record of)."""
    dialogues, report = load_dialogues(corpus_json, split=split, lang=lang, exclude_types=exclude_types,
                                       num_candidates=num_candidates)
    log.info(report.summary())
    scfg = SampleConfig(retrieval_frames=retrieval_frames, moment_frames=moment_frames, video_root=str(video_root))
    seen, keys = set(), []
    for d in dialogues:
        for t in range(len(d.turns)):
            for v in turn_videos(d, t, scfg):
                k = video_key(v.video_id, v.num_frames)
                if k not in seen:
                    seen.add(k)
                    keys.append(v)
    return dialogues, report, keys


def split_records(corpus_json, dialogues) -> list[dict]:
    """The raw JSON records of ``dialogues`` (saved beside a prepared dataset as ``dialogues.json``)."""
    raw = json.loads(Path(corpus_json).read_text(encoding="utf-8"))
    return [raw[d.index] for d in dialogues]


def tfds_module():
    """``tensorflow_datasets``, imported on first use (a heavy optional dependency of raw-video runs)."""
    import tensorflow_datasets as tfds

    return tfds



def video_records_builder():
    """The base of the builders that store one record per distinct (video, frame count) of a split
    (``IvcrFrames`` here, ``features.IvcrVitFeatures``): the split's enumeration, the shared keys and
    metadata, the dialogue records. A subclass gives its payload features, its per-video records
    (:meth:`_video_records`) and its extra metadata. Defined lazily (tensorflow_datasets)."""
    global _BASE
    if _BASE is not None:
        return _BASE
    tfds = tfds_module()
    from tensorflow_datasets.core.utils.py_utils import classproperty

    class VideoRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        LOG_PREFIX = "prepare"

        # No checksums / package metadata files: without this tfds looks for them beside the
        # module through `importlib_resources`, which is not a dependency here.
        @classproperty
        @classmethod
        def code_path(cls):
            return None

        def __init__(self, *, corpus_json=None, video_root=None, split: str | None = None, lang: str = "en",
                     exclude_types=((0,),), num_candidates: int | None = 10, **kw):
            self._corpus_json, self._video_root, self._split = corpus_json, video_root, split
            self._lang, self._exclude, self._num_candidates = lang, exclude_types, num_candidates
            self.records: list[dict] = []
            self.failed: dict[str, str] = {}
            super().__init__(**kw)

        def _video_info(self, description: str, payload: dict):
            """The dataset info: the shared per-record keys with ``payload`` (the stored arrays)."""
            f = tfds.features
            return tfds.core.DatasetInfo(
                builder=self,
                description=description,
                features=f.FeaturesDict({
                    "key": f.Text(),  # "<video_id>@<num_frames>"
                    "video_id": f.Text(),
                    "num_frames": f.Scalar(dtype=np.int32),
                    **payload,
                    "timestamps": f.Tensor(shape=(None,), dtype=np.float32),
                    "indices": f.Tensor(shape=(None,), dtype=np.int64),
                    # Raw bytes: a plain float feature is stored as float32 and would not round-trip.
                    "duration": f.Tensor(shape=(), dtype=np.float64, encoding="bytes"),
                    "fps": f.Tensor(shape=(), dtype=np.float64, encoding="bytes"),
                }),
                metadata=tfds.core.MetadataDict(),
                disable_shuffling=True,  # record i is the i-th generated; the key table relies on it
            )

        def _split_generators(self, dl_manager):
            return {self._split or "full": self._generate_examples()}

        def _video_records(self, key: str, video):
            """``[(record key, frames.Frames, payload dict), ...]`` of one video (may raise VideoError)."""
            raise NotImplementedError

        def _extra_metadata(self) -> dict:
            return {}

        def _generate_examples(self):
            c = self.builder_config
            dialogues, report, keys = split_videos(
                self._corpus_json, self._video_root, split=self._split, retrieval_frames=c.retrieval_frames,
                moment_frames=c.moment_frames, lang=self._lang, exclude_types=self._exclude,
                num_candidates=self._num_candidates)
            self.records = split_records(self._corpus_json, dialogues)
            index = {}
            for v in keys:
                k = video_key(v.video_id, v.num_frames)
                try:
                    items = self._video_records(k, v)
                except frames_lib.VideoError as e:
                    self.failed[k] = str(e)
                    log.warning("%s: %s", self.LOG_PREFIX, e)
                    continue
                for kk, fr, payload in items:
                    index[kk] = len(index)
                    yield index[kk], {
                        "key": kk, "video_id": v.video_id, "num_frames": v.num_frames, **payload,
                        "timestamps": fr.timestamps, "indices": fr.indices.astype(np.int64),
                        "duration": float(fr.duration), "fps": float(fr.fps),
                    }
            self.info.metadata.update({
                "index": index, "failed": self.failed, "retrieval_frames": c.retrieval_frames,
                "moment_frames": c.moment_frames, "size": c.size, **self._extra_metadata(),
                "split": self._split or "full", "lang": self._lang, "corpus": str(self._corpus_json),
                "video_root": str(self._video_root), "dialogue_report": report.summary(),
            })

    _BASE = VideoRecords
    return _BASE


_BASE = None


def _builder_classes():
    """Defined lazily so that importing this module does not import tensorflow_datasets."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    tfds = tfds_module()

    @dataclasses.dataclass
    class IvcrFramesConfig(tfds.core.BuilderConfig):
        retrieval_frames: int = 12
        moment_frames: int = 96
        size: int = 224

    class IvcrFrames(video_records_builder()):
        """Decoded frames of the videos an IVCR-200K split shows (see module docstring)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Per (video, frame count) uint8 frames, uniform sampling."}
        BUILDER_CONFIG_CLASS = IvcrFramesConfig

        def __init__(self, *, decode_threads: int = 1, **kw):
            self._decode_threads = decode_threads
            super().__init__(**kw)

        def _info(self):
            size = self.builder_config.size
            return self._video_info("IVCR-200K videos decoded to uint8 frames for ivcr_jax.", {
                "pixels": tfds.features.Tensor(shape=(None, size, size, 3), dtype=np.uint8, encoding="zlib")})

        def _video_records(self, key, video):
            fr = frames_lib.load_frames(video.path, video.num_frames, mode="uniform", size=self.builder_config.size,
                                        num_threads=self._decode_threads)
            return [(key, fr, {"pixels": fr.pixels})]

    _CLASSES = (IvcrFramesConfig, IvcrFrames)
    return _CLASSES


_CLASSES = None


def prepare(
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = None,
    retrieval_frames: int = 12,
    moment_frames: int = 96,
    size: int = 224,
    videos: str | os.PathLike | None = None,
    lang: str = "en",
    exclude_types=((0,),),
    num_candidates: int | None = 10,
) -> Path:
    """Write the prepared dataset under ``out`` and return its directory (pass it as ``prepared``)."""
    json_path, root = corpus_paths(corpus, videos)
    Config, Builder = _builder_classes()
    name = f"{split or 'full'}_r{retrieval_frames}_m{moment_frames}_s{size}"
    cfg = Config(name=name, retrieval_frames=retrieval_frames, moment_frames=moment_frames, size=size,
                 description=f"split {split or 'full'} of {json_path}")
    b = Builder(config=cfg, data_dir=str(out), corpus_json=str(json_path), video_root=str(root), split=split,
                lang=lang, exclude_types=exclude_types, num_candidates=num_candidates)
    b.download_and_prepare(file_format="array_record")
    data_dir = Path(b.data_dir)
    if b.records or not (data_dir / DIALOGUES_FILE).exists():
        (data_dir / DIALOGUES_FILE).write_text(json.dumps(b.records, ensure_ascii=False), encoding="utf-8")
    return data_dir


def find_data_dir(path: Path) -> Path:
    if (path / "dataset_info.json").is_file():
        return path
    found = sorted(p.parent for p in path.rglob("dataset_info.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected one prepared dataset (a dataset_info.json) below it, "
                                f"found {len(found)}: {[str(p) for p in found][:5]}")
    return found[0]


class PreparedVideos:
    """Frames from a prepared dataset: same ``load`` as ``pipeline.RawVideos``.

    The stored frames are uniform samples; ``mode`` and ``rng`` are ignored. A video that failed at
    preparation raises ``frames.VideoError`` (the pipeline skips the sample); asking for a frame count
    or size the dataset was not prepared with raises ``ValueError``.
    """

    def __init__(self, path: str | os.PathLike, *, size: int | None = None):
        self.path = find_data_dir(Path(path))
        self._source = None
        meta = json.loads((self.path / "metadata.json").read_text(encoding="utf-8"))
        self.index: dict[str, int] = meta["index"]
        self.failed: dict[str, str] = meta.get("failed", {})
        self.split: str = meta["split"]
        self.size: int = int(meta["size"])
        self.frame_counts = {int(meta["retrieval_frames"]), int(meta["moment_frames"])}
        if size is not None and size != self.size:
            raise ValueError(f"{self.path}: prepared with frame size {self.size}, the pipeline asks for {size}")

    @property
    def dialogues_file(self) -> Path:
        return self.path / DIALOGUES_FILE

    def _open(self):
        if self._source is None:
            tfds = tfds_module()
            self._source = tfds.builder_from_directory(str(self.path)).as_data_source(self.split)
        return self._source

    def __getstate__(self):  # workers reopen the files
        return {**self.__dict__, "_source": None}

    def load(self, req: VideoRequest, mode: str = "uniform", rng=None) -> frames_lib.Frames:
        if req.num_frames not in self.frame_counts:
            raise ValueError(f"{self.path}: prepared with {sorted(self.frame_counts)} frames per video, "
                             f"the pipeline asks for {req.num_frames}")
        k = video_key(req.video_id, req.num_frames)
        i = self.index.get(k)
        if i is None:
            why = self.failed.get(k, "not shown by the prepared split's dialogues")
            raise frames_lib.VideoError(f"{self.path}: no frames for {k} ({why})")
        rec = self._open()[i]
        got = rec["key"].decode() if isinstance(rec["key"], bytes) else rec["key"]
        if got != k:
            raise ValueError(f"{self.path}: record {i} holds {got!r}, expected {k!r}; the dataset is inconsistent")
        return frames_lib.Frames(pixels=np.asarray(rec["pixels"], np.uint8),
                                 timestamps=np.asarray(rec["timestamps"], np.float32),
                                 indices=np.asarray(rec["indices"], np.int64),
                                 duration=float(rec["duration"]), fps=float(rec["fps"]))

    def __repr__(self):
        return f"PreparedVideos({str(self.path)!r})"


def load_prepared_dialogues(path: str | os.PathLike, **kw):
    """The prepared split's dialogues: ``schema.load_dialogues`` on its ``dialogues.json``."""
    return load_dialogues(find_data_dir(Path(path)) / DIALOGUES_FILE, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ivcr_jax.data.prepare --corpus C --out DIR [--config configs/paper.py[:head64]]``.

    Frame counts, frame size, video root and language are the experiment's (``config.data``), so
    the prepared dataset holds exactly the frames that config's training draws from.
    """
    p = argparse.ArgumentParser(prog="python -m ivcr_jax.data.prepare",
                                description="Decode an IVCR corpus once into a TFDS array_record dataset.")
    p.add_argument("--corpus", required=True, help="corpus root (ivcr.json + videos/) or the JSON file")
    p.add_argument("--out", required=True, help="output directory (TFDS data_dir)")
    p.add_argument("--split", default=None, help="only dialogues of this split (default: all splits, stored as split 'full')")

    def body() -> int:
        config, args = cli.parse(argv, p, default_config="configs/paper.py")
        d = config.data
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        path = prepare(args.corpus, args.out, split=args.split, retrieval_frames=int(d.retrieval_frames),
                       moment_frames=int(d.moment_frames), size=int(d.frame_size), videos=d.video_root or None,
                       lang=d.lang)
        v = PreparedVideos(path)
        print(f"prepared {len(v.index)} videos ({len(v.failed)} failed) in {path}")
        for k, e in list(v.failed.items())[:10]:
            print(f"  failed {k}: {e}")
        print(f"use it with --config.data.prepared={path}")
        return 0
    return cli.run(body, known=(RecordError, frames_lib.VideoError))


if __name__ == "__main__":
    sys.exit(main())
