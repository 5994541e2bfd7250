"""The paper's metrics: re-ranking R@1, R@10, moment R@1 at IoU thresholds, BLEU-4, per-turn tables.

Follows reference-architecture §8.5 (official `metrics/eval.py`, HEAD, and the older
`metrics/tvg/conv_cal.py` for the cascade rule) and paper Tables 2 and 4.

Units in the returned dictionaries: recalls, intent accuracy and mIoU are **percentages** (0–100),
as in the paper's tables; ``BLEU-4`` is a **fraction** (0–1), as in Table 2 (sacrebleu's 0–100
score divided by 100), and ``BLEU-4 (sacrebleu)`` keeps the 0–100 score.

Scorers (``scorer=``; docs/evaluation.md has the whole comparison with the reference):

* ``official`` (the default, the headline): the released ``metrics/eval.py``'s parsers
  (``data/official_answers.py``): the prediction's first ``video N`` (N in 0..10) and its first
  ``a - b`` with ``extract_time``'s fallbacks; the ground truth read from the *answer text*
  (``video N``, ``Ns-Ms``), as the reference reads it — where the text has none (the released
  scorer cannot score such a turn), from the record (candidate position, ``gt_se``), counted in
  ``protocol["gt_read_from_record"]``. Its first-sample skip (the dict-initialisation branch of
  ``cal_reslut`` never scores the first retrieval and the first moment sample) is fixed.
* ``lenient``: the project's parsers (``data/answers.py``: ordinals, "from a to b", clock times…),
  the ground truth from ``gt_se`` and the candidate position; given beside the headline
  (``results["scorers"]``), never in its place.
* ``reference_bugs=True``: the released scorer exactly — the skip, ``None == None`` counted as a
  hit, and an exception (:class:`~ivcr_jax.data.official_answers.OfficialScorerError`) where it
  raises. ``benchmarks/reference_scorer.py`` runs the reference's own code beside ours.

Which turns count (``test_filter=``, ``eval/protocol.py``): ``"reference"`` scores only the
reference's test samples (its notebook's filter: the first stage got the first turn right; turns
1–7), a prediction for any other turn is ignored; ``"none"`` scores every turn with a prediction.
Both denominators are reported. ``evaluated``: the turns that have a prediction. ``end_to_end``:
every turn of the test split (type ≠ [0]), the turns of records skipped as malformed included
(``skipped_turns``), as the reference counts them from the raw JSON; a turn without a prediction
is a failure (IoU 0). The reference's R@1 / IoU numbers use the end-to-end denominator.

An unparseable answer is a miss (IoU 0), never an error. Predictions are matched by ``text_id``;
``match="question"`` reproduces the reference's ``find_sentence`` (the raw question string, the
first prediction with it; where one question string occurs in several turns, all of them receive
the same prediction, as in the reference; the count is reported). R@10 is whether the
ground-truth ``video_id`` is in the candidate list the turn actually used: the annotation's
``candidate_videos`` (the list the prompt shows), or, when the predictions file says so per turn
(``gt_in_retrieved_top10``, written by ``run_model`` with ``--index``), the project's own
retriever's top 10. ``results["r10_candidates"]`` says which.

Baselines (``results["baselines"]``), over the same turns as the model's rows: ``random``, the
**exact expectation** of a uniform choice among a retrieval turn's candidates and of a uniform
random span (the sorted pair of two independent uniforms on ``[0, duration]``) on a moment turn
(:func:`random_span_recall`, :func:`random_span_miou`: closed forms, no sampling);
``first_stage``, candidate 1 of the list as the answer (the first stage does not localise, so its
moment metrics are None); and, when the training split is given, ``prior_span``, one constant
span (:func:`prior_span`) on every moment turn.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

from ivcr_jax.data import official_answers
from ivcr_jax.data.answers import iou, parse_intent, parse_moment, parse_video_index
from ivcr_jax.eval import protocol

__all__ = [
    "iou",
    "recall_at_1",
    "recall_at_10",
    "moment_recall",
    "bleu4",
    "TurnScore",
    "score_turns",
    "evaluate_predictions",
    "read_predictions",
    "PredictionsFormatError",
    "random_span_recall",
    "random_span_miou",
    "baselines",
    "prior_span",
    "THRESHOLDS",
]

THRESHOLDS = (0.3, 0.5, 0.7)
KINDS = ("retrieval", "moment", "chat")
# Per-turn fields a predictions line may carry besides the answer (run_model writes them).
RETRIEVED_FIELD = "gt_in_retrieved_top10"  # retrieval turns, --index: the GT is in the retriever's top 10
TURN_FIELDS = {"duration": "a positive number (seconds)", RETRIEVED_FIELD: "true or false"}


# ------------------------------------------------------------------------- basic metrics ---

def recall_at_1(pred_indices: Sequence[int | None], gt_indices: Sequence[int | None]) -> float:
    """Fraction of queries whose predicted candidate index equals the ground-truth index.

    A ``None`` prediction (unparseable) or a ``None`` ground truth (not among the candidates) is a miss.
    Returns 0.0 for no queries.
    """
    if len(pred_indices) != len(gt_indices):
        raise ValueError(f"recall_at_1: {len(pred_indices)} predictions vs {len(gt_indices)} ground truths")
    if not gt_indices:
        return 0.0
    hits = sum(1 for p, g in zip(pred_indices, gt_indices) if p is not None and g is not None and p == g)
    return hits / len(gt_indices)


def recall_at_10(gt_in_candidates: Sequence[bool]) -> float:
    """Fraction of queries whose ground-truth video is in the retriever's top-10 candidate list."""
    if not gt_in_candidates:
        return 0.0
    return sum(1 for x in gt_in_candidates if x) / len(gt_in_candidates)


