"""Metrics (§8.5): IoU, recalls, BLEU-4, both denominators, per-turn and cascade tables.

The expected numbers below are worked out by hand from the synthetic annotation file and the
predictions (see the comments), not by calling the code under test.
"""
import json
import math

import numpy as np
import pytest
import sacrebleu

from ivcr_jax.data.answers import iou
from ivcr_jax.data.schema import load_dialogues
from ivcr_jax.eval.metrics import (
    bleu4,
    evaluate_predictions,
    moment_recall,
    prior_span,
    random_span_miou,
    random_span_recall,
    recall_at_1,
    recall_at_10,
)

# ------------------------------------------------------------------ synthetic annotation file ---


def _cands(tag):
    return [f"ActivityNet/{tag}{k}.mp4" for k in range(10)]


def _ret(text_id, q, tag, gt_pos):
    """A retrieval turn; gt_pos: 1-based GT position among the candidates, None = not among them."""
    video = f"ActivityNet/{tag}{gt_pos - 1}.mp4" if gt_pos else f"ActivityNet/{tag}_missing.mp4"
    answer = "The intent of this query is to find a complete video." + (f" It is video {gt_pos}." if gt_pos else "")
    return [{"from": "human", "value": q, "Chinese_value": "找视频。", "text_id": text_id},
            {"from": "gpt", "value": answer, "Chinese_value": "这个查询的意图是找到一个完整的视频。",
             "gt_se": [-1, -1], "video_id": video, "candidate_videos": _cands(tag)}]


def _mom(text_id, q, video, se):
    answer = f"The intent of this query is to further locate a moment. It happens in {se[0]} - {se[1]} seconds."
    return [{"from": "human", "value": q, "Chinese_value": "定位瞬间。", "text_id": text_id},
            {"from": "gpt", "value": answer, "Chinese_value": "这个查询的意图是进一步定位瞬间。",
             "gt_se": list(se), "video_id": video}]


def _chat(text_id, q):
    return [{"from": "human", "value": q, "Chinese_value": "你好。", "text_id": text_id},
            {"from": "gpt", "value": "The intent of this query is to chat. Hello!", "Chinese_value": "你好！"}]


RECORDS = [
    # d0: retrieval (GT = candidate 3), moment [10, 20], retrieval (GT = candidate 6)
    {"id": "d0", "type": [1, 2], "split": "test", "conversations":
        _ret("a1", "A man jumps.", "x", 3) + _mom("a2", "When does he jump?", "ActivityNet/x2.mp4", (10, 20))
        + _ret("a3", "Any similar video?", "y", 6)},
    # d1: retrieval (GT 1), moment [0, 10], chat, moment [5, 15]
    {"id": "d1", "type": [1, 2], "split": "test", "conversations":
        _ret("b1", "A dog runs.", "z", 1) + _mom("b2", "When does it run?", "ActivityNet/z0.mp4", (0, 10))
        + _chat("b3", "Thanks!") + _mom("b4", "And when does it stop?", "ActivityNet/z0.mp4", (5, 15))},
    # d2: retrieval whose GT is NOT among the candidates (X-Pool miss; no prediction), moment [2, 4]
    {"id": "d2", "type": [1], "split": "test", "conversations":
        _ret("c1", "A cat sleeps.", "w", None) + _mom("c2", "When does it sleep?", "ActivityNet/w_missing.mp4", (2, 4))},
    # d3: starts with a moment turn [0, 30], then retrieval (GT 10)
    {"id": "d3", "type": [7], "split": "test", "conversations":
        _mom("e1", "When does the car turn?", "ActivityNet/v0.mp4", (0, 30)) + _ret("e2", "Find a car video.", "v", 10)},
    # not scored: another split, and a type-[0] dialogue
    {"id": "t0", "type": [1], "split": "train", "conversations": _ret("t1", "Train query.", "t", 2)},
    {"id": "z0", "type": [0], "split": "test", "conversations": _chat("z1", "Hi.")},
]

