"""Reading answers: intent, re-ranked video index and moment span of an answer text, and temporal IoU.

Used by evaluation (the metrics), training (the faithful L_V / L_C) and the chat (what the model chose).

Follows reference-architecture §8.4 and the answer strings of the paper (§4.2) and its appendix
(Figures 8, 22–25). The answers these parsers meet come in three generations:

* dataset JSON (Figure 8): ``"The intent of this query is to find a complete video."`` and
  ``"The intent of this query is to further locate a spinning moment."`` (Chinese:
  ``"这个查询的意图是找到一个完整的视频。"`` / ``"这个查询的意图是进一步定位转圈的瞬间。"``);
* paper template and model outputs (§4.2, appendix H): ``"The intent is video retrieval. The given
  query happens in 4th video. …"`` and ``"The intent is temporal video grounding. The given query
  happens 43.44 - 49.3 seconds. …"``;
* official code, HEAD (`metrics/eval.py`): ``"… video N matches …"`` read by
  ``(?i)\\bvideo\\s+(10|[1-9])\\b`` and GT spans written ``"Query content found in video 1 at 5s-10s."``.

Every parser returns ``None`` for an answer it cannot read; it never raises on text input. The
metrics count a ``None`` as a miss (TimeChat's ``extract_time`` returned ``[0, 0]`` instead, which
scores the same IoU of 0 against any non-degenerate ground truth).
"""
from __future__ import annotations

import math
import re
from typing import Sequence

__all__ = ["parse_intent", "parse_video_index", "parse_moment", "iou", "INTENTS"]

INTENTS = ("retrieval", "moment", "chat")

# --------------------------------------------------------------------------- video index ---

_CN_DIGITS = {"一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9, "十": 10}

# All patterns capture 1..10 only: the re-ranker chooses among 10 candidates, so "video 11" or
# "video 0" is not an index. `10` is tried before `[1-9]` so "video 10" is never read as 1.
_INDEX_PATTERNS = (
    # HEAD reference regex, verbatim: "video 3", "Video 10."
    re.compile(r"(?i)\bvideo\s+(10|[1-9])\b"),
    # Paper / appendix H outputs: "happens in 2th video", "10th video", "the 3rd video"
    re.compile(r"(?i)\b(10|[1-9])\s*(?:st|nd|rd|th)\s+video\b"),
    # "video #3", "video no. 3", "video number 3"
    re.compile(r"(?i)\bvideo\s*(?:#|no\.?|number)\s*(10|[1-9])\b"),
    # Special-token form of the HEAD prompt echoed back: "<VID> 3 </VID>"
    re.compile(r"<VID>\s*(10|[1-9])\s*</VID>"),
    # Chinese: "视频 3", "视频3", "第3个视频", "第3个", "第三个视频"
    re.compile(r"视频\s*(10|[1-9])(?!\d)"),
    re.compile(r"第\s*(10|[1-9]|十|[一二两三四五六七八九])\s*(?:个|部|条)"),
)


def _index_value(token: str) -> int:
    return _CN_DIGITS[token] if token in _CN_DIGITS else int(token)


def parse_video_index(answer: str | None) -> int | None:
    """The 1-based candidate index named in ``answer`` (1..10), or None.

    The reference reads the **first** ``video N`` (§8.4). Here every supported form is searched and
    the one that starts earliest in the text wins, so an explanation that mentions another video
    later does not override the answer sentence.
    """
    if not answer:
        return None
    best: tuple[int, int] | None = None  # (position, index)
    for pat in _INDEX_PATTERNS:
        m = pat.search(answer)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), _index_value(m.group(1)))
    return None if best is None else best[1]


# ------------------------------------------------------------------------------ moment span ---

_NUM = r"(\d+(?:\.\d+)?)"
_UNIT = r"(?:\s*(?:s|sec|secs|second|seconds|秒)\b|\s*秒)?"
_SEP = r"\s*(?:-|–|—|~|～|to|until|till|到|至)\s*"
# "a - b", "as-bs" (HEAD GT form "5s-10s"), "5 to 10 seconds", "from 5s to 10s", "0.0 - 21.6 秒"
_RANGE = re.compile(_NUM + _UNIT + _SEP + _NUM, re.IGNORECASE)
# HH:MM:SS or MM:SS ranges must be tried first: the plain range pattern would read "00:18 - 00:23"
# as 18 - 00.
_CLOCK = r"(\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?)"
_CLOCK_RANGE = re.compile(r"\b" + _CLOCK + _SEP + _CLOCK + r"\b", re.IGNORECASE)
_CLOCK_ONE = re.compile(r"\b" + _CLOCK + r"\b")
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?!\.?\d)")
# TimeChat's keyword filter for the fallback (sentences that talk about a time).
_TIME_KEYWORDS = ("starts", "ends", "happens in", "start time", "end time", "start", "end", "happen",
                  "开始", "结束", "发生")