def _clip(poly: list[tuple[float, float]], a: float, b: float, c: float) -> list[tuple[float, float]]:
    """The part of the convex polygon ``poly`` where ``a x + b y + c >= 0`` (Sutherland–Hodgman)."""
    out = []
    for i, p in enumerate(poly):
        q = poly[(i + 1) % len(poly)]
        fp, fq = a * p[0] + b * p[1] + c, a * q[0] + b * q[1] + c
        if fp >= 0:
            out.append(p)
        if (fp >= 0) != (fq >= 0):
            t = fp / (fp - fq)
            out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def _area(poly: list[tuple[float, float]]) -> float:
    """Shoelace area of a polygon (0 for fewer than three vertices)."""
    n = len(poly)
    return abs(sum(poly[i][0] * poly[(i + 1) % n][1] - poly[(i + 1) % n][0] * poly[i][1]
                   for i in range(n))) / 2 if n >= 3 else 0.0


def _unit_span(gt: Sequence[float], duration: float) -> tuple[float, float] | None:
    """The ground-truth span as fractions of the video, ``None`` when the video has no length."""
    s, e = sorted((float(gt[0]), float(gt[1])))
    d = max(float(duration), e)
    return None if d <= 0 else (max(s, 0.0) / d, e / d)


def random_span_recall(gt: Sequence[float], duration: float, threshold: float) -> float:
    """P(IoU >= ``threshold``) of a uniform random span against ``gt`` in a video of ``duration`` s.

    The random span is the sorted pair (a, b) of two independent uniforms on ``[0, D]``
    (``D = max(duration, gt end)``): density 2 on the triangle a < b of the unit square, after
    scaling by D (IoU does not change). An overlapping span lies in one of four rectangles, by
    where a falls against s and b against e; in each, IoU >= τ is one linear inequality:

    * a <= s, b >= e (holds the GT):    L / (b - a) >= τ
    * s <= a, b <= e (inside the GT):   (b - a) / L >= τ
    * a <= s <= b <= e:                  (b - s) / (e - a) >= τ
    * s <= a <= e <= b:                  (e - a) / (b - s) >= τ

    so the probability is twice the summed areas of four convex polygons: exact, no sampling.
    """
    t = float(threshold)
    if t <= 0:
        return 1.0
    if t > 1:
        return 0.0
    unit = _unit_span(gt, duration)
    if unit is None:  # a zero-length video: both spans are the point 0, IoU 1
        return 1.0
    s, e = unit
    L = e - s
    rect = lambda x0, x1, y0, y1: [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    parts = [(rect(0, s, e, 1), (1.0, -1.0, L / t)),
             (rect(s, e, s, e), (-1.0, 1.0, -t * L)),
             (rect(0, s, s, e), (t, 1.0, -s - t * e)),
             (rect(s, e, e, 1), (-1.0, -t, e + t * s))]
    return min(1.0, 2.0 * sum(_area(_clip(poly, *h)) for poly, h in parts))


def _xlogx(x: float) -> float:
    return x * math.log(x) if x > 0 else 0.0


def random_span_miou(gt: Sequence[float], duration: float) -> float:
    """E[IoU] of a uniform random span (as :func:`random_span_recall`) against ``gt``, in closed form.

    With the video scaled to [0, 1], GT [s, e], L = e - s, density 2 on a < b, the four regions of
    :func:`random_span_recall` integrate to

    * holds the GT:  ∫∫ L / (b - a) = L (L ln L - e ln e - (1 - s) ln(1 - s))
    * inside:        ∫∫ (b - a) / L = L² / 6
    * left overlap:  ∫∫ (b - s) / (e - a) = L² / 2 · ln(e / L)
    * right overlap: ∫∫ (e - a) / (b - s) = L² / 2 · ln((1 - s) / L)

    and E[IoU] is twice their sum (GT = the whole video: 1/3, the mean length of a random span).
    """
    unit = _unit_span(gt, duration)
    if unit is None:
        return 1.0
    s, e = unit
    L = e - s
    if L <= 0:
        return 0.0
    holds = L * (_xlogx(L) - _xlogx(e) - _xlogx(1 - s))
    return 2.0 * (holds + L * L / 6 + L * L / 2 * (math.log(e / L) + math.log((1 - s) / L)))


def moment_recall(ious: Sequence[float], thresholds: Iterable[float] = THRESHOLDS) -> dict[float, float]:
    """R@1 at each IoU threshold: the fraction of IoUs ``>= t`` (TimeChat's comparison)."""
    ious = list(ious)
    return {t: (sum(1 for x in ious if x >= t) / len(ious) if ious else 0.0) for t in thresholds}


def bleu_tokenize(lang: str) -> str:
    """sacrebleu tokenizer for an annotation language: "13a" for English, "zh" for Chinese."""
    return "zh" if lang.lower().startswith("zh") else "13a"


def bleu4(hypotheses: Sequence[str], references: Sequence[str], *, lang: str = "en"):
    """Corpus BLEU-4 of ``hypotheses`` against one reference each, via ``sacrebleu.corpus_bleu``.

    sacrebleu's defaults (exponential smoothing, 4-grams); tokenizer from :func:`bleu_tokenize`.
    Returns the ``sacrebleu.BLEUScore`` (``.score`` is 0–100), or None for an empty corpus.
    """
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"bleu4: {len(hypotheses)} hypotheses vs {len(references)} references")
    if not hypotheses:
        return None
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=bleu_tokenize(lang))