PREDICTIONS = {
    "a1": "The intent is video retrieval. The given query happens in video 3.",  # hit
    "a2": "The intent is temporal video grounding. The given query happens in 12 - 22 seconds.",  # IoU 8/12
    "a3": "The intent is video retrieval. The given query happens in 10th video.",  # GT 6: miss
    "b1": "The intent is video retrieval. The given query happens in video 2.",  # GT 1: miss
    "b2": "The given query happens in 0 - 10 seconds.",  # IoU 1
    "b3": "The intent of this query is to chat. Hello!",  # chat
    "b4": "The intent is video retrieval. The given query happens in 10 - 40 seconds.",  # IoU 5/35, wrong intent
    # c1, c2: no prediction (the dialogue was dropped upstream)
    "e1": "The intent is temporal video grounding. The given query happens in 0 - 24 seconds.",  # IoU 0.8
    "e2": "I am not sure which one.",  # unparseable: miss
    "zz": "video 1",  # matches no test turn
}

# By hand.
# evaluated (9 answered turns): retrieval a1 ✓, a3 ✗, b1 ✗, e2 ✗ → R@1 25; all 4 GTs in top-10 → R@10 100.
#   moments a2 2/3, b2 1, b4 1/7, e1 0.8 → IoU≥0.3: 3/4, ≥0.5: 3/4, ≥0.7: 2/4;
#   mIoU = (2/3 + 1 + 1/7 + 0.8) / 4.
# end to end (11 turns): retrieval + c1 (✗, not in top-10) → R@1 1/5, R@10 4/5;
#   moments + c2 (IoU 0) → 3/5, 3/5, 2/5; mIoU = (2/3 + 1 + 1/7 + 0.8) / 5.
IOU_SUM = 2 / 3 + 1 + 1 / 7 + 0.8
EVALUATED = {"n_turns": 9, "n_answered": 9, "n_retrieval": 4, "n_moment": 4, "n_chat": 1, "R@1": 25.0,
             "R@10": 100.0, "R@1 IoU=0.3": 75.0, "R@1 IoU=0.5": 75.0, "R@1 IoU=0.7": 50.0,
             "mIoU": 100 * IOU_SUM / 4}
END_TO_END = {"n_turns": 11, "n_answered": 9, "n_retrieval": 5, "n_moment": 5, "n_chat": 1, "R@1": 20.0,
              "R@10": 80.0, "R@1 IoU=0.3": 60.0, "R@1 IoU=0.5": 60.0, "R@1 IoU=0.7": 40.0,
              "mIoU": 100 * IOU_SUM / 5}
# Per turn, end to end (turn: n_ret, R@1, n_mom, IoU≥.3, ≥.5, ≥.7):
#   1: a1 ✓ b1 ✗ c1 ✗ | e1 0.8           → 3, 33.33, 1, 100, 100, 100
#   2: e2 ✗          | a2 .667 b2 1 c2 0  → 1, 0, 3, 66.67, 66.67, 33.33
#   3: a3 ✗          | –                  → 1, 0, 0
#   4: –             | b4 .143            → 0, –, 1, 0, 0, 0
PER_TURN = [("1", 3, 100 / 3, 1, 100.0, 100.0, 100.0), ("2", 1, 0.0, 3, 200 / 3, 200 / 3, 100 / 3),
            ("3", 1, 0.0, 0, None, None, None), ("4", 0, None, 1, 0.0, 0.0, 0.0),
            ("all", 5, 20.0, 5, 60.0, 60.0, 40.0)]
# Cascade: b1 fails → b2, b4 get IoU 0; c1 fails → c2 (0 anyway); e1 precedes the failed e2.
#   2: a2 .667 b2 0 c2 0 → 33.33, 33.33, 0;   4: b4 0;   all moments .667 0 0 0 .8 → 40, 40, 20.
PER_TURN_CASCADE = [("1", 3, 100 / 3, 1, 100.0, 100.0, 100.0), ("2", 1, 0.0, 3, 100 / 3, 100 / 3, 0.0),
                    ("3", 1, 0.0, 0, None, None, None), ("4", 0, None, 1, 0.0, 0.0, 0.0),
                    ("all", 5, 20.0, 5, 40.0, 40.0, 20.0)]


