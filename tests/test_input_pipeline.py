"""The input pipeline's fast paths: Grain worker processes give the in-process batches and resume
exactly; one decode pass per file gives the frames of separate loads; decord's seeking equals a
sequential pass; decoding at the target size matches decode-then-resize."""
import dataclasses
import json

import numpy as np
import pytest

from ivcr_jax.data import frames as frames_lib
from ivcr_jax.data.demo import encode_mp4
from ivcr_jax.data.pipeline import RawVideos, make_pipeline
from ivcr_jax.data.samples import VideoRequest, enumerate_samples
from ivcr_jax.data.schema import load_dialogues

from test_data_pipeline import CFG, SAMPLE_CFG, corpus_records, same


@pytest.fixture(scope="module")
def refs_cfg(tmp_path_factory, sample_videos):
    d = tmp_path_factory.mktemp("mp_corpus")
    (d / "ivcr.json").write_text(json.dumps(corpus_records()))
    dialogues, _ = load_dialogues(d / "ivcr.json", num_candidates=None)
    root = str(sample_videos["carphone_distorted"].parent)
    cfg = dataclasses.replace(CFG, sample=dataclasses.replace(SAMPLE_CFG, video_root=root))
    return enumerate_samples(dialogues, cfg.sample), cfg


@pytest.fixture(scope="module")
def long_gop_clip(tmp_path_factory):
    """A 3-fps clip with a key frame every 40 frames and B-frames (libx264 defaults otherwise),
    moving content: 200 frames, 5 key-frame intervals."""
    rng = np.random.default_rng(0)
    # smooth content (a natural image's spectrum, not white noise, which no two scalers agree on)
    from PIL import Image

    bg = np.asarray(Image.fromarray(rng.integers(0, 256, (10, 18, 3), dtype=np.uint8)).resize((140, 80), Image.BICUBIC))
    frames = (np.roll(bg, (i * 3, i * 5), axis=(0, 1))[:64, :112] for i in range(200))
    p = tmp_path_factory.mktemp("gop") / "long_gop.mp4"
    encode_mp4(p, frames, 3, options={"crf": "23", "preset": "medium", "x264-params": "keyint=40:min-keyint=40"})
    return p


def _pipe(cfg, refs, tok, **kw):
    return make_pipeline(dataclasses.replace(cfg, **kw), refs, train=True, seed=0, tokenizer=tok,
                         process_index=0, process_count=1)


def test_two_workers_give_the_batches_of_zero_workers_in_order_and_resume_exactly(refs_cfg, tokenizer):
    refs, cfg = refs_cfg
    expected = [next(it) for it in [iter(_pipe(cfg, refs, tokenizer))] for _ in range(6)]

    it = iter(_pipe(cfg, refs, tokenizer, num_workers=2))
    got = [next(it) for _ in range(3)]
    state = it.get_state()
    got += [next(it) for _ in range(3)]  # crosses the first epoch boundary (7 samples, batch 2)
    assert same(got, expected)

    resumed = iter(_pipe(cfg, refs, tokenizer, num_workers=2))
    resumed.set_state(state)
    assert same([next(resumed) for _ in range(3)], expected[3:])
    # (a state saved with workers is Grain's multiprocess state: it restores a pipeline with the
    # same worker count, not one without workers)


def test_one_decode_pass_per_file_gives_the_frames_of_separate_loads(sample_videos):
    p = str(sample_videos["bikes"])
    reqs = [VideoRequest("b", p, 12, "f12", 0, "candidate", 1), VideoRequest("b", p, 96, "f96", 1, "moment", 1),
            VideoRequest("c", str(sample_videos["carphone_pristine"]), 12, "f12", 0, "candidate", 2)]
    for mode in ("uniform", "random"):
        rng = np.random.default_rng(3) if mode == "random" else None
        many = RawVideos(32).load_many(reqs + reqs[:1], mode, rng)  # a repeated request decodes once
        rng = np.random.default_rng(3) if mode == "random" else None
        for r in reqs:
            one = frames_lib.load_frames(r.path, r.num_frames, mode=mode, rng=rng, size=32)
            f = many[(r.path, r.num_frames)]
            assert np.array_equal(f.pixels, one.pixels) and np.array_equal(f.indices, one.indices)
            assert np.array_equal(f.timestamps, one.timestamps) and f.duration == one.duration


def test_seeking_decode_equals_a_sequential_pass_bit_for_bit(long_gop_clip):
    import decord

    vr = decord.VideoReader(str(long_gop_clip), width=64, height=64, num_threads=1)
    every = np.stack([vr.next().asnumpy() for _ in range(len(vr))])
    assert len(every) == 200
    for n in (3, 12, 96):  # sparse (a seek per interval) to dense (forward within intervals)
        f = frames_lib.load_frames(long_gop_clip, n, size=64)
        assert np.array_equal(f.pixels, every[f.indices]), n
    rng = np.random.default_rng(0)
    f = frames_lib.load_frames(long_gop_clip, 12, mode="random", rng=rng, size=64)
    assert np.array_equal(f.pixels, every[f.indices])


def test_decoding_at_the_target_size_matches_decode_then_resize(long_gop_clip):
    """decord resizes in its decoder (ffmpeg's scaler, bicubic) from YUV; the reference here is the
    native RGB frame resized by PIL's bicubic. The two round at different points (chroma upsampling,
    YUV->RGB before or after the resize), so they agree within a few levels, not bit for bit."""
    from PIL import Image

    f = frames_lib.load_frames(long_gop_clip, 12, size=56)
    import decord

    native = decord.VideoReader(str(long_gop_clip), num_threads=1).get_batch(f.indices.tolist()).asnumpy()
    ref = np.stack([np.asarray(Image.fromarray(x).resize((56, 56), Image.BICUBIC)) for x in native])
    d = np.abs(f.pixels.astype(int) - ref)
    # measured: mean 8.4, 99th percentile 34 levels (swscale bicubic on YUV 4:2:0 without antialiasing
    # against PIL antialiased bicubic on RGB; the native frames themselves are identical in decord and PyAV)
    assert d.mean() < 12.0 and np.percentile(d, 99) < 48, (d.mean(), np.percentile(d, 99))
    assert np.corrcoef(f.pixels.ravel(), ref.ravel())[0, 1] > 0.95


def test_decoder_threads_share_the_cores_among_the_loaders(monkeypatch, long_gop_clip):
    from ivcr_jax.data.pipeline import PipelineConfig

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert PipelineConfig().decoder_threads() == 16                      # one loader: every core
    assert PipelineConfig(read_threads=4).decoder_threads() == 4
    assert PipelineConfig(num_workers=8, read_threads=4).decoder_threads() == 2  # workers decode
    assert PipelineConfig(num_workers=32).decoder_threads() == 1
    assert PipelineConfig(num_workers=8, decode_threads=3).decoder_threads() == 3  # as configured
    # and the thread count changes no pixel
    one = frames_lib.load_frames(long_gop_clip, 24, mode="uniform", size=32, num_threads=1)
    two = frames_lib.load_frames(long_gop_clip, 24, mode="uniform", size=32, num_threads=2)
    np.testing.assert_array_equal(one.pixels, two.pixels)