# ------------------------------------------------------------------------- turn scoring ---

@dataclasses.dataclass
class TurnScore:
    """One test turn, scored. ``turn`` is the 1-based position of the turn in its dialogue."""

    dialogue: int
    dialogue_id: str | None
    turn: int
    text_id: str | None
    kind: str
    answered: bool
    prediction: str | None = None
    reference: str = ""
    pred_intent: str | None = None
    # retrieval turns
    gt_index: int | None = None
    pred_index: int | None = None
    hit: bool | None = None
    n_candidates: int | None = None  # the annotation's list, the one the prompt shows
    in_candidates: bool | None = None  # the GT video_id is in that list
    in_top10: bool | None = None  # what R@10 counts: in_candidates, or the retriever's top 10 (--index)
    # moment turns
    gt_span: tuple[float, float] | None = None
    pred_span: tuple[float, float] | None = None
    iou: float | None = None
    duration: float | None = None  # the video's length from the predictions file, None if unknown
    # the same, under the cascade rule (a failed retrieval turn fails every later turn)
    cascade_hit: bool | None = None
    cascade_iou: float | None = None
    # how the turn entered the count
    in_samples: bool = True  # among the turns the protocol runs (the reference's test samples)
    gt_source: str | None = None  # "answer": read from the GT answer text; "record": gt_se / candidate position
    malformed: bool = False  # its record was skipped as malformed: counted, never answered

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


SCORERS = ("official", "lenient")
PARSERS = ("official", "lenient", "reference")  # "reference": official with the released scorer's bugs


def _gt_index(turn) -> int | None:
    """The 1-based position of the ground-truth video among the candidates, or None (not among them).

    The position of ``video_id`` in ``candidate_videos`` first; failing that, the "video N" of the
    ground-truth answer, which is where the reference reads it (§8.3, §8.5).
    """
    if getattr(turn, "target_index", None) is not None:
        return int(turn.target_index)
    if getattr(turn, "answer_video", None) is not None:
        return int(turn.answer_video)
    return parse_video_index(turn.answer)


def r10_candidates(turn_fields: Mapping[str, Mapping] | None) -> str:
    """Which list R@10 counts: ``"retriever"`` when a predictions line carries the retriever's
    top-10 flag (``run_model --index``), else ``"annotation"`` (the JSON's ``candidate_videos``)."""
    return "retriever" if any(RETRIEVED_FIELD in f for f in (turn_fields or {}).values()) else "annotation"


def turn_key(turn, match: str) -> str:
    """The predictions key of a turn: its ``text_id``, or its question as written in the file (the
    reference's ``find_sentence`` compares the raw string)."""
    if match == "text_id":
        return turn.text_id
    return turn.question_raw if getattr(turn, "question_raw", None) is not None else turn.question


def _retrieval_gt(t, parsers: str) -> tuple[int | None, str | None]:
    """The GT index and where it was read: the reference reads the answer's "video N"
    (``extract_video_numbers_first_only``); ``official`` falls back to the candidate position
    where the answer names none; ``lenient`` reads the candidate position first (:func:`_gt_index`)."""
    if parsers == "lenient":
        return _gt_index(t), "record" if getattr(t, "target_index", None) is not None else "answer"
    k = official_answers.video_index(t.answer)
    if k is not None or parsers == "reference":
        return k, "answer"
    return (int(t.target_index), "record") if t.target_index is not None else (None, None)


def _moment_gt(t, parsers: str) -> tuple[tuple[float, float] | None, str | None]:
    """The GT span and where it was read: the reference reads the answer text's first ``Ns-Ms``
    (``extract_time_ranges``), as written (no reordering); ``official`` falls back to ``gt_se``
    where the text has none (the released scorer raises there); ``lenient`` reads ``gt_se``."""
    if parsers != "lenient":
        spans = official_answers.gt_spans(t.answer)
        if len(spans) >= 2:
            return (spans[0], spans[1]), "answer"
        if parsers == "reference":
            return None, None
    return ((float(t.gt_se[0]), float(t.gt_se[1])), "record") if t.gt_se is not None else (None, None)


def _score_moment(s: TurnScore, t, pred: str | None, parsers: str) -> None:
    s.gt_span, s.gt_source = _moment_gt(t, parsers)
    if parsers == "lenient":
        s.pred_span = parse_moment(pred) if pred is not None else None
        s.iou = iou(s.pred_span, s.gt_span)
        return
    if pred is None:
        s.iou = 0.0
        return
    s.pred_span = official_answers.moment(pred)
    if s.gt_span is None:  # only under "reference": the released scorer raises here
        raise official_answers.OfficialScorerError(
            f"dialogue {s.dialogue_id!r} turn {s.turn} ({s.text_id}): the ground-truth answer has no "
            f"'<a>s-<b>s' span, where the released scorer raises (score without --reference-bugs: the "
            f"official scorer reads gt_se there)")
    try:
        s.iou = official_answers.iou(s.gt_span, s.pred_span)
    except official_answers.OfficialScorerError as e:
        if parsers == "reference":
            raise official_answers.OfficialScorerError(
                f"dialogue {s.dialogue_id!r} turn {s.turn} ({s.text_id}): {e}, where the released scorer "
                f"divides by zero") from None
        s.iou = 0.0  # a zero-length union: two identical points