def write_annotations(path):
    path.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def test_dialogues(tmp_path):
    dialogues, report = load_dialogues(write_annotations(tmp_path / "ivcr.json"), split="test")
    assert [d.id for d in dialogues] == ["d0", "d1", "d2", "d3"] and report.num_skipped == 0
    return dialogues


def assert_metrics(got, expected):
    for k, v in expected.items():
        assert got[k] == (None if v is None else pytest.approx(v, abs=1e-9)), k


def assert_table(rows, expected):
    assert [r["turn"] for r in rows] == [e[0] for e in expected]
    for r, (turn, n_ret, r1, n_mom, i3, i5, i7) in zip(rows, expected):
        assert_metrics(r, {"n_retrieval": n_ret, "R@1": r1, "n_moment": n_mom,
                           "R@1 IoU=0.3": i3, "R@1 IoU=0.5": i5, "R@1 IoU=0.7": i7})


# ---------------------------------------------------------------------------------- IoU ---

@pytest.mark.parametrize("pred,gt,expected", [
    ((0, 10), (0, 10), 1.0),  # identical
    ((1.5, 3.5), (1.5, 3.5), 1.0),
    ((0, 10), (5, 15), 5 / 15),  # overlap
    ((2, 4), (0, 10), 0.2),  # contained
    ((0, 10), (2, 4), 0.2),
    ((0, 5), (5, 10), 0.0),  # touching
    ((0, 2), (5, 10), 0.0),  # disjoint
    ((10, 0), (0, 5), 0.5),  # swapped prediction
    ((0, 5), (10, 0), 0.5),  # swapped ground truth
    ((5, 5), (5, 5), 1.0),  # zero-length, equal points
    ((5, 5), (6, 6), 0.0),  # zero-length, distinct points
    ((5, 5), (0, 10), 0.0),  # zero-length inside a span
    (None, (0, 10), 0.0),  # unparseable prediction
    ((float("nan"), 1), (0, 10), 0.0),
])
def test_iou_hand_cases(pred, gt, expected):
    assert iou(pred, gt) == pytest.approx(expected, abs=1e-12)


def test_recalls():
    assert recall_at_1([3, 2, None, 10], [3, 1, 4, 10]) == 0.5
    assert recall_at_1([1], [None]) == 0.0  # GT not among the candidates
    assert recall_at_1([], []) == 0.0
    assert recall_at_10([True, False, True, True]) == 0.75
    mr = moment_recall([0.3, 0.5, 0.69, 0.7, 0.0])
    assert mr == {0.3: 0.8, 0.5: 0.6, 0.7: 0.2}  # IoU >= t counts
    with pytest.raises(ValueError):
        recall_at_1([1, 2], [1])


# --------------------------------------------------------------------------------- BLEU ---

def test_bleu_matches_sacrebleu_and_hand_values():
    hyps = ["the cat sat on the mat", "a dog runs in the park", "the intent is video retrieval"]
    refs = ["the cat sat on the mat today", "a dog is running in a park", "the intent is video retrieval"]
    ours = bleu4(hyps, refs, lang="en")
    assert ours.score == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score, abs=1e-12)
    # All n-grams match, hypothesis 6 words vs reference 7: BLEU = BP = exp(1 - 7/6).
    assert bleu4(hyps[:1], refs[:1]).score == pytest.approx(100 * math.exp(1 - 7 / 6), abs=1e-9)
    # Chinese: per-character tokens with lang="zh" (4 of 6 characters: BP = exp(1 - 6/4)), while the
    # 13a tokenizer sees one unmatched token.
    assert bleu4(["这个视频"], ["这个视频很好"], lang="zh").score == pytest.approx(100 * math.exp(-0.5), abs=1e-9)
    assert bleu4(["这个视频"], ["这个视频很好"], lang="en").score == 0.0
    assert bleu4([], []) is None


# ------------------------------------------------------------------- evaluate_predictions ---

