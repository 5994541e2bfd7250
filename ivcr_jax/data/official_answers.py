"""The released IVCR scorer's answer parsers and IoU, transcribed from its definitions.

Source: ``metrics/eval.py`` of the reference code (``ivcr200k/ivcr200k.github.io``, HEAD c1664c3):
``extract_video_numbers_first_only``, ``extract_time``, ``extract_time_ranges`` and ``iou``. These
are what the paper's numbers were computed with; :mod:`ivcr_jax.data.answers` holds our lenient
parsers, which read more answer formats. Issue 13's ``official`` scorer mode is built on this
module (not yet wired into ``ivcr_jax.eval``).

Behaviour kept exactly, quirks included:

* the video index regex accepts ``video 0`` (``[0-9]``), unlike ours (1–10);
* a prediction's span: the first ``a - b`` (optional ``s`` after each number) anywhere in the
  lowercased answer, after removing the prompt's example sentence and collapsing runs of dots;
  without one, the *first* number of each sentence (sentences split at ``!``, ``?`` and newlines,
  not at ``.``), paired in order; the first pair is kept, ordered; nothing → ``(0, 0)``;
* the ground-truth span is read from the answer *text* with ``<a>s-<b>s`` (no spaces, an ``s``
  after each number), not from ``gt_se``; it can be empty or hold several spans;
* IoU takes the ground truth's first two numbers as they stand (no reordering).

Left out: ``extract_time``'s third fallback (``HH:MM:SS`` clock times). It runs only when fewer
than two sentences hold a number, its ``findall`` yields tuples (two groups) whose ``count(':')``
is 0, so it appends the last number of the previous fallback, at most once: it never produces a
pair, and always ends in ``(0, 0)`` as here.
"""
from __future__ import annotations

import re
from typing import Sequence

__all__ = ["video_index", "moment", "gt_spans", "iou", "OfficialScorerError"]

_VIDEO = re.compile(r"(?i)\bvideo\s+(10|[0-9])\b")
_EXAMPLE = "A specific example is : 20.8 - 30.0 seconds".lower()
_DOTS = re.compile(r"\.{2,}")
_SENTENCES = re.compile(r"[!?\n]")
_SPAN = re.compile(r"(\d+\.*\d*)s?\s*-\s*(\d+\.*\d*)s?")
_NUMBER = re.compile(r"\b(\d+\.\d+\b|\b\d+)\b")
_GT_SPAN = re.compile(r"(\d+(?:\.\d+)?)s-(\d+(?:\.\d+)?)s")


class OfficialScorerError(ValueError):
    """An input on which the released scorer raises (it has no error handling)."""


def video_index(text: str) -> int | None:
    """``extract_video_numbers_first_only``: the N of the first ``video N`` (N in 0..10), or None."""
    m = _VIDEO.search(text)
    return int(m.group(1)) if m else None


def moment(text: str) -> tuple[float, float]:
    """``extract_time(text)[0]``: the prediction's span as the released scorer reads it."""
    p = _DOTS.sub(".", text.lower().replace(_EXAMPLE, ""))
    spans = [(float(a), float(b)) for a, b in _SPAN.findall(p)]
    if not spans:
        firsts = [float(found[0]) for found in (_NUMBER.findall(s) for s in _SENTENCES.split(p)) if found]
        firsts = firsts[: len(firsts) // 2 * 2]
        spans = list(zip(firsts[0::2], firsts[1::2]))
    if not spans:
        return (0.0, 0.0)
    a, b = spans[0]
    return (a, b) if b > a else (b, a)


def gt_spans(text: str) -> list[float]:
    """``extract_time_ranges``: every ``<a>s-<b>s`` of the text, flattened ``[a1, b1, a2, b2, ...]``."""
    return [float(x) for pair in _GT_SPAN.findall(text) for x in pair]


def iou(gt: Sequence[float], pred: Sequence[float]) -> float:
    """``iou(A=gt, B=pred)``: ``max(min(A1, B1) - max(A0, B0), 0) / (max(A1, B1) - min(A0, B0))``.

    The released function raises where this raises :class:`OfficialScorerError`: a ground truth
    with fewer than two numbers (``IndexError`` there: an answer text without ``<a>s-<b>s``) and a
    zero-length union (``ZeroDivisionError``). An empty ``pred`` gives 0, as there.
    """
    if len(pred) == 0:
        return 0.0
    if len(gt) < 2:
        raise OfficialScorerError(f"the ground-truth answer text has no '<a>s-<b>s' span (read {list(gt)})")
    union = max(gt[1], pred[1]) - min(gt[0], pred[0])
    if union == 0:
        raise OfficialScorerError(f"zero-length union of ground truth {list(gt[:2])} and prediction {list(pred)}")
    return max(min(gt[1], pred[1]) - max(gt[0], pred[0]), 0) / union