def score_turns(dialogues: Sequence, predictions: Mapping[str, str], *, match: str = "text_id",
                turn_fields: Mapping[str, Mapping] | None = None, parsers: str = "lenient",
                scope: set[tuple[int, int]] | None = None, skipped_turns: Sequence = ()) -> list[TurnScore]:
    """Score every turn of ``dialogues`` against ``predictions`` (key → answer text).

    ``parsers``: ``"lenient"`` (``data/answers.py``: more answer formats; the GT from ``gt_se`` and
    the candidate position), ``"official"`` (the released scorer's parsers, ``data/official_answers.py``,
    the GT read from the answer text; where the text has none, from the record, counted in
    ``gt_source``), ``"reference"`` (the same with the released scorer's behaviour kept: an
    unreadable GT index equals an unparseable prediction, and it raises where it raises).

    ``scope``: the ``(dialogue index, turn index)`` pairs the protocol runs (the reference's test
    samples); a prediction for another turn is ignored (``answered=False``, ``in_samples=False``).
    None: every turn. ``skipped_turns`` (``LoadReport.skipped_turns``): the turns of malformed
    records, added as unanswered failures.

    Turns without a prediction are kept with ``answered=False`` and scored as failures. The cascade
    columns follow `conv_cal.py`: once a retrieval turn of a dialogue is not a hit (wrong, unparseable
    or unanswered), every later retrieval turn is a miss and every later moment turn has IoU 0.

    ``turn_fields`` (key → the optional fields of its predictions line, :func:`read_predictions`):
    ``duration`` is kept for the random baseline; when any retrieval turn carries
    ``gt_in_retrieved_top10``, R@10 counts that flag (the retriever's top 10) on every retrieval
    turn, a turn without it (no predictions line) as a miss. Otherwise R@10 counts whether the GT
    ``video_id`` is in the turn's ``candidate_videos``.
    """
    if match not in ("text_id", "question"):
        raise ValueError(f"match must be 'text_id' or 'question', got {match!r}")
    if parsers not in PARSERS:
        raise ValueError(f"parsers must be one of {', '.join(PARSERS)}, got {parsers!r}")
    fields = turn_fields or {}
    retrieved = r10_candidates(fields) == "retriever"
    scores: list[TurnScore] = []
    for d in dialogues:
        failed = False
        for k, t in enumerate(d.turns):
            pos = (t.index if isinstance(getattr(t, "index", None), int) else k) + 1  # Turn.index is 0-based
            key = turn_key(t, match)
            in_samples = scope is None or (d.index, pos - 1) in scope
            pred = predictions.get(key) if in_samples else None
            s = TurnScore(dialogue=d.index, dialogue_id=d.id, turn=pos, text_id=t.text_id, kind=t.kind,
                          answered=pred is not None, prediction=pred, reference=t.answer, in_samples=in_samples)
            if pred is not None:
                s.pred_intent = parse_intent(pred)
            if t.kind == "retrieval":
                s.gt_index, s.gt_source = _retrieval_gt(t, parsers)
                s.n_candidates = len(t.candidate_videos)
                s.in_candidates = t.video_id is not None and t.video_id in t.candidate_videos
                s.in_top10 = bool(fields.get(key, {}).get(RETRIEVED_FIELD, False)) if retrieved else s.in_candidates
                if pred is not None:
                    s.pred_index = (parse_video_index(pred) if parsers == "lenient"
                                    else official_answers.video_index(pred))
                if parsers == "reference":  # `gt_index == pre_index`: None == None is a hit there
                    s.hit = pred is not None and s.pred_index == s.gt_index
                else:
                    s.hit = s.gt_index is not None and s.pred_index == s.gt_index
                s.cascade_hit = s.hit and not failed
                if not s.hit:
                    failed = True
            elif t.kind == "moment":
                _score_moment(s, t, pred, parsers)
                s.cascade_iou = 0.0 if failed else s.iou
                s.duration = fields.get(key, {}).get("duration")
            scores.append(s)
    for st in skipped_turns:
        s = TurnScore(dialogue=st.record, dialogue_id=st.record_id, turn=st.turn, text_id=st.text_id, kind=st.kind,
                      answered=False, malformed=True, in_samples=False)
        if st.kind == "retrieval":
            s.hit = s.cascade_hit = s.in_candidates = s.in_top10 = False
        elif st.kind == "moment":
            s.iou = s.cascade_iou = 0.0
        scores.append(s)
    return scores


# ---------------------------------------------------------------------------- summaries ---

