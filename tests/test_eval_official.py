"""The official scorer and the reference's test protocol (issue 13): worked out by hand from
metrics/eval.py and convert_dataset.ipynb, on a corpus built to hit each rule once.

benchmarks/reference_scorer.py runs the reference's own code beside ours on a generated corpus.
"""
import json

import pytest

from ivcr_jax.data.schema import load_dialogues
from ivcr_jax.eval.__main__ import main
from ivcr_jax.eval.metrics import evaluate_predictions, read_predictions
from ivcr_jax.eval.protocol import passes_test_filter, reference_samples


def cands(tag):
    return [f"S/{tag}{k}.mp4" for k in range(10)]


def ret(tid, q, tag, k, miss=False):
    video = f"S/{tag}_missing.mp4" if miss else f"S/{tag}{k - 1}.mp4"
    return [{"from": "human", "value": q, "text_id": tid},
            {"from": "gpt", "value": f"The intent is retrieval. It is video {k}.", "gt_se": [-1, -1],
             "video_id": video, "candidate_videos": cands(tag)}]


def mom(tid, q, tag, se, video_pos=0, text=None):
    return [{"from": "human", "value": q, "text_id": tid},
            {"from": "gpt", "value": text or f"Found in video 1 at {se[0]}s-{se[1]}s.", "gt_se": list(se),
             "video_id": f"S/{tag}{video_pos}.mp4", "candidate_videos": cands(tag)}]


RECORDS = [
    # r0: kept. retrieval (GT 3), moment [10, 20] — the first retrieval and first moment samples
    {"id": "r0", "split": "test", "type": [1, 2],
     "conversations": ret("a1", "Q a1", "x", 3) + mom("a2", "Q a2", "x", (10, 20))},
    # r1: first retrieval turn missed by the first stage → filtered out, both turns fail
    {"id": "r1", "split": "test", "type": [1], "conversations": ret("b1", "Q b1", "y", 2, miss=True)
     + mom("b2", "Q b2", "y", (0, 5))},
    # r2: moment first, GT video = top-1 → kept; 9 turns: turns 8, 9 are not samples
    {"id": "r2", "split": "test", "type": [2], "conversations": mom("c1", "Q c1", "z", (2, 4))
     + sum((ret(f"c{i}", f"Q c{i}", "z", 5) for i in range(2, 10)), [])},
    # r3: moment first, GT video = candidate 4 (the first stage's R@1 missed) → filtered out
    {"id": "r3", "split": "test", "type": [2], "conversations": mom("d1", "Q d1", "w", (1, 2), video_pos=3)},
    # r4: type [7] → no samples (the notebook keeps only its human messages), counted
    {"id": "r4", "split": "test", "type": [7], "conversations": ret("e1", "Q e1", "v", 1)},
    # r5: malformed (empty question) → skipped by the loader; its 2 turns count as failures
    {"id": "r5", "split": "test", "type": [1], "conversations": [
        {"from": "human", "value": "", "text_id": "f1"},
        {"from": "gpt", "value": "video 1", "gt_se": [-1, -1], "video_id": "S/u0.mp4", "candidate_videos": cands("u")},
        {"from": "human", "value": "Q f2", "text_id": "f2"},
        {"from": "gpt", "value": "at 1s-2s", "gt_se": [1, 2], "video_id": "S/u0.mp4"}]},
    {"id": "t0", "split": "train", "type": [1], "conversations": ret("t1", "Q t1", "t", 1)},
]
# Test turns (type != [0]): retrieval a1 b1 c2..c9 e1 f1 = 12; moment a2 b2 c1 d1 f2 = 5.
PRED = {
    "a1": "video 3",                                 # right, but the first retrieval sample
    "a2": "The given query happens in 10 - 20 seconds.",   # IoU 1, but the first moment sample
    "b1": "video 2", "b2": "0 - 5 seconds",          # right answers on a filtered dialogue: ignored
    "c1": "It happens in 2 - 3 seconds.",            # IoU 0.5
    "c2": "video 5", "c3": "video 5", "c4": "Video 5.",  # 3 hits
    "c5": "the 5th video",                           # lenient reads it, official does not
    "c6": "video 4", "c7": "video 5",                # miss, hit
    "c8": "video 5", "c9": "video 5",                # right, but turns 8 and 9 are not samples
}


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "ivcr.json"
    p.write_text(json.dumps(RECORDS))
    return p