# Things that are numbers but not times; removed before the number fallbacks.
_NOT_TIMES = re.compile(
    r"(?i)\bvideo\s*(?:#|no\.?|number)?\s*\d+\b|\b\d+\s*(?:st|nd|rd|th)\b|<VID>\s*\d+\s*</VID>"
    r"|视频\s*\d+|第\s*\d+\s*(?:个|部|条)|\b\d+\s*frames?\b"
)
# TimeChat strips its own prompt example before parsing, so an echoed prompt is not read as the answer.
_PROMPT_EXAMPLE = "a specific example is : 20.8 - 30.0 seconds"


def _clock_seconds(t: str) -> float:
    parts = [float(p) for p in t.split(":")]
    sec = 0.0
    for p in parts:
        sec = sec * 60 + p
    return sec


def _ordered(a: float, b: float) -> tuple[float, float]:
    # TimeChat's extract_time swaps a reversed span instead of rejecting it.
    return (a, b) if b >= a else (b, a)


def parse_moment(answer: str | None) -> tuple[float, float] | None:
    """The first (start, end) span in seconds named in ``answer``, or None.

    Behaviour of TimeChat's ``extract_time`` (the parser the reference applies to predictions), with
    the cases it misses added:

    1. ``HH:MM:SS - HH:MM:SS`` / ``MM:SS - MM:SS`` ranges;
    2. the first ``a - b`` range, each number optionally followed by ``s``/``seconds``/``秒``, with
       ``-``, ``–``, ``~``, ``to``, ``到`` as separator (covers ``"43.44 - 49.3 seconds"``, the HEAD GT
       form ``"5s-10s"`` and ``"from 5s to 10s"``);
    3. the first two clock times (``"starts at 00:00:18 and ends at 00:00:23"``; TimeChat's last
       fallback, moved up so the numbers inside clock times are not read as seconds);
    4. TimeChat's fallback: the first number of each sentence mentioning a start/end/happen keyword,
       paired (``"Starting time: 0.8 seconds\\nEnding time: 1.1 seconds"``);
    5. the first two numbers of the keyword sentences, then of the whole answer
       (``"The start time is 0 seconds, and the end time is 12 seconds."``).

    Numbers that name a video ("video 3", "2th video") are not times and are skipped by 2–5.
    A reversed span is swapped. Returns None when nothing is found (TimeChat returned [0, 0]).
    """
    if not answer:
        return None
    text = answer.lower().replace(_PROMPT_EXAMPLE, " ")

    m = _CLOCK_RANGE.search(text)
    if m:
        return _ordered(_clock_seconds(m.group(1)), _clock_seconds(m.group(2)))
    # A range whose first number is a video index ("video 3-5 …") is not a span: mask those first.
    masked = _NOT_TIMES.sub(lambda mm: " " * len(mm.group(0)), text)
    m = _RANGE.search(masked)
    if m:
        return _ordered(float(m.group(1)), float(m.group(2)))

    clocks = _CLOCK_ONE.findall(masked)
    if len(clocks) >= 2:
        return _ordered(_clock_seconds(clocks[0]), _clock_seconds(clocks[1]))

    sentences = [s for s in re.split(r"[!?\n。！？]|\.(?=\s|$)", masked) if s.strip()]
    keyword_sentences = [s for s in sentences if any(k in s for k in _TIME_KEYWORDS)]
    firsts = []
    for s in keyword_sentences:
        nums = _NUMBER.findall(s)
        if nums:
            firsts.append(float(nums[0]))
    if len(firsts) >= 2:
        return _ordered(firsts[0], firsts[1])
    for pool in (keyword_sentences, sentences):
        nums = [float(n) for s in pool for n in _NUMBER.findall(s)]
        if len(nums) >= 2:
            return _ordered(nums[0], nums[1])
    return None


# ----------------------------------------------------------------------------------- intent ---