def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _summary(scores: Sequence[TurnScore], *, thresholds, lang: str, answered_only: bool,
             cascade: bool = False, with_bleu: bool = True) -> dict:
    """Headline metrics over ``scores`` (already restricted to the scope's turns)."""
    ret = [s for s in scores if s.kind == "retrieval"]
    mom = [s for s in scores if s.kind == "moment"]
    hits = [bool(s.cascade_hit if cascade else s.hit) for s in ret]
    ious = [float((s.cascade_iou if cascade else s.iou) or 0.0) for s in mom]
    out = {
        "n_turns": len(scores),
        "n_answered": sum(s.answered for s in scores),
        "n_retrieval": len(ret),
        "n_moment": len(mom),
        "n_chat": sum(s.kind == "chat" for s in scores),
        "R@1": _pct(sum(hits) / len(hits)) if hits else None,
        "R@10": _pct(recall_at_10([bool(s.in_top10) for s in ret])) if ret else None,
    }
    mr = moment_recall(ious, thresholds)
    for t in thresholds:
        out[f"R@1 IoU={t:g}"] = _pct(mr[t]) if mom else None
    out["mIoU"] = _pct(sum(ious) / len(ious)) if mom else None
    if with_bleu:
        pool = [s for s in scores if s.answered] if answered_only else list(scores)
        b = bleu4([s.prediction or "" for s in pool], [s.reference for s in pool], lang=lang)
        out["BLEU-4"] = None if b is None else b.score / 100.0
        out["BLEU-4 (sacrebleu)"] = None if b is None else b.score
    return out


BASELINES = {
    "random": "the expected score of a uniform choice among each retrieval turn's candidates and of a "
              "uniform random span (sorted pair of two uniforms on [0, duration]) on each moment turn, "
              "computed exactly (closed form, no sampling)",
    "first_stage": "candidate 1 of each retrieval turn's list is the answer; the first stage does not "
                   "localise moments (–)",
    "prior_span": "one constant span on every moment turn, the mean ground-truth start and end of the "
                  "training split's moment turns (what a model that ignores the video can learn); no "
                  "retrieval answers (–)",
}


def prior_span(dialogues: Sequence) -> tuple[float, float] | None:
    """``(mean start, mean end)`` in seconds of the moment turns' ``gt_se`` in ``dialogues`` (the
    training split), or None when there is none: the span of the ``prior_span`` baseline."""
    spans = [sorted(t.gt_se) for d in dialogues for t in d.turns if t.kind == "moment" and t.gt_se is not None]
    if not spans:
        return None
    return (sum(s for s, _ in spans) / len(spans), sum(e for _, e in spans) / len(spans))


def _random_duration(s: TurnScore) -> float:
    """The video length of the random span: the recorded duration, never shorter than the GT end."""
    return max(float(s.gt_span[1]), float(s.duration or 0.0))


def _baseline_summary(scores: Sequence[TurnScore], name: str, *, thresholds, prior=None) -> dict:
    """One baseline's headline metrics over ``scores`` (the model row's turns, answered or not)."""
    ret = [s for s in scores if s.kind == "retrieval"]
    mom = [s for s in scores if s.kind == "moment"]  # a malformed record's turn (no GT span) scores 0
    mean = lambda xs: _pct(sum(xs) / len(xs)) if xs else None
    if name == "prior_span":
        ious = [iou(prior, s.gt_span) if s.gt_span is not None else 0.0 for s in mom]
        out = {"n_retrieval": len(ret), "n_moment": len(mom), "R@1": None, "R@10": None,
               "span": [round(float(x), 3) for x in prior]}
        mr = moment_recall(ious, thresholds)
        for t in thresholds:
            out[f"R@1 IoU={t:g}"] = _pct(mr[t]) if mom else None
        out["mIoU"], out["BLEU-4"] = mean(ious), None
        return out

    def right(s: TurnScore) -> float:  # P(the baseline names the GT candidate)
        n, g = s.n_candidates or 0, s.gt_index
        if g is None or not 1 <= g <= n:
            return 0.0
        return 1.0 / n if name == "random" else float(g == 1)

    out = {"n_retrieval": len(ret), "n_moment": len(mom),
           "R@1": mean([right(s) for s in ret]),
           # the candidate list is the model's own: a baseline choosing from it has the same R@10
           "R@10": _pct(recall_at_10([bool(s.in_top10) for s in ret])) if ret else None}
    known = lambda f: [f(s) if s.gt_span is not None else 0.0 for s in mom]
    for t in thresholds:
        out[f"R@1 IoU={t:g}"] = (mean(known(lambda s: random_span_recall(s.gt_span, _random_duration(s), t)))
                                 if name == "random" else None)
    out["mIoU"] = mean(known(lambda s: random_span_miou(s.gt_span, _random_duration(s)))) if name == "random" else None
    out["BLEU-4"] = None
    return out


def baselines(scopes: Mapping[str, Sequence[TurnScore]], *, thresholds=THRESHOLDS,
              prior: Sequence[float] | None = None) -> dict:
    """The random and first-stage rows for each scope (name → its scored turns), the prior-span
    row when ``prior`` (:func:`prior_span` of the training split) is given, and which video
    lengths the random span used: recorded durations, or the GT end where none was recorded."""
    out: dict = {name: {"description": desc, **{scope: _baseline_summary(ss, name, thresholds=thresholds,
                                                                         prior=prior)
                                                 for scope, ss in scopes.items()}}
                 for name, desc in BASELINES.items() if name != "prior_span" or prior is not None}
    mom = {id(s): s for ss in scopes.values() for s in ss if s.kind == "moment" and s.gt_span is not None}
    known = sum(1 for s in mom.values() if s.duration)
    out["durations"] = {"moment_turns": len(mom), "recorded": known, "gt_end_fallback": len(mom) - known,
                        "rule": "D = max(GT end, the recorded duration); the GT end where none is recorded "
                                "(as if the video ended with the GT: an approximation, not a bound)"}
    return out