@pytest.fixture
def test_split(corpus):
    return load_dialogues(corpus, split="test")


def test_the_notebook_filter_and_samples(test_split):
    dialogues, report = test_split
    assert [d.id for d in dialogues] == ["r0", "r1", "r2", "r3", "r4"] and report.num_skipped == 1
    assert [passes_test_filter(d) for d in dialogues] == [True, False, True, False, False]
    samples = reference_samples(dialogues)
    assert [s.turn.text_id for s in samples] == ["a1", "a2", "c1", "c2", "c3", "c4", "c5", "c6", "c7"]
    assert len(reference_samples(dialogues, test_filter="none")) == 2 + 2 + 7 + 1 + 1
    # the malformed record's turns, as the reference's denominators read them
    assert [(t.turn, t.kind, t.text_id) for t in report.skipped_turns] == [(1, "retrieval", "f1"), (2, "moment", "f2")]


def test_official_scores_and_denominators(test_split):
    dialogues, report = test_split
    res = evaluate_predictions(dialogues, PRED, skipped_turns=report.skipped_turns)
    e2e = res["end_to_end"]
    # R@1: a1 c2 c3 c4 c7 = 5 of 12; IoU: a2 1, c1 0.5 → ≥0.3: 2/5, ≥0.5: 2/5, ≥0.7: 1/5
    assert e2e["n_retrieval"] == 12 and e2e["n_moment"] == 5
    assert e2e["R@1"] == pytest.approx(100 * 5 / 12)
    assert [e2e[f"R@1 IoU={t}"] for t in (0.3, 0.5, 0.7)] == pytest.approx([40.0, 40.0, 20.0])
    pr = res["protocol"]
    assert pr["dialogues_filtered_out"] == {"first_stage_missed": 2, "type_7": 1}
    assert pr["turns_not_run"] == {"filtered_dialogues": 4, "beyond_turn_7": 2}
    assert pr["malformed_records"] == 1 and pr["malformed_record_turns"] == {"retrieval": 1, "moment": 1}
    assert pr["predictions_outside_samples"] == 4          # b1 b2 c8 c9
    # the lenient row: c5 "the 5th video" is read → 6/12
    assert res["scorers"]["lenient"]["end_to_end"]["R@1"] == pytest.approx(50.0)
    # per-turn rows 1..7 and then the later turns (8+: c8, c9, not samples → misses)
    rows = res["per_turn"]["end_to_end"]
    assert [r["turn"] for r in rows] == ["1", "2", "3", "4", "5", "6", "7", "8+", "all"]
    assert rows[7]["n_retrieval"] == 2 and rows[7]["R@1"] == 0.0


def test_reference_bugs_skip_the_first_samples(test_split):
    dialogues, report = test_split
    res = evaluate_predictions(dialogues, PRED, skipped_turns=report.skipped_turns, reference_bugs=True)
    e2e = res["end_to_end"]
    assert e2e["R@1"] == pytest.approx(100 * 4 / 12)       # a1 not scored
    assert [e2e[f"R@1 IoU={t}"] for t in (0.3, 0.5, 0.7)] == pytest.approx([20.0, 20.0, 0.0])   # a2 not scored
    assert res["protocol"]["not_scored_by_the_reference_bug"] == ["a1", "a2"]
    # cal_multi_reslut has no skip, and scores every turn whose question has a prediction
    assert res["per_turn"]["end_to_end"][0]["R@1"] == pytest.approx(50.0)   # turn 1: a1 ✓, b1 ✓(!), e1 ✗, f1 ✗