def lenient(*args, **kw):
    """The lenient scorer over every turn (no test filter): the expectations below are worked out
    with the project's parsers (data/answers.py); test_eval_official.py checks the official ones."""
    return evaluate_predictions(*args, scorer="lenient", test_filter="none", **kw)


def test_headline_metrics_both_denominators(test_dialogues):
    res = lenient(test_dialogues, PREDICTIONS)
    assert_metrics(res["evaluated"], EVALUATED)
    assert_metrics(res["end_to_end"], END_TO_END)
    assert res["n_dialogues"] == {"evaluated": 4, "end_to_end": 4}
    # BLEU-4 over the 9 answered turns against their references (a fraction, as in paper Table 2).
    by_id = {t.text_id: t.answer for d in test_dialogues for t in d.turns}
    answered = [k for k in PREDICTIONS if k in by_id]
    ref = sacrebleu.corpus_bleu([PREDICTIONS[k] for k in answered], [[by_id[k] for k in answered]])
    assert res["evaluated"]["BLEU-4 (sacrebleu)"] == pytest.approx(ref.score, abs=1e-9)
    assert res["evaluated"]["BLEU-4"] == pytest.approx(ref.score / 100, abs=1e-12)
    # End to end: the two missing turns are empty hypotheses.
    all_ids = [t.text_id for d in test_dialogues for t in d.turns]
    ref_e2e = sacrebleu.corpus_bleu([PREDICTIONS.get(k, "") for k in all_ids], [[by_id[k] for k in all_ids]])
    assert res["end_to_end"]["BLEU-4 (sacrebleu)"] == pytest.approx(ref_e2e.score, abs=1e-9)
    assert res["predictions"]["unmatched"] == 1 and res["predictions"]["unmatched_examples"] == ["zz"]
    assert res["parse_failures"] == {"retrieval": 1, "moment": 0}  # e2
    json.dumps(res)  # serialisable


def test_per_turn_and_cascade_tables(test_dialogues):
    res = lenient(test_dialogues, PREDICTIONS)
    assert_table(res["per_turn"]["end_to_end"], PER_TURN)
    assert_table(res["per_turn_cascade"]["end_to_end"], PER_TURN_CASCADE)
    # Evaluated scope, turn 2 without the unanswered c2: a2 .667, b2 1 → 100, 100, 50; cascade: b2 → 0.
    row2 = res["per_turn"]["evaluated"][1]
    assert_metrics(row2, {"n_moment": 2, "R@1 IoU=0.3": 100.0, "R@1 IoU=0.5": 100.0, "R@1 IoU=0.7": 50.0})
    row2c = res["per_turn_cascade"]["evaluated"][1]
    assert_metrics(row2c, {"n_moment": 2, "R@1 IoU=0.3": 50.0, "R@1 IoU=0.5": 50.0, "R@1 IoU=0.7": 0.0})


def test_last_per_turn_row_collects_later_turns(test_dialogues):
    res = lenient(test_dialogues, PREDICTIONS, max_turn=2)
    rows = res["per_turn"]["end_to_end"]
    assert [r["turn"] for r in rows] == ["1", "2", "3+", "all"]
    # 3+: a3 ✗ (retrieval), b4 1/7 (moment)
    assert_metrics(rows[2], {"n_retrieval": 1, "R@1": 0.0, "n_moment": 1, "R@1 IoU=0.3": 0.0,
                             "mIoU": 100 / 7})


def test_intent_accuracy(test_dialogues):
    res = lenient(test_dialogues, PREDICTIONS)
    # 9 answered: all right but b4 (says retrieval on a moment turn) and e2 (no intent) → 7/9.
    assert res["intent"]["accuracy"] == pytest.approx(700 / 9)
    assert res["intent"]["n"] == 9
    assert res["intent"]["confusion"]["moment"] == {"moment": 3, "retrieval": 1}
    assert res["intent"]["confusion"]["retrieval"] == {"retrieval": 3, "None": 1}