def _bucket(turn: int, max_turn: int) -> str:
    return f"{max_turn + 1}+" if turn > max_turn else str(turn)


def _per_turn(scores: Sequence[TurnScore], *, thresholds, max_turn: int, cascade: bool, lang: str) -> list[dict]:
    """Paper Table 4: one row per turn position 1..max_turn (the reference prints turns <= 7), then
    ``max_turn+1+`` (the later turns, which the reference counts but does not print), then ``all``."""
    groups: dict[str, list[TurnScore]] = defaultdict(list)
    for s in scores:
        groups[_bucket(s.turn, max_turn)].append(s)
    order = [str(i) for i in range(1, max_turn + 1)] + [f"{max_turn + 1}+"]
    rows = []
    for name in order + ["all"]:
        group = list(scores) if name == "all" else groups.get(name, [])
        if name != "all" and not group:
            continue
        row = {"turn": name}
        row.update(_summary(group, thresholds=thresholds, lang=lang, answered_only=True,
                            cascade=cascade, with_bleu=False))
        rows.append(row)
    return rows


def _intent_stats(scores: Sequence[TurnScore]) -> dict:
    answered = [s for s in scores if s.answered]
    confusion: dict[str, Counter] = defaultdict(Counter)
    for s in answered:
        confusion[s.kind][str(s.pred_intent)] += 1
    correct = sum(1 for s in answered if s.pred_intent == s.kind)
    per_kind = {}
    for k in KINDS:
        ks = [s for s in answered if s.kind == k]
        if ks:
            per_kind[k] = _pct(sum(1 for s in ks if s.pred_intent == k) / len(ks))
    return {
        "accuracy": _pct(correct / len(answered)) if answered else None,
        "n": len(answered),
        "per_kind": per_kind,
        "confusion": {k: dict(v) for k, v in confusion.items()},  # gt kind -> parsed intent -> count
    }


def _skip_reference_bug(scores: Sequence[TurnScore], first: Sequence[str | None]) -> list[TurnScore]:
    """``cal_reslut``'s first-sample skip: those turns count in the denominators, never as hits."""
    out = []
    for s in scores:
        if s.text_id is not None and s.text_id in first and s.in_samples and not s.malformed:
            s = dataclasses.replace(s, hit=False if s.kind == "retrieval" else s.hit,
                                    iou=0.0 if s.kind == "moment" else s.iou)
        out.append(s)
    return out


def _protocol_stats(universe, samples, scores: Sequence[TurnScore], predictions, match: str,
                    test_filter: str, max_turn: int) -> dict:
    kept = {smp.dialogue.index for smp in samples}
    sampled = {(smp.dialogue.index, smp.turn_idx) for smp in samples}
    dropped = [d for d in universe if d.index not in kept]
    turns_out = [(d, t) for d in universe for t in d.turns if (d.index, t.index) not in sampled]
    keys_in = {turn_key(d.turns[t], match) for d, t in ((smp.dialogue, smp.turn_idx) for smp in samples)}
    bad = [s for s in scores if s.malformed]
    by_kind = lambda ss: dict(Counter(s.kind for s in ss))
    return {
        "test_filter": test_filter,
        "dialogues": len(universe),
        "dialogues_run": len(kept),
        "dialogues_filtered_out": {
            "first_stage_missed": sum(1 for d in dropped if tuple(d.types) != (7,)),
            "type_7": sum(1 for d in dropped if tuple(d.types) == (7,)),
        },
        "samples": len(samples),
        "turns_not_run": {"filtered_dialogues": sum(1 for d, _ in turns_out if d.index not in kept),
                          f"beyond_turn_{max_turn}": sum(1 for d, t in turns_out if d.index in kept)},
        "malformed_records": len({s.dialogue for s in bad}),
        "malformed_record_turns": by_kind(bad),
        "predictions_outside_samples": sum(1 for k in predictions if k not in keys_in),
        "gt_read_from_record": by_kind([s for s in scores if s.gt_source == "record" and s.in_samples
                                        and s.kind in ("retrieval", "moment")]),
    }


def _scope_rows(scores: Sequence[TurnScore], *, thresholds, lang: str) -> dict:
    return {"evaluated": _summary([s for s in scores if s.answered], thresholds=thresholds, lang=lang,
                                  answered_only=True),
            "end_to_end": _summary(scores, thresholds=thresholds, lang=lang, answered_only=False)}


