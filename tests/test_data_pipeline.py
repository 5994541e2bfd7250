"""The Grain pipeline on real mp4 files: batch contract, static shapes, determinism, resumption,
per-process sharding, skipped samples."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from ivcr_jax.data import frames as frames_lib
from ivcr_jax.data.batch import slot_view
from ivcr_jax.data.pipeline import PipelineConfig, make_pipeline
from ivcr_jax.data.samples import SampleConfig, enumerate_samples
from ivcr_jax.data.schema import load_dialogues

D, P = "carphone_distorted.mp4", "carphone_pristine.mp4"


def _h(q, tid):
    return {"from": "human", "value": q, "text_id": tid}


def _ret(a, gt, cands):
    return {"from": "gpt", "value": a, "gt_se": [-1, -1], "video_id": gt, "candidate_videos": cands}


def _mom(a, gt, span):
    return {"from": "gpt", "value": a, "gt_se": span, "video_id": gt}


def corpus_records(missing: bool = False):
    """7 samples: d0 (retrieval+moment on P), d1 (retrieval+moment+chat), d2 (moment), d3 (retrieval)."""
    c0 = [D] * 10
    c0[1] = P
    c1 = [D] * 10
    recs = [
        {"id": "d0", "type": [1, 2], "split": "train", "conversations": [
            _h("A man talks in a car.", "t0"), _ret("Video 2 matches.", P, c0),
            _h("When does he nod?", "t1"), _mom("In video 2 at 1.0s-2.5s.", P, [1.0, 2.5])]},
        {"id": "d1", "type": [1, 2], "split": "train", "conversations": [
            _h("A blurry man in a car.", "t2"), _ret("Video 1 matches.", D, c1),
            _h("When does he smile?", "t3"), _mom("In video 1 at 0.5s-3.0s.", D, [0.5, 3.0]),
            _h("Thanks!", "t4"), {"from": "gpt", "value": "You are welcome."}]},
        {"id": "d2", "type": [2], "split": "train", "conversations": [
            _h("Locate the moment the man turns.", "t5"), _mom("In video 1 at 2.0s-3.5s.", D, [2.0, 3.5])]},
        {"id": "d3", "type": [1], "split": "train", "conversations": [
            _h("A man with a bow tie.", "t6"), _ret("Video 1 matches.", D, c1)]},
    ]
    if missing:
        recs[3]["conversations"][1]["candidate_videos"] = [D] * 9 + ["no_such_video.mp4"]
    return recs


SAMPLE_CFG = SampleConfig(retrieval_frames=4, moment_frames=8, max_len=1024)
CFG = PipelineConfig(sample=SAMPLE_CFG, batch_size=2, buckets=(256, 512, 1024), frame_size=32, timestamp_len=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sample_videos):
    def make(missing=False):
        d = tmp_path_factory.mktemp("corpus")
        (d / "ivcr.json").write_text(json.dumps(corpus_records(missing)))
        # num_candidates=None: the lists repeat the two real clips, which a real corpus may not do
        dialogues, report = load_dialogues(d / "ivcr.json", num_candidates=None)
        assert report.loaded == 4
        return enumerate_samples(dialogues, SAMPLE_CFG)

    root = str(sample_videos["carphone_distorted"].parent)
    cfg = dataclasses.replace(CFG, sample=dataclasses.replace(SAMPLE_CFG, video_root=root))
    return cfg, make(), make(missing=True), root


def run(cfg, refs, tok, n=None, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    p = make_pipeline(cfg, refs, tokenizer=tok, **kw)
    it = iter(p)
    out = list(it) if n is None else [next(it) for _ in range(n)]
    return out, p


def same(a, b) -> bool:
    return jax.tree.all(jax.tree.map(lambda x, y: x.shape == y.shape and np.array_equal(x, y), a, b))


def test_eval_batches_follow_the_contract(setup, tokenizer):
    cfg, refs, _, root = setup
    batches, p = run(cfg, refs, tokenizer, train=False, seed=0)
    assert len(batches) == p.num_batches == 4  # 7 samples, batch 2, last batch padded
    assert p.capacity == {"f4": 10, "f8": 1}
    vt = tokenizer.convert_tokens_to_ids("<VIDEOTOKEN>")
    seen = []
    for b in batches:
        S = b["input_ids"].shape[1]
        assert S in cfg.buckets and b["input_ids"].dtype == np.int32
        for k in ("attention_mask", "labels", "video_token_index"):
            assert b[k].shape == (2, S) and b[k].dtype == np.int32
        # no frame_pool: one pool holding every slot of both rows (2 x (10 x 4 + 8))
        assert b["pool"]["frames"].shape == (1, 96, 32, 32, 3) and b["pool"]["frames"].dtype == np.uint8
        assert b["pool"]["timestamp_ids"].shape == (1, 96, 16) and b["pool"]["timestamp_mask"].dtype == np.int32
        assert b["videos"]["f4"]["pool_index"].shape == (2, 10, 4) and b["videos"]["f8"]["pool_index"].dtype == np.int32
        sv = slot_view(b)
        assert sv["f4"]["frames"].shape == (2, 10, 4, 32, 32, 3) and sv["f4"]["frames"].dtype == np.uint8
        assert sv["f8"]["frames"].shape == (2, 1, 8, 32, 32, 3)
        assert sv["f8"]["timestamp_ids"].shape == (2, 1, 8, 16)
        assert sv["f8"]["timestamp_mask"].dtype == np.int32 and b["videos"]["f8"]["frame_mask"].dtype == bool
        assert b["gt_span"].shape == (2, 2) and b["weight"].dtype == np.float32
        lengths = b["attention_mask"].sum(1)
        # the smallest bucket holding the longest sample
        assert S == min(x for x in cfg.buckets if x >= lengths.max())
        for i in range(2):
            if b["weight"][i] == 0:
                assert b["sample_id"][i] == -1 and lengths[i] == 0 and not b["videos"]["f4"]["video_mask"][i].any()
                continue
            seen.append(int(b["sample_id"][i]))
            n = lengths[i]
            ids, lab, vti = b["input_ids"][i], b["labels"][i], b["video_token_index"][i]
            assert (b["attention_mask"][i, :n] == 1).all() and (ids[n:] == 2).all() and (lab[n:] == -100).all()
            sup = lab != -100
            assert (lab[sup] == ids[sup]).all() and lab[n - 1] == 2
            # video tokens: exactly the <VIDEOTOKEN> positions, pointing into the padded layout
            assert ((vti >= 0) == (ids == vt)).all()
            n4 = int(b["videos"]["f4"]["video_mask"][i].sum())
            n8 = int(b["videos"]["f8"]["video_mask"][i].sum())
            assert sorted(vti[vti >= 0].tolist()) == list(range(n4 * 32)) + list(range(320, 320 + n8 * 32))
    assert sorted(seen) == list(range(7))
    # last batch: one sample and one padding row
    assert batches[-1]["weight"].tolist() == [1.0, 0.0]
    by_id = {int(b["sample_id"][i]): (b, i) for b in batches for i in range(2) if b["weight"][i] > 0}
    # sample 1 = d0 turn 2 (moment on the pristine clip, candidates shown in history)
    b, i = by_id[1]
    assert (b["kind"][i], b["target_index"][i]) == (2, -1) and b["gt_span"][i].tolist() == [1.0, 2.5]
    ref = frames_lib.load_frames(f"{root}/{P}", 8, mode="uniform", size=32)
    sv = slot_view(b)
    assert np.array_equal(sv["f8"]["frames"][i, 0], ref.pixels)
    assert b["duration"][i] == np.float32(ref.duration) and b["videos"]["f8"]["frame_mask"][i, 0].all()
    cand2 = frames_lib.load_frames(f"{root}/{P}", 4, mode="uniform", size=32)
    assert np.array_equal(sv["f4"]["frames"][i, 1], cand2.pixels)
    assert not np.array_equal(sv["f4"]["frames"][i, 0], cand2.pixels)
    # timestamp texts: BOS + "This frame is sampled at t second.", padded with eos (2)
    ts_ids, ts_mask = sv["f8"]["timestamp_ids"][i, 0], sv["f8"]["timestamp_mask"][i, 0]
    for t in range(8):
        m = ts_mask[t].astype(bool)
        assert ts_ids[t, 0] == 1 and (ts_ids[t, ~m] == 2).all() and m[: m.sum()].all()
        text = tokenizer.decode(ts_ids[t, m].tolist(), skip_special_tokens=True)
        assert text == frames_lib.timestamp_text(ref.timestamps[t])
    # sample 0 = d0 turn 1 (retrieval): target is candidate 2 -> 0-based 1
    b, i = by_id[0]
    assert (b["kind"][i], b["target_index"][i], b["duration"][i]) == (1, 1, -1.0)
    assert b["videos"]["f4"]["video_mask"][i].all() and not b["videos"]["f8"]["video_mask"][i].any()
    b, i = by_id[4]  # d1 turn 3: chat
    assert (b["kind"][i], b["target_index"][i]) == (0, -1) and b["gt_span"][i].tolist() == [-1.0, -1.0]
    assert p.stats.counts["samples"] == 7 and p.stats.skipped == 0


def test_same_seed_same_batches_new_frames_each_epoch(setup, tokenizer):
    cfg, refs, _, _ = setup
    cfg = dataclasses.replace(cfg, num_epochs=2)
    a, _ = run(cfg, refs, tokenizer, train=True, seed=3)
    b, _ = run(cfg, refs, tokenizer, train=True, seed=3)
    assert len(a) == len(b) == 7 and same(a, b)  # 14 samples, batch 2
    c, _ = run(cfg, refs, tokenizer, train=True, seed=4, n=3)
    assert [x["sample_id"].tolist() for x in c] != [x["sample_id"].tolist() for x in a[:3]]
    # each epoch visits every sample once, in a new order, with newly drawn frames
    ids = [int(s) for x in a for s in x["sample_id"]]
    assert sorted(ids[:7]) == sorted(ids[7:]) == list(range(7)) and ids[:7] != ids[7:]
    moment_ts = {}
    for x in a:
        for i, sid in enumerate(x["sample_id"].tolist()):
            if x["kind"][i] == 2:
                moment_ts.setdefault(sid, []).append(slot_view(x)["f8"]["timestamp_ids"][i, 0])
    assert moment_ts and all(not np.array_equal(e0, e1) for e0, e1 in moment_ts.values())


def test_resume_from_saved_state_gives_identical_batches(setup, tokenizer, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg, refs, _, _ = setup
    p = make_pipeline(cfg, refs, train=True, seed=0, tokenizer=tokenizer, process_index=0, process_count=1)
    it = iter(p)
    for _ in range(3):
        next(it)
    state = it.get_state()
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]  # crosses the first epoch boundary (7 samples)

    fresh = iter(make_pipeline(cfg, refs, train=True, seed=0, tokenizer=tokenizer, process_index=0, process_count=1))
    fresh.set_state(state)
    assert same([next(fresh) for _ in range(3)], expected)

    restored = iter(make_pipeline(cfg, refs, train=True, seed=0, tokenizer=tokenizer, process_index=0,
                                  process_count=1))
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert same([next(restored) for _ in range(3)], expected)
    mngr.close()


def test_process_shards_are_disjoint(setup, tokenizer):
    cfg, refs, _, _ = setup
    one = dataclasses.replace(cfg, batch_size=1, num_epochs=1)
    got = []
    for pi in range(2):
        batches, _ = run(one, refs, tokenizer, train=True, seed=0, process_index=pi, process_count=2)
        got.append([int(x["sample_id"][0]) for x in batches])
    assert not set(got[0]) & set(got[1]) and sorted(got[0] + got[1]) == list(range(7))
    assert abs(len(got[0]) - len(got[1])) <= 1
    # evaluation: disjoint, and every process yields the same number of batches
    ev = [run(cfg, refs, tokenizer, train=False, seed=0, process_index=pi, process_count=2)[0] for pi in range(2)]
    assert len(ev[0]) == len(ev[1]) == 2
    ids = [[int(s) for x in e for s, w in zip(x["sample_id"], x["weight"]) if w > 0] for e in ev]
    assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(7))


def test_process_batches_stack_into_the_single_process_batch(setup, tokenizer):
    """Process p's local batch is rows [p·b, (p+1)·b) of what one process reading 2·b rows gets (its
    frame pool p too, when the one process pools per shard as well: pack_groups=2)."""
    from ivcr_jax.data.pipeline import pad_text

    cfg, refs, _, _ = setup
    whole, _ = run(dataclasses.replace(cfg, batch_size=2, pack_groups=2), refs, tokenizer, n=3, train=True, seed=0)
    half = dataclasses.replace(cfg, batch_size=1)
    parts = [run(half, refs, tokenizer, n=3, train=True, seed=0, process_index=pi, process_count=2)[0]
             for pi in range(2)]
    for k in range(3):
        S = whole[k]["input_ids"].shape[1]
        stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *[pad_text(p[k], S) for p in parts])
        assert same(stacked, whole[k])


def test_pad_text_extends_with_the_pad_values(setup, tokenizer):
    from ivcr_jax.data.pipeline import pad_text
    from ivcr_jax.tokenizer import PAD_ID

    cfg, refs, _, _ = setup
    (b,), _ = run(cfg, refs, tokenizer, n=1, train=True, seed=0)
    S = b["input_ids"].shape[1]
    p = pad_text(b, S + 8)
    assert p["input_ids"].shape == (cfg.batch_size, S + 8)
    assert (p["input_ids"][:, S:] == PAD_ID).all() and (p["attention_mask"][:, S:] == 0).all()
    assert (p["labels"][:, S:] == -100).all() and (p["video_token_index"][:, S:] == -1).all()
    assert same({k: p[k][:, :S] for k in p if k in ("input_ids", "labels")},
                {k: b[k] for k in ("input_ids", "labels")})
    assert p["videos"] is b["videos"]
    with pytest.raises(ValueError, match="cannot pad"):
        pad_text(b, S - 1)


def test_missing_video_is_skipped_and_counted(setup, tokenizer):
    cfg, _, refs_missing, _ = setup
    one = dataclasses.replace(cfg, batch_size=1, num_epochs=1)
    batches, p = run(one, refs_missing, tokenizer, train=True, seed=0)
    assert sorted(int(x["sample_id"][0]) for x in batches) == list(range(6))  # sample 6 (d3) dropped
    assert p.stats.counts["skipped_video"] == 1 and p.stats.counts["samples"] == 6
    assert "no_such_video.mp4: video file not found" in p.summary() and "1 skipped" in p.summary()
    # evaluation keeps the row (weight 0) so that batch counts stay fixed
    ev, pe = run(cfg, refs_missing, tokenizer, train=False, seed=0)
    last = ev[-1]
    assert last["sample_id"].tolist() == [6, -1] and last["weight"].tolist() == [0.0, 0.0]
    assert last["attention_mask"].sum() == 0 and pe.stats.skipped == 1


def test_sample_too_long_for_its_budget_is_skipped(setup, tokenizer):
    cfg, refs, _, _ = setup
    tight = dataclasses.replace(cfg, batch_size=1, num_epochs=1,
                                sample=dataclasses.replace(cfg.sample, max_len=300))
    batches, p = run(tight, refs, tokenizer, train=True, seed=0)
    kinds = {int(x["sample_id"][0]): int(x["kind"][0]) for x in batches}
    # retrieval turns (10 x 32 video tokens) never fit in 300; moments and chat lose their history
    assert sorted(kinds) == [1, 3, 4, 5] and set(kinds.values()) == {0, 2}
    assert p.stats.counts["skipped_too_long"] == 3
    assert p.stats.counts["history_turns_dropped"] == p.stats.counts["samples_with_history_dropped"] == 3
    assert all(x["attention_mask"].sum() <= 300 and x["input_ids"].shape[1] in (256, 512) for x in batches)


def test_config_from_an_ml_collections_node():
    import ml_collections as mlc

    d = mlc.ConfigDict(dict(retrieval_frames=64, moment_frames=64, frame_size=28, timestamp_len=16, max_turns=7,
                            max_len=1024, text_buckets=(256, 512, 1024), max_retrieval_videos=10,
                            max_moment_videos=2, workers=0, video_root="", lang="en"))
    c = PipelineConfig.from_config(d, batch_size=4)
    assert (c.frame_size, c.timestamp_len, c.buckets, c.batch_size) == (28, 16, (256, 512, 1024), 4)
    assert c.sample.group_capacity() == {"f64": 12} and c.sample.max_turns == 7 and c.sample.video_root is None
    with pytest.raises(ValueError, match="max_len 4096 exceeds the largest text bucket 1024"):
        PipelineConfig(sample=SampleConfig(), buckets=(512, 1024))