def test_missing_predictions_fail_end_to_end(test_dialogues):
    # No predictions at all: nothing evaluated, everything fails end to end.
    res = lenient(test_dialogues, {})
    assert res["evaluated"]["n_turns"] == 0 and res["evaluated"]["R@1"] is None
    assert_metrics(res["end_to_end"], {"n_retrieval": 5, "R@1": 0.0, "R@10": 80.0, "n_moment": 5,
                                       "R@1 IoU=0.3": 0.0, "mIoU": 0.0})
    # A filtered subset evaluated against the whole split: d1 only (b1 ✗; b2 1, b4 1/7).
    res = lenient(test_dialogues[1:2], PREDICTIONS, all_test_turns=test_dialogues)
    assert res["n_dialogues"] == {"evaluated": 1, "end_to_end": 4}
    assert_metrics(res["evaluated"], {"n_turns": 4, "n_retrieval": 1, "R@1": 0.0, "n_moment": 2,
                                      "R@1 IoU=0.3": 50.0, "R@1 IoU=0.7": 50.0})
    # End to end, only d1's predictions count (the other dialogues were not run): b2 1, b4 1/7.
    assert_metrics(res["end_to_end"], {"n_turns": 11, "n_answered": 4, "n_retrieval": 5, "R@1": 0.0,
                                       "n_moment": 5, "R@1 IoU=0.3": 20.0, "R@1 IoU=0.7": 20.0})
    assert res["protocol"]["predictions_outside_samples"] == len(PREDICTIONS) - 4


def test_match_by_question(test_dialogues):
    by_q = {t.question: PREDICTIONS[t.text_id] for d in test_dialogues for t in d.turns if t.text_id in PREDICTIONS}
    res = lenient(test_dialogues, by_q, match="question")
    assert_metrics(res["end_to_end"], END_TO_END)
    assert res["match"] == "question"
    with pytest.raises(ValueError):
        lenient(test_dialogues, {}, match="video")
    with pytest.raises(ValueError):
        evaluate_predictions(test_dialogues, {}, history="free")


def test_chinese_answers_use_the_zh_tokenizer(tmp_path):
    dialogues, _ = load_dialogues(write_annotations(tmp_path / "ivcr.json"), split="test", lang="zh")
    # Predictions equal to the Chinese references: BLEU-4 is 1 with per-character tokens.
    preds = {t.text_id: t.answer for d in dialogues for t in d.turns}
    res = lenient(dialogues, preds, lang="zh")
    assert res["evaluated"]["BLEU-4"] == pytest.approx(1.0)
    # The Chinese intent sentences of Figure 8 are read; the GT index still comes from video_id.
    assert res["intent"]["per_kind"] == {"retrieval": 100.0, "moment": 100.0, "chat": 0.0}  # "你好！" has no intent
    assert res["end_to_end"]["R@10"] == 80.0


# ---------------------------------------------------------------------------- baselines ---

@pytest.mark.parametrize("tau", [0.3, 0.5, 0.7])
def test_random_span_against_the_whole_video_is_closed_form(tau):
    # GT = the whole video: IoU = (b - a) / D, and for two sorted uniforms P(b - a >= τD) = (1 - τ)²,
    # E[(b - a) / D] = 1/3 — whatever the video's length.
    for d in (1.0, 8.0, 37.5):
        assert random_span_recall((0, d), d, tau) == pytest.approx((1 - tau) ** 2, abs=1e-12)
        assert random_span_miou((0, d), d) == pytest.approx(1 / 3, abs=1e-12)
    # A recorded duration shorter than the GT end is stretched to it (the span stays inside the video).
    assert random_span_recall((0, 8), 5.0, tau) == pytest.approx((1 - tau) ** 2, abs=1e-12)
    # A single-point GT is never matched; τ = 0 always is (IoU >= 0).
    assert random_span_recall((4, 4), 10.0, tau) == 0.0 and random_span_miou((4, 4), 10.0) == 0.0
    assert random_span_recall((2, 5), 10.0, 0.0) == 1.0


@pytest.mark.parametrize("gt,d", [((2, 5), 10), ((0, 3), 10), ((7, 10), 10), ((4, 4.5), 10), ((1, 9), 10),
                                  ((30, 95), 120)])