def test_unreadable_ground_truth(tmp_path):
    """A GT answer without "video N" / "Ns-Ms": the released scorer counts None == None as a hit and
    raises on the span; official reads the record's candidate position and gt_se, and says so."""
    recs = [{"id": "g", "split": "test", "type": [1, 2], "conversations": [
        {"from": "human", "value": "Q1", "text_id": "g1"},
        {"from": "gpt", "value": "This one.", "gt_se": [-1, -1], "video_id": "S/x2.mp4", "candidate_videos": cands("x")},
        {"from": "human", "value": "Q2", "text_id": "g2"},
        {"from": "gpt", "value": "It happens in 2.0 - 4.5 seconds.", "gt_se": [2.0, 4.5], "video_id": "S/x2.mp4"}]}]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(recs))
    dialogues, _ = load_dialogues(p, split="test")
    preds = {"g1": "no idea", "g2": "2 - 4.5 seconds"}
    off = evaluate_predictions(dialogues, preds)
    assert off["end_to_end"]["R@1"] == 0.0 and off["end_to_end"]["R@1 IoU=0.7"] == 100.0
    assert off["protocol"]["gt_read_from_record"] == {"retrieval": 1, "moment": 1}
    out = tmp_path / "o"
    pred = tmp_path / "p.jsonl"
    pred.write_text("".join(json.dumps({"text_id": k, "answer": v}) + "\n" for k, v in preds.items()))
    assert main(["--annotations", str(p), "--predictions", str(pred), "--out", str(out), "--no-charts",
                 "--reference-bugs"]) == 2
    assert main(["--annotations", str(p), "--predictions", str(pred), "--out", str(out), "--no-charts",
                 "--reference-bugs", "--scorer", "lenient"]) == 2
    # the retrieval turn alone: None == None is a hit there
    res = evaluate_predictions(dialogues, {"g1": "no idea"}, reference_bugs=True, test_filter="none")
    assert res["per_turn"]["end_to_end"][0]["R@1"] == 100.0


def test_question_matching_takes_the_first_line_and_the_raw_string(tmp_path, corpus):
    dialogues, _ = load_dialogues(corpus, split="test")
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in
                           [("Q a1", "video 3"), ("Q a1", "video 9"), ("Q a1 ", "video 9")]) + "\n")
    preds, _, stats, _ = read_predictions(p, match="question")
    assert preds == {"Q a1": "video 3", "Q a1 ": "video 9"} and stats["duplicates"] == 1
    res = evaluate_predictions(dialogues, preds, match="question")
    assert [t["hit"] for t in res["turns"] if t["text_id"] == "a1"] == [True]


def test_reference_result_json(tmp_path, corpus, capsys):
    """evaluate.py's result.json, aligned by position with the notebook's samples."""
    dialogues, _ = load_dialogues(corpus, split="test")
    samples = reference_samples(dialogues)
    entries = [{"user_q": f"Candidate videos : <VID> 1 </VID> ....{s.turn.question}", "output": PRED.get(s.turn.text_id, "")}
               for s in samples]
    rj = tmp_path / "result.json"
    rj.write_text(json.dumps(entries))
    out = tmp_path / "o"
    assert main(["--annotations", str(corpus), "--predictions", str(rj), "--out", str(out), "--no-charts"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["end_to_end"]["R@1"] == pytest.approx(100 * 5 / 12)
    # --reference-bugs: cal_multi_reslut matches user_q (the rendered message) with the raw
    # questions, so the released per-turn table is 0 everywhere; the headline is not
    assert main(["--annotations", str(corpus), "--predictions", str(rj), "--out", str(out), "--no-charts",
                 "--reference-bugs"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["end_to_end"]["R@1"] == pytest.approx(100 * 4 / 12)
    assert all(r["R@1"] == 0.0 for r in m["per_turn"]["end_to_end"] if r["n_retrieval"])
    rj.write_text(json.dumps(entries[1:] + entries[:1]))   # out of order
    assert main(["--annotations", str(corpus), "--predictions", str(rj), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "entry 0" in err and "does not end with the question of sample 0" in err and "Traceback" not in err


def test_shown_dialogue_uses_no_video_the_system_could_not_know(test_split):
    """A first-turn moment is shown the first stage's top-1; in the closed loop a moment turn after a
    retrieval turn is shown the candidate the model chose, numbered so; teacher forcing shows the GT."""
    from ivcr_jax.rollout import shown_dialogue

    dialogues, _ = test_split
    r0, r3 = dialogues[0], dialogues[3]
    assert r3.turns[0].video_id == "S/w3.mp4" and shown_dialogue(r3, 0).turns[0].video_id == "S/w0.mp4"
    teacher = shown_dialogue(r0, 1)
    assert teacher.turns[1].video_id == r0.turns[1].video_id and teacher.turns[0].answer == r0.turns[0].answer
    loop = shown_dialogue(r0, 1, {(r0.index, 0): "It is video 7."})
    assert loop.turns[0].answer == "It is video 7."
    assert loop.turns[1].video_id == "S/x6.mp4" and loop.turns[1].answer_video == 7
    unparsed = shown_dialogue(r0, 1, {(r0.index, 0): "no idea"})
    assert unparsed.turns[1].video_id == "S/x0.mp4" and unparsed.turns[1].answer_video == 1