def evaluate_predictions(
    dialogues: Sequence,
    predictions: Mapping[str, str],
    *,
    all_test_turns: Sequence | None = None,
    history: str = "teacher",
    match: str = "text_id",
    lang: str = "en",
    thresholds: Sequence[float] = THRESHOLDS,
    max_turn: int = 7,
    turn_fields: Mapping[str, Mapping] | None = None,
    prior: Sequence[float] | None = None,
    scorer: str = "official",
    reference_bugs: bool = False,
    test_filter: str = "reference",
    skipped_turns: Sequence = (),
    samples: Sequence | None = None,
    per_turn_predictions: tuple[Mapping[str, str], str] | None = None,
) -> dict:
    """Score ``predictions`` (``text_id`` → generated answer) against the annotation dialogues.

    Args:
      dialogues: `ivcr_jax.data.schema.Dialogue`s of the test split (type ≠ [0]).
      predictions: the generated answer per turn key (``text_id``, or the user question with
        ``match="question"``).
      all_test_turns: the dialogues that define the end-to-end denominator when it is more than
        ``dialogues``. Defaults to ``dialogues``.
      history: how the predictions were produced, recorded in the result: ``"teacher"`` (ground-truth
        history, as the reference) or ``"model"`` (the model's own earlier answers). Scoring is the same.
      lang: "en" or "zh"; selects the BLEU tokenizer.
      max_turn: the per-turn tables have a row per turn 1..max_turn, then one for the later turns.
      turn_fields: the optional per-turn fields of the predictions file (:func:`read_predictions`):
        video durations for the random baseline, the retriever's top-10 flag for R@10.
      prior: the span of the ``prior_span`` baseline (:func:`prior_span` of the training split);
        None leaves that row out.
      scorer: the parsers of the headline (``"official"``, the released scorer's, or ``"lenient"``,
        ours); the other one's rows are given beside it (``results["scorers"]``).
      reference_bugs: reproduce the released scorer exactly: its first-sample skip, its
        ``None == None`` hit, and its exceptions (``official_answers.OfficialScorerError``).
      test_filter: ``"reference"``: only the reference's test samples (``eval/protocol.py``) are
        scored, every other turn of the split counting as a failure; ``"none"``: every turn.
      skipped_turns: the turns of malformed records (``LoadReport.skipped_turns``): failures.
      samples: the protocol's samples (``protocol.reference_samples``), when the caller has them.
      per_turn_predictions: with ``reference_bugs``, the ``(predictions, match)`` the released
        per-turn table matches (``cal_multi_reslut``): for a reference ``result.json``, its
        ``user_q`` strings matched against the raw questions. Default: ``(predictions, match)``.

    Returns a JSON-serialisable dict with ``evaluated`` and ``end_to_end`` headline metrics, the
    ``baselines`` beside them (:func:`baselines`, the same scopes), ``scorers`` (the headline rows
    of each scorer), ``protocol`` (what was run and counted: filtered dialogues, malformed records,
    ignored predictions), ``r10_candidates`` (which list R@10 counts), the per-turn tables
    (``per_turn`` and ``per_turn_cascade``, each for both scopes), ``intent`` accuracy, parse
    failures, matching statistics, and ``turns`` (one :class:`TurnScore` dict per end-to-end turn).
    """
    if history not in ("teacher", "model"):
        raise ValueError(f"history must be 'teacher' or 'model', got {history!r}")
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    if reference_bugs and scorer != "official":
        raise ValueError("reference_bugs reproduces the released (official) scorer: use scorer='official'")
    thresholds = tuple(float(t) for t in thresholds)
    universe = list(all_test_turns) if all_test_turns is not None else list(dialogues)
    if samples is None:
        samples = protocol.reference_samples(dialogues, test_filter=test_filter)
    scope = {(smp.dialogue.index, smp.turn_idx) for smp in samples}
    score = lambda parsers, sc: score_turns(universe, predictions, match=match, turn_fields=turn_fields,
                                            parsers=parsers, scope=sc, skipped_turns=skipped_turns)
    main_parsers = "reference" if reference_bugs else scorer
    scores = score(main_parsers, scope)
    headline = scores
    if reference_bugs:
        headline = _skip_reference_bug(scores, protocol.first_samples(samples))
        # cal_multi_reslut (the per-turn table) scores every turn whose question has a prediction
        pt_preds, pt_match = per_turn_predictions or (predictions, match)
        scores = score_turns(universe, pt_preds, match=pt_match, turn_fields=turn_fields, parsers="reference",
                             scope=None, skipped_turns=skipped_turns)
    evaluated = [s for s in headline if s.answered]
    evaluated_pt = [s for s in scores if s.answered]

    keys = Counter(turn_key(t, match) for d in universe for t in d.turns)
    unmatched = [k for k in predictions if k not in keys]
    ambiguous = sum(1 for k, n in keys.items() if n > 1 and k in predictions)

    rows = {name: _scope_rows(score(name, scope), thresholds=thresholds, lang=lang) for name in SCORERS}
    if reference_bugs:
        rows["reference"] = _scope_rows(headline, thresholds=thresholds, lang=lang)
    answered_ret = [s for s in headline if s.answered and s.kind == "retrieval"]
    answered_mom = [s for s in headline if s.answered and s.kind == "moment"]
    per_turn = lambda cascade: {
        "evaluated": _per_turn(evaluated_pt, thresholds=thresholds, max_turn=max_turn, cascade=cascade, lang=lang),
        "end_to_end": _per_turn(scores, thresholds=thresholds, max_turn=max_turn, cascade=cascade, lang=lang)}
    result = {
        "history": history,
        "match": match,
        "lang": lang,
        "scorer": "official (released, bugs kept)" if reference_bugs else scorer,
        "thresholds": list(thresholds),
        "n_dialogues": {"evaluated": len({smp.dialogue.index for smp in samples}), "end_to_end": len(universe)},
        "evaluated": _summary(evaluated, thresholds=thresholds, lang=lang, answered_only=True),
        "end_to_end": _summary(headline, thresholds=thresholds, lang=lang, answered_only=False),
        "scorers": rows,
        "protocol": _protocol_stats(universe, samples, headline, predictions, match, test_filter, max_turn),
        "baselines": baselines({"evaluated": evaluated, "end_to_end": headline}, thresholds=thresholds,
                               prior=prior),
        "r10_candidates": r10_candidates(turn_fields),
        "per_turn": per_turn(False),
        "per_turn_cascade": per_turn(True),
        "intent": _intent_stats(headline),
        "parse_failures": {
            "retrieval": sum(1 for s in answered_ret if s.pred_index is None),
            "moment": sum(1 for s in answered_mom if s.pred_span is None or
                          (main_parsers != "lenient" and tuple(s.pred_span) == (0.0, 0.0))),
        },
        "predictions": {
            "n": len(predictions),
            "matched": len(predictions) - len(unmatched),
            "unmatched": len(unmatched),
            "unmatched_examples": unmatched[:5],
            "keys_shared_by_several_turns": ambiguous,
        },
        "turns": [s.to_json() for s in headline],
    }
    if reference_bugs:
        result["protocol"]["not_scored_by_the_reference_bug"] = [k for k in protocol.first_samples(samples) if k]
    return result


