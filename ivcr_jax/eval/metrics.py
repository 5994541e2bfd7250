"""The paper's metrics: re-ranking R@1, R@10, moment R@1 at IoU thresholds, BLEU-4, per-turn tables.

Follows reference-architecture §8.5 (official `metrics/eval.py`, HEAD, and the older
`metrics/tvg/conv_cal.py` for the cascade rule) and paper Tables 2 and 4.

Units in the returned dictionaries: recalls, intent accuracy and mIoU are **percentages** (0–100),
as in the paper's tables; ``BLEU-4`` is a **fraction** (0–1), as in Table 2 (sacrebleu's 0–100
score divided by 100), and ``BLEU-4 (sacrebleu)`` keeps the 0–100 score.

Differences from the reference, on purpose:

* The reference skipped the first retrieval sample and the first moment sample (its
  dict-initialisation branch never scored them). That bug is **not** reproduced: every turn counts.
* Both denominators are reported. ``evaluated``: the turns that have a prediction. ``end_to_end``:
  every turn of the test split (``all_test_turns``, type ≠ [0]); a turn without a prediction — e.g.
  its dialogue was dropped upstream because the retriever missed the ground truth — is a failure
  (IoU 0). The reference's R@1 / IoU numbers use the end-to-end denominator.
* An unparseable answer is a miss (IoU 0), never an error. TimeChat's parser returned [0, 0].
* Predictions are matched by ``text_id``; ``match="question"`` reproduces the reference's matching
  by the exact user-question string (where one question string occurs in several turns, all of
  them receive the same prediction, as in the reference; the count is reported).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

from ivcr_jax.data.answers import iou, parse_intent, parse_moment, parse_video_index

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
    "THRESHOLDS",
]

THRESHOLDS = (0.3, 0.5, 0.7)
KINDS = ("retrieval", "moment", "chat")


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
    text_id: str
    kind: str
    answered: bool
    prediction: str | None = None
    reference: str = ""
    pred_intent: str | None = None
    # retrieval turns
    gt_index: int | None = None
    pred_index: int | None = None
    hit: bool | None = None
    in_top10: bool | None = None
    # moment turns
    gt_span: tuple[float, float] | None = None
    pred_span: tuple[float, float] | None = None
    iou: float | None = None
    # the same, under the cascade rule (a failed retrieval turn fails every later turn)
    cascade_hit: bool | None = None
    cascade_iou: float | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


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


def score_turns(dialogues: Sequence, predictions: Mapping[str, str], *, match: str = "text_id") -> list[TurnScore]:
    """Score every turn of ``dialogues`` against ``predictions`` (key → answer text).

    Turns without a prediction are kept with ``answered=False`` and scored as failures. The cascade
    columns follow `conv_cal.py`: once a retrieval turn of a dialogue is not a hit (wrong, unparseable
    or unanswered), every later retrieval turn is a miss and every later moment turn has IoU 0.
    """
    if match not in ("text_id", "question"):
        raise ValueError(f"match must be 'text_id' or 'question', got {match!r}")
    scores: list[TurnScore] = []
    for d in dialogues:
        failed = False
        for k, t in enumerate(d.turns):
            pos = (t.index if isinstance(getattr(t, "index", None), int) else k) + 1  # Turn.index is 0-based
            key = t.text_id if match == "text_id" else t.question
            pred = predictions.get(key)
            s = TurnScore(dialogue=d.index, dialogue_id=d.id, turn=pos, text_id=t.text_id, kind=t.kind,
                          answered=pred is not None, prediction=pred, reference=t.answer)
            if pred is not None:
                s.pred_intent = parse_intent(pred)
            if t.kind == "retrieval":
                s.gt_index = _gt_index(t)
                s.in_top10 = s.gt_index is not None
                s.pred_index = parse_video_index(pred) if pred is not None else None
                s.hit = s.gt_index is not None and s.pred_index == s.gt_index
                s.cascade_hit = s.hit and not failed
                if not s.hit:
                    failed = True
            elif t.kind == "moment" and t.gt_se is not None:
                s.gt_span = (float(t.gt_se[0]), float(t.gt_se[1]))
                s.pred_span = parse_moment(pred) if pred is not None else None
                s.iou = iou(s.pred_span, s.gt_span)
                s.cascade_iou = 0.0 if failed else s.iou
            scores.append(s)
    return scores


# ---------------------------------------------------------------------------- summaries ---

def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _summary(scores: Sequence[TurnScore], *, thresholds, lang: str, answered_only: bool,
             cascade: bool = False, with_bleu: bool = True) -> dict:
    """Headline metrics over ``scores`` (already restricted to the scope's turns)."""
    ret = [s for s in scores if s.kind == "retrieval"]
    mom = [s for s in scores if s.kind == "moment" and s.gt_span is not None]
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


def _bucket(turn: int, max_turn: int) -> str:
    return f"{max_turn}+" if turn >= max_turn else str(turn)


def _per_turn(scores: Sequence[TurnScore], *, thresholds, max_turn: int, cascade: bool, lang: str) -> list[dict]:
    """Paper Table 4: one row per turn position 1..max_turn-1, then ``max_turn+``, then ``all``."""
    groups: dict[str, list[TurnScore]] = defaultdict(list)
    for s in scores:
        groups[_bucket(s.turn, max_turn)].append(s)
    order = [str(i) for i in range(1, max_turn)] + [f"{max_turn}+"]
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
) -> dict:
    """Score ``predictions`` (``text_id`` → generated answer) against the annotation dialogues.

    Args:
      dialogues: `ivcr_jax.data.schema.Dialogue`s of the evaluated split (type ≠ [0]).
      predictions: the generated answer per turn key (``text_id``, or the user question with
        ``match="question"``).
      all_test_turns: the dialogues that define the end-to-end denominator — the whole test split
        when ``dialogues`` is a filtered subset (e.g. only dialogues whose first turn the retriever
        got right). Defaults to ``dialogues``.
      history: how the predictions were produced, recorded in the result: ``"teacher"`` (ground-truth
        history, as the reference) or ``"model"`` (the model's own earlier answers). Scoring is the same.
      lang: "en" or "zh"; selects the BLEU tokenizer.
      max_turn: the last row of the per-turn tables collects turns ``>= max_turn``.

    Returns a JSON-serialisable dict with ``evaluated`` and ``end_to_end`` headline metrics, the
    per-turn tables (``per_turn`` and ``per_turn_cascade``, each for both scopes), ``intent``
    accuracy, parse failures, matching statistics, and ``turns`` (one :class:`TurnScore` dict per
    end-to-end turn). The reference's skip-first-sample bug is not reproduced.
    """
    if history not in ("teacher", "model"):
        raise ValueError(f"history must be 'teacher' or 'model', got {history!r}")
    thresholds = tuple(float(t) for t in thresholds)
    universe = list(all_test_turns) if all_test_turns is not None else list(dialogues)
    subset = {d.index for d in dialogues}

    scores = score_turns(universe, predictions, match=match)
    # Evaluated scope: the turns of `dialogues` that were answered.
    evaluated = [s for s in scores if s.answered and s.dialogue in subset]

    keys = Counter((t.text_id if match == "text_id" else t.question) for d in universe for t in d.turns)
    unmatched = [k for k in predictions if k not in keys]
    ambiguous = sum(1 for k, n in keys.items() if n > 1 and k in predictions)

    answered_ret = [s for s in scores if s.answered and s.kind == "retrieval"]
    answered_mom = [s for s in scores if s.answered and s.kind == "moment"]
    result = {
        "history": history,
        "match": match,
        "lang": lang,
        "thresholds": list(thresholds),
        "n_dialogues": {"evaluated": len(subset), "end_to_end": len(universe)},
        "evaluated": _summary(evaluated, thresholds=thresholds, lang=lang, answered_only=True),
        "end_to_end": _summary(scores, thresholds=thresholds, lang=lang, answered_only=False),
        "per_turn": {
            "evaluated": _per_turn(evaluated, thresholds=thresholds, max_turn=max_turn, cascade=False, lang=lang),
            "end_to_end": _per_turn(scores, thresholds=thresholds, max_turn=max_turn, cascade=False, lang=lang),
        },
        "per_turn_cascade": {
            "evaluated": _per_turn(evaluated, thresholds=thresholds, max_turn=max_turn, cascade=True, lang=lang),
            "end_to_end": _per_turn(scores, thresholds=thresholds, max_turn=max_turn, cascade=True, lang=lang),
        },
        "intent": _intent_stats(scores),
        "parse_failures": {
            "retrieval": sum(1 for s in answered_ret if s.pred_index is None),
            "moment": sum(1 for s in answered_mom if s.pred_span is None),
        },
        "predictions": {
            "n": len(predictions),
            "matched": len(predictions) - len(unmatched),
            "unmatched": len(unmatched),
            "unmatched_examples": unmatched[:5],
            "keys_shared_by_several_turns": ambiguous,
        },
        "turns": [s.to_json() for s in scores],
    }
    return result