def test_random_span_matches_a_seeded_monte_carlo(gt, d):
    rng = np.random.default_rng(0)
    ab = np.sort(rng.random((1_000_000, 2)) * d, axis=1)
    a, b = ab[:, 0], ab[:, 1]
    inter = np.clip(np.minimum(b, gt[1]) - np.maximum(a, gt[0]), 0, None)
    sampled = inter / (np.maximum(b, gt[1]) - np.minimum(a, gt[0]))
    for tau in (0.3, 0.5, 0.7):   # binomial sd <= 0.0005 at a million draws
        assert random_span_recall(gt, d, tau) == pytest.approx(float((sampled >= tau).mean()), abs=0.003)
    assert random_span_miou(gt, d) == pytest.approx(float(sampled.mean()), abs=0.002)
    # The closed-form mean agrees with integrating the closed-form tail: E[IoU] = ∫ P(IoU >= τ) dτ.
    taus = (np.arange(4000) + 0.5) / 4000
    tail = np.mean([random_span_recall(gt, d, t) for t in taus])
    assert random_span_miou(gt, d) == pytest.approx(tail, abs=1e-5)


def _baseline_records():
    # g0: retrieval, GT = candidate 1 | moment [0, 8] (duration 8 recorded) | retrieval, GT = candidate 5
    # h0: retrieval whose GT is not among the candidates, though its answer says "video 4" | moment [0, 12]
    h1 = _ret("h1", "A horse runs.", "r", None)
    h1[1]["value"] += " It is video 4."
    return [
        {"id": "g0", "type": [1, 2], "split": "test", "conversations":
            _ret("g1", "A boat sails.", "p", 1) + _mom("g2", "When?", "ActivityNet/p0.mp4", (0, 8))
            + _ret("g3", "Another boat.", "q", 5)},
        {"id": "h0", "type": [1, 2], "split": "test", "conversations":
            h1 + _mom("h2", "When does it run?", "ActivityNet/r_missing.mp4", (0, 12))},
    ]


@pytest.fixture
def baseline_dialogues(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(_baseline_records()), encoding="utf-8")
    return load_dialogues(path, split="test")[0]


BASELINE_PREDICTIONS = {"g1": "The given query happens in video 2.", "g2": "It happens in 0 - 8 seconds.",
                        "g3": "The given query happens in video 5."}  # h1, h2 not answered


def test_baselines_random_and_first_stage_over_the_model_rows_turns(baseline_dialogues):
    res = lenient(baseline_dialogues, BASELINE_PREDICTIONS, turn_fields={"g2": {"duration": 8.0}})
    rnd, first = res["baselines"]["random"], res["baselines"]["first_stage"]
    # Moments are both whole-video GTs: g2 by its recorded duration, h2 by the GT-end fallback (no
    # duration recorded), so each turn scores (1 - τ)² and mIoU 1/3.
    whole = {"R@1 IoU=0.3": 49.0, "R@1 IoU=0.5": 25.0, "R@1 IoU=0.7": 9.0, "mIoU": 100 / 3}
    # End to end (g1, g3, h1 | g2, h2; unanswered turns count). R@1 reads the GT position as the
    # model's R@1 does (video_id's place in the list, else the answer's "video N": h1 → 4), so random
    # R@1 = (1/10 + 1/10 + 1/10) / 3 and first stage (GT position 1: g1 only) 1/3. R@10 asks the list:
    # h1's video_id is not in it → 2/3, whatever its answer says.
    assert_metrics(rnd["end_to_end"], {"n_retrieval": 3, "n_moment": 2, "R@1": 10.0, "R@10": 200 / 3,
                                       **whole, "BLEU-4": None})
    assert_metrics(first["end_to_end"], {"n_retrieval": 3, "n_moment": 2, "R@1": 100 / 3, "R@10": 200 / 3,
                                         "R@1 IoU=0.3": None, "R@1 IoU=0.5": None, "R@1 IoU=0.7": None,
                                         "mIoU": None, "BLEU-4": None})
    # Evaluated (answered: g1, g3 | g2): random 1/10; first stage 1/2 (g1 yes, g3 no).
    assert_metrics(rnd["evaluated"], {"n_retrieval": 2, "n_moment": 1, "R@1": 10.0, "R@10": 100.0, **whole})
    assert_metrics(first["evaluated"], {"n_retrieval": 2, "R@1": 50.0, "R@1 IoU=0.5": None})
    # The model's own row on the same turns: g3 hit, g1 miss; g2 IoU 1; R@10 as the baselines'.
    assert_metrics(res["end_to_end"], {"R@1": 100 / 3, "R@10": 200 / 3, "R@1 IoU=0.5": 50.0})
    assert res["baselines"]["durations"] == {**res["baselines"]["durations"], "moment_turns": 2, "recorded": 1,
                                             "gt_end_fallback": 1}
    assert res["r10_candidates"] == "annotation"
    json.dumps(res)