# ------------------------------------------------------------------------ predictions files ---

ANSWER_FIELDS = ("answer", "prediction")


class PredictionsFormatError(ValueError):
    """A predictions file line that cannot be read; the message names the file and the line number."""


def _turn_field_ok(name: str, v) -> bool:
    if name == RETRIEVED_FIELD:
        return isinstance(v, bool)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def read_predictions(path: str | os.PathLike, *, match: str = "text_id", skip_bad_lines: bool = False
                     ) -> tuple[dict[str, str], dict[str, list[float]], dict, dict[str, dict]]:
    """Read a predictions JSONL file: one ``{"text_id": ..., "answer": ...}`` object per line.

    ``"prediction"`` is accepted in place of ``"answer"``; with ``match="question"`` the key field is
    ``"question"`` (the reference's matching). An optional ``"timings"`` object per line
    (``{"retrieval": s, "prefill": s, "decode": s}``) is collected per stage. The optional per-turn
    fields of ``TURN_FIELDS`` (``duration`` of a moment turn's video in seconds,
    ``gt_in_retrieved_top10`` of a retrieval turn) are collected per key. Blank lines are ignored;
    when a key occurs twice, the repeat is counted, and the later line wins with ``match="text_id"``
    (a resumed run appends), the first with ``match="question"`` (the reference's ``find_sentence``
    returns the first prediction whose question equals the turn's, as written).

    A malformed line (not JSON, not an object, no key, no string answer, a per-turn field of the
    wrong type) raises :class:`PredictionsFormatError` naming ``path:line``; with ``skip_bad_lines``
    it is skipped and counted instead (``stats["bad_lines"]``, the first messages in
    ``stats["bad_line_examples"]``).

    Returns ``(predictions, timings, stats, turn_fields)``.
    """
    key_field = "text_id" if match == "text_id" else "question"
    preds: dict[str, str] = {}
    fields: dict[str, dict] = {}
    timings: dict[str, list[float]] = defaultdict(list)
    stats = {"file": str(path), "lines": 0, "bad_lines": 0, "bad_line_examples": [], "duplicates": 0}

    def bad(lineno: int, why: str) -> None:
        msg = f"{path}:{lineno}: {why}"
        if not skip_bad_lines:
            raise PredictionsFormatError(msg + " (use --skip-bad-lines to skip such lines)")
        stats["bad_lines"] += 1
        if len(stats["bad_line_examples"]) < 5:
            stats["bad_line_examples"].append(msg)

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            stats["lines"] += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad(lineno, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                bad(lineno, f"expected a JSON object, got {type(obj).__name__}")
                continue
            key = obj.get(key_field)
            if isinstance(key, int) and not isinstance(key, bool):
                key = str(key)
            if not isinstance(key, str) or not key:
                bad(lineno, f"missing or empty {key_field!r}")
                continue
            field = next((a for a in ANSWER_FIELDS if a in obj), None)
            if field is None or not isinstance(obj[field], str):
                bad(lineno, "needs a string 'answer' (or 'prediction') field")
                continue
            tm = obj.get("timings")
            if tm is not None and not (isinstance(tm, dict) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in tm.values())):
                bad(lineno, "'timings' must map stage names to seconds")
                continue
            given = [n for n in TURN_FIELDS if obj.get(n) is not None]  # null: not recorded
            wrong = next((n for n in given if not _turn_field_ok(n, obj[n])), None)
            if wrong is not None:
                bad(lineno, f"{wrong!r} must be {TURN_FIELDS[wrong]}, got {obj[wrong]!r:.40}")
                continue
            if key in preds:
                stats["duplicates"] += 1
                if match == "question":  # find_sentence: the first line with the question wins
                    continue
            preds[key] = obj[field]
            fields.pop(key, None)
            if given:
                fields[key] = {n: obj[n] for n in given}
            for stage, sec in (tm or {}).items():
                timings[stage].append(float(sec))
    return preds, dict(timings), stats, fields