# ------------------------------------------------------------------------ predictions files ---

ANSWER_FIELDS = ("answer", "prediction")


class PredictionsFormatError(ValueError):
    """A predictions file line that cannot be read; the message names the file and the line number."""


def read_predictions(path: str | os.PathLike, *, match: str = "text_id",
                     skip_bad_lines: bool = False) -> tuple[dict[str, str], dict[str, list[float]], dict]:
    """Read a predictions JSONL file: one ``{"text_id": ..., "answer": ...}`` object per line.

    ``"prediction"`` is accepted in place of ``"answer"``; with ``match="question"`` the key field is
    ``"question"`` (the reference's matching). An optional ``"timings"`` object per line
    (``{"retrieval": s, "prefill": s, "decode": s}``) is collected per stage. Blank lines are ignored;
    when a key occurs twice, the later line wins (a resumed run appends) and the repeat is counted.

    A malformed line (not JSON, not an object, no key, no string answer) raises
    :class:`PredictionsFormatError` naming ``path:line``; with ``skip_bad_lines`` it is skipped and
    counted instead (``stats["bad_lines"]``, the first messages in ``stats["bad_line_examples"]``).

    Returns ``(predictions, timings, stats)``.
    """
    key_field = "text_id" if match == "text_id" else "question"
    preds: dict[str, str] = {}
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
            if key in preds:
                stats["duplicates"] += 1
            preds[key] = obj[field]
            for stage, sec in (tm or {}).items():
                timings[stage].append(float(sec))
    return preds, dict(timings), stats