def test_the_prior_span_baseline_is_the_training_mean_span(tmp_path, baseline_dialogues):
    # Training moments [2, 6] and [4, 10] → the constant span [3, 8] on every test moment turn:
    # g2 = [0, 8]: IoU 5/8; h2 = [0, 12]: IoU 5/12.
    train = [{"id": f"t{i}", "type": [2], "split": "train", "conversations":
              _mom(f"t{i}", "When?", "ActivityNet/p0.mp4", span)} for i, span in enumerate([(2, 6), (4, 10)])]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(train + _baseline_records()), encoding="utf-8")
    prior = prior_span(load_dialogues(path, split="train")[0])
    assert prior == pytest.approx((3.0, 8.0))
    res = lenient(baseline_dialogues, BASELINE_PREDICTIONS, prior=prior)
    got = res["baselines"]["prior_span"]
    assert_metrics(got["end_to_end"], {"n_moment": 2, "R@1": None, "R@1 IoU=0.3": 100.0, "R@1 IoU=0.5": 50.0,
                                       "R@1 IoU=0.7": 0.0, "mIoU": 100 * (5 / 8 + 5 / 12) / 2})
    assert_metrics(got["evaluated"], {"n_moment": 1, "R@1 IoU=0.5": 100.0, "mIoU": 62.5})
    assert "prior_span" not in evaluate_predictions(baseline_dialogues, BASELINE_PREDICTIONS)["baselines"]
    assert prior_span([]) is None


def test_a_recorded_duration_changes_the_random_span(baseline_dialogues):
    # g2 = [0, 8] in a 16 s video is no longer the whole video: its chance drops below (1 - τ)².
    res = lenient(baseline_dialogues, BASELINE_PREDICTIONS, turn_fields={"g2": {"duration": 16.0}})
    got = res["baselines"]["random"]["evaluated"]["R@1 IoU=0.5"]
    assert got == pytest.approx(100 * random_span_recall((0, 8), 16.0, 0.5)) and got < 25.0 - 1


def test_r10_counts_the_retrievers_top10_when_the_predictions_carry_it(baseline_dialogues):
    fields = {"g1": {"gt_in_retrieved_top10": False}, "g3": {"gt_in_retrieved_top10": True}}
    res = lenient(baseline_dialogues, BASELINE_PREDICTIONS, turn_fields=fields)
    assert res["r10_candidates"] == "retriever"
    # g1 ✗, g3 ✓; end to end h1 has no predictions line: a miss.
    assert res["evaluated"]["R@10"] == pytest.approx(50.0)
    assert res["end_to_end"]["R@10"] == pytest.approx(100 / 3)
    assert res["baselines"]["first_stage"]["end_to_end"]["R@10"] == pytest.approx(100 / 3)
    # R@1 is unchanged: it re-ranks the annotation's list.
    assert res["end_to_end"]["R@1"] == pytest.approx(100 / 3)
    turns = {t["text_id"]: t for t in res["turns"]}
    assert turns["g1"]["in_candidates"] is True and turns["g1"]["in_top10"] is False