# Checked in this order inside the intent sentence: the moment phrasings contain "video" and even
# "video … retrieval" ("video moment retrieval"), so they must win over the retrieval ones.
_MOMENT_WORDS = (
    "temporal video grounding", "video grounding", "temporal grounding", "grounding", "video moment",
    "moment", "locate", "localiz", "localis", "timestamp", "time span", "segment", "clip within",
    "定位", "瞬间", "片段", "时刻", "时间段",
)
_RETRIEVAL_WORDS = (
    "video retrieval", "complete video", "whole video", "find a video", "find the video",
    "search for a video", "retrieve", "retrieval", "find a",
    "完整的视频", "视频检索", "检索", "找到", "查找", "搜索",
)
# A negated retrieval ("does not need retrieval") is chat, whatever else the sentence says.
_CHAT_NEGATIONS = (
    "no retrieval", "not a retrieval", "not retrieval", "not to retrieve", "not to find",
    "does not need", "doesn't need", "no need to", "不需要检索", "无需检索", "不是检索",
)
_CHAT_WORDS = (
    "chat", "dialogue", "dialog", "conversation", "small talk", "greeting", "casual",
    "聊天", "闲聊", "对话", "问候",
)
_STRICT_SPAN = re.compile(_NUM + r"\s*(?:s\b|seconds?\b|秒)?\s*(?:-|–|—|to|到|至)\s*" + _NUM + r"\s*(?:s\b|seconds?\b|秒)",
                          re.IGNORECASE)
_STRICT_SPAN_BARE = re.compile(_NUM + r"\s*(?:-|–|—)\s*" + _NUM)


def _intent_sentence(text: str) -> str | None:
    for s in re.split(r"(?<=[.!?。！？\n])", text):
        if "intent" in s or "意图" in s or "intention" in s:
            return s
    return None


def _classify(sentence: str) -> str | None:
    if any(w in sentence for w in _CHAT_NEGATIONS):
        return "chat"
    for kind, words in (("moment", _MOMENT_WORDS), ("retrieval", _RETRIEVAL_WORDS), ("chat", _CHAT_WORDS)):
        if any(w in sentence for w in words):
            return kind
    return None


def parse_intent(answer: str | None) -> str | None:
    """The intent an answer declares: "retrieval", "moment", "chat", or None.

    The intent sentence (the one containing "intent"/"意图"; the first sentence in the older format)
    decides: moment phrasings ("temporal video grounding", "video moment", "further locate a …
    moment", "定位", "瞬间") are checked before retrieval ones ("video retrieval", "find a complete
    video", "完整的视频"), then chat ones ("chat", "dialogue", "闲聊"). With no intent sentence, the
    content decides: a span with a time unit ("5s-10s", "0.0 - 3.84 seconds") → moment, a video
    index ("video 3", "4th video") → retrieval, else None.
    """
    if not answer:
        return None
    text = answer.lower()
    sentence = _intent_sentence(text)
    if sentence is not None:
        kind = _classify(sentence)
        if kind is not None:
            return kind
    # No (readable) intent sentence: fall back on what the answer contains.
    if _STRICT_SPAN.search(text) or ("happen" in text and _STRICT_SPAN_BARE.search(text)):
        return "moment"
    if parse_video_index(answer) is not None:
        return "retrieval"
    return None


# --------------------------------------------------------------------------- spans ---

def iou(pred: Sequence[float] | None, gt: Sequence[float] | None) -> float:
    """Temporal IoU of two [start, end] spans (seconds).

    ``max(min(e1, e2) - max(s1, s2), 0) / (max(e1, e2) - min(s1, s2))`` (§8.5), with:

    * reversed spans (end < start) normalised to (min, max) first, as the reference's parser does;
    * a zero-length union (both spans are the same point) gives 1.0 when the points are equal —
      otherwise the union is not zero-length — and two distinct points give 0.0;
    * ``None`` (an unparseable prediction) or a non-finite bound gives 0.0.
    """
    if pred is None or gt is None:
        return 0.0
    s1, e1 = sorted((float(pred[0]), float(pred[1])))
    s2, e2 = sorted((float(gt[0]), float(gt[1])))
    if not all(math.isfinite(v) for v in (s1, e1, s2, e2)):
        return 0.0
    union = max(e1, e2) - min(s1, s2)
    if union <= 0.0:
        # Both spans are the same single point (a distinct point would make the union positive).
        return 1.0 if (s1, e1) == (s2, e2) else 0.0
    inter = max(min(e1, e2) - max(s1, s2), 0.0)
    return inter / union
