"""Reader and validator for the released IVCR-200K dialogue JSON.

Follows reference-architecture §8.2 (fields read by the released code) and the paper's appendix
§C.1 / Figure 8 (the published example). The file is a JSON list of dialogue records::

    {"id": "v_n9eNF1WqFu", "type": [1, 2, 4], "split": "train",
     "conversations": [
        {"from": "human", "value": "...", "Chinese_value": "...", "text_id": "247775f9"},
        {"from": "gpt", "value": "...", "Chinese_value": "...", "gt_se": [-1, -1],
         "video_id": "ActivityNet/v_x.mp4", "candidate_videos": ["...", ... 10 paths],
         "video_source": "ActivityNet"},
        ...]}

Turn kinds (per human/gpt pair):

* ``gt_se == [-1, -1]``: a **retrieval** turn; the user is shown the 10 X-Pool candidates.
* a valid ``[start, end]`` (seconds): a **moment** turn on the ground-truth video.
* no ``gt_se`` and no video: a **chat** turn.

The ground-truth video is read from ``video_id`` (released code) or from ``gt`` (paper figure; a
list whose first entry is taken). Only the ids are kept here; whether a video file exists is checked
when frames are decoded (``ivcr_jax.data.frames``), not at load time.

A malformed record raises :class:`RecordError` (naming the record index and the field) when
``strict=True``; otherwise it is skipped and counted in the :class:`LoadReport`. Malformed includes
a ``candidate_videos`` list naming a video twice (its "video N" would be ambiguous; checked with the
candidate count, so not under ``num_candidates=None``, which reads lists about to be rewritten). A record
of a split other than :data:`KNOWN_SPLITS` (and the one asked for) is a warning naming the record
and the split value, once per distinct value with its count. A file that is not UTF-8 or not JSON
raises :class:`DataFileError` naming the file and the position.
"""
from __future__ import annotations

import codecs
import collections
import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from ivcr_jax.cli import UsageError

log = logging.getLogger(__name__)

RETRIEVAL, MOMENT, CHAT = "retrieval", "moment", "chat"
# The splits the released data uses ("train", "test"), and the usual names of a held-out split.
KNOWN_SPLITS = ("train", "test", "val", "validation")
KINDS = (CHAT, RETRIEVAL, MOMENT)  # position = the integer code used in batches
NO_SPAN = (-1.0, -1.0)

# The reference's parser of "video N" in answers (§8.4; convert_dataset.ipynb, metrics/eval.py).
VIDEO_NUMBER_RE = re.compile(r"(?i)\bvideo\s+(10|[1-9])\b")


def video_number(text: str) -> int | None:
    """The first "video N" (N in 1..10) of a text, or None."""
    m = VIDEO_NUMBER_RE.search(text)
    return int(m.group(1)) if m else None


class DataFileError(UsageError):
    """An input file that cannot be read as a whole (missing, not UTF-8, not JSON, not a list):
    one line naming the file and the position; a program exits 2 on it (``cli.run``)."""


class RecordError(ValueError):
    """A malformed dialogue record: names the record index, the field and the problem."""

    def __init__(self, index: int, field: str, problem: str, record_id: str | None = None):
        self.index, self.field, self.problem, self.record_id = index, field, problem, record_id
        rid = f" (id {record_id!r})" if record_id is not None else ""
        super().__init__(f"record {index}{rid}: field '{field}': {problem}")

    def __reduce__(self):  # picklable across processes despite the custom signature
        return type(self), (self.index, self.field, self.problem, self.record_id)

    @property
    def reason(self) -> str:
        """The field with turn positions removed, used to count skipped records by cause."""
        return re.sub(r"\[\d+\]", "[]", self.field)


@dataclasses.dataclass(frozen=True)
class Turn:
    """One human question and the assistant's ground-truth answer."""

    index: int  # 0-based turn index within the dialogue
    text_id: str
    question: str  # in the selected language
    answer: str  # in the selected language
    kind: Literal["retrieval", "moment", "chat"]
    video_id: str | None  # ground-truth video (relative path / id), None for chat
    candidate_videos: tuple[str, ...]  # X-Pool top-k, () when the record has none
    gt_se: tuple[float, float] | None  # (start, end) seconds on moment turns, None otherwise
    target_index: int | None  # 1-based position of video_id among candidate_videos
    answer_video: int | None = None  # "video N" in the English ground-truth answer
    video_source: str | None = None
    question_raw: str | None = None  # the question as in the file (unstripped): the reference's match key

    @property
    def kind_code(self) -> int:
        return KINDS.index(self.kind)


@dataclasses.dataclass(frozen=True)
class Dialogue:
    index: int  # position of the record in the JSON list
    id: str
    split: str
    types: tuple[int, ...]
    turns: tuple[Turn, ...]


@dataclasses.dataclass(frozen=True)
class SkippedTurn:
    """A turn of a record skipped as malformed, as far as it can be read: the evaluator counts it
    (a failure) in the denominators, as the reference, which reads the raw JSON, does."""

    record: int  # position of the record in the JSON list
    record_id: str | None
    turn: int  # 1-based: the reference's int((i + 2) / 2) of the turn's human message i
    kind: str  # the reference's rule: gt_se == [-1, -1] retrieval, any other gt_se moment, none chat
    text_id: str | None


def readable_turns(index: int, record: Any) -> list[SkippedTurn]:
    """The turns of a (malformed) record that the reference's denominators would count: every
    ``gpt`` message, its kind by ``gt_se`` (metrics/eval.py ``cal_reslut``), its text_id from the
    message before it when that is a human message."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return []
    rid = record.get("id")
    rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
    convs = record["conversations"]
    out = []
    for i, m in enumerate(convs):
        if not isinstance(m, dict) or m.get("from") != "gpt":
            continue
        se = m.get("gt_se")
        kind = CHAT if se is None else RETRIEVAL if se == [-1, -1] else MOMENT
        h = convs[i - 1] if i > 0 and isinstance(convs[i - 1], dict) else {}
        tid = h.get("text_id")
        out.append(SkippedTurn(index, rid, (i + 1) // 2, kind,
                               str(tid) if isinstance(tid, (str, int)) and not isinstance(tid, bool) else None))
    return out


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_dialogues` did with each record."""

    path: str
    total: int = 0
    loaded: int = 0
    other_split: int = 0
    excluded_type: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    errors: list[str] = dataclasses.field(default_factory=list)  # the first messages, for the log
    max_errors_kept: int = 20
    skipped_turns: list[SkippedTurn] = dataclasses.field(default_factory=list)  # of the skipped records
    # split value not in KNOWN_SPLITS -> (records with it, index and id of the first)
    unknown_splits: dict = dataclasses.field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_unknown_split(self, index: int, record: dict) -> None:
        n, first, rid = self.unknown_splits.get(record["split"], (0, index, record.get("id")))
        self.unknown_splits[record["split"]] = (n + 1, first, rid)

    def split_warnings(self) -> list[str]:
        """One line per split value outside :data:`KNOWN_SPLITS`, naming its first record."""
        out = []
        for value, (n, first, rid) in self.unknown_splits.items():
            rid = f" (id {rid!r})" if isinstance(rid, (str, int)) and not isinstance(rid, bool) else ""
            out.append(f"warning: {self.path}: record {first}{rid} has split {value!r}, not one of "
                       f"{', '.join(KNOWN_SPLITS)} (a misspelling?); {n} record{'s have' if n != 1 else ' has'} it")
        return out

    def add_error(self, err: RecordError) -> None:
        self.skipped[err.reason] += 1
        if len(self.errors) < self.max_errors_kept:
            self.errors.append(str(err))

    def summary(self) -> str:
        lines = [
            f"{self.path}: {self.total} records, {self.loaded} loaded, {self.num_skipped} skipped as "
            f"malformed, {self.excluded_type} excluded by type, {self.other_split} in other splits"
        ]
        for reason, n in self.skipped.most_common():
            lines.append(f"  skipped {n:>7d}  {reason}")
        for e in self.errors:
            lines.append(f"  e.g. {e}")
        lines += [f"  {w}" for w in self.split_warnings()]
        return "\n".join(lines)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _Parser:
    def __init__(self, index: int, record: Any, lang: str, num_candidates: int | None):
        self.index, self.record, self.lang, self.num_candidates = index, record, lang, num_candidates
        self.rid = None

    def fail(self, field: str, problem: str):
        raise RecordError(self.index, field, problem, self.rid)

    def text(self, msg: dict, field: str) -> str:
        key = "value" if self.lang == "en" else "Chinese_value"
        v = msg.get(key)
        if v is None:
            self.fail(f"{field}.{key}", "missing" + (" (lang='zh' reads Chinese_value)" if key != "value" else ""))
        if not isinstance(v, str) or not v.strip():
            self.fail(f"{field}.{key}", f"must be a non-empty string, got {v!r:.60}")
        return v.strip()

    def header(self) -> tuple[str, str, tuple[int, ...], list]:
        r = self.record
        if not isinstance(r, dict):
            self.fail("<record>", f"must be an object, got {type(r).__name__}")
        rid = r.get("id", str(self.index))
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            self.fail("id", f"must be a string, got {rid!r:.60}")
        self.rid = str(rid)
        split = r.get("split")
        if not isinstance(split, str) or not split:
            self.fail("split", f"must be a non-empty string, got {split!r:.60}")
        types = r.get("type")
        if _is_number(types) and int(types) == types:
            types = [int(types)]
        if (not isinstance(types, list) or not types
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in types)):
            self.fail("type", f"must be a non-empty list of integers, got {types!r:.60}")
        convs = r.get("conversations")
        if not isinstance(convs, list) or not convs:
            self.fail("conversations", "must be a non-empty list")
        return self.rid, split, tuple(types), convs

    def turns(self, convs: list) -> tuple[Turn, ...]:
        if len(convs) % 2:
            self.fail("conversations", f"has {len(convs)} messages; human/gpt pairs expected")
        out = []
        for t in range(len(convs) // 2):
            h, g = convs[2 * t], convs[2 * t + 1]
            hf, gf = f"conversations[{2 * t}]", f"conversations[{2 * t + 1}]"
            for m, f, who in ((h, hf, "human"), (g, gf, "gpt")):
                if not isinstance(m, dict):
                    self.fail(f, "must be an object")
                if m.get("from") != who:
                    self.fail(f"{f}.from", f"expected {who!r} (messages alternate human/gpt), got {m.get('from')!r}")
            question, answer = self.text(h, hf), self.text(g, gf)
            question_raw = h["value" if self.lang == "en" else "Chinese_value"]
            text_id = h.get("text_id")
            if text_id is None or (isinstance(text_id, str) and not text_id.strip()):
                self.fail(f"{hf}.text_id", "missing")
            if not isinstance(text_id, (str, int)) or isinstance(text_id, bool):
                self.fail(f"{hf}.text_id", f"must be a string, got {text_id!r:.60}")
            out.append(self.turn(t, g, gf, str(text_id), question, answer, question_raw))
        return tuple(out)

    def gt_video(self, g: dict, gf: str) -> str | None:
        if g.get("video_id") is not None:  # released code
            v, f = g["video_id"], f"{gf}.video_id"
        elif g.get("gt") is not None:  # paper figure: "gt": ["s234d9"]
            v, f = g["gt"], f"{gf}.gt"
            if isinstance(v, list):
                if not v:
                    self.fail(f, "empty list")
                v = v[0]
        else:
            return None
        if not isinstance(v, str) or not v.strip():
            self.fail(f, f"must be a non-empty string, got {v!r:.60}")
        return v.strip()

    def turn(self, t: int, g: dict, gf: str, text_id: str, question: str, answer: str,
             question_raw: str | None = None) -> Turn:
        video = self.gt_video(g, gf)
        cands = g.get("candidate_videos")
        if cands is None:
            cands = ()
        elif not isinstance(cands, list) or not all(isinstance(c, str) and c.strip() for c in cands):
            self.fail(f"{gf}.candidate_videos", "must be a list of non-empty strings")
        cands = tuple(c.strip() for c in cands)
        seen: dict[str, int] = {}
        for i, c in enumerate(cands):
            # Checked with the candidate count: num_candidates=None reads lists about to be replaced.
            if c in seen and self.num_candidates is not None:
                self.fail(f"{gf}.candidate_videos", f"lists {c!r} twice (positions {seen[c] + 1} and {i + 1}); "
                                                   f"its 'video N' would be ambiguous")
            seen[c] = i
        se = g.get("gt_se")
        span = None
        if se is None:
            if video is not None or cands:
                self.fail(f"{gf}.gt_se", "missing on a turn that names videos")
            kind = CHAT
        else:
            if not isinstance(se, list) or len(se) != 2 or not all(_is_number(x) for x in se):
                self.fail(f"{gf}.gt_se", f"must be [start, end] numbers, got {se!r:.60}")
            if list(se) == [-1, -1]:
                kind = RETRIEVAL
                if self.num_candidates is not None and len(cands) != self.num_candidates:
                    self.fail(f"{gf}.candidate_videos",
                              f"retrieval turn needs {self.num_candidates} candidates, got {len(cands)}")
            else:
                kind = MOMENT
                s, e = float(se[0]), float(se[1])
                if s < 0 or e < 0:
                    self.fail(f"{gf}.gt_se", f"timestamps must be non-negative, got {se}")
                if s > e:
                    self.fail(f"{gf}.gt_se", f"start {s} > end {e}")
                span = (s, e)
            if video is None:
                self.fail(f"{gf}.video_id", f"{kind} turn without a ground-truth video (video_id or gt)")
        target = cands.index(video) + 1 if video is not None and video in cands else None
        english = g.get("value") if isinstance(g.get("value"), str) else answer
        src = g.get("video_source")
        return Turn(index=t, text_id=text_id, question=question, answer=answer, kind=kind,
                    video_id=video, candidate_videos=cands, gt_se=span, target_index=target,
                    answer_video=video_number(english),
                    video_source=src if isinstance(src, str) else None, question_raw=question_raw)


def _types_of(t: Any) -> tuple | None:
    if isinstance(t, int) and not isinstance(t, bool):
        return (t,)
    if isinstance(t, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in t):
        return tuple(t)
    return None


def parse_record(index: int, record: Any, *, lang: str = "en", num_candidates: int | None = 10) -> Dialogue:
    """Validate one record and build its :class:`Dialogue`; raises :class:`RecordError`."""
    if lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    p = _Parser(index, record, lang, num_candidates)
    rid, split, types, convs = p.header()
    return Dialogue(index=index, id=rid, split=split, types=types, turns=p.turns(convs))


def read_json_list(path: str | os.PathLike, what: str) -> list:
    """The JSON list in ``path`` (UTF-8, a byte-order mark allowed). :class:`DataFileError` (a
    ``ValueError``) naming the file when it cannot be read, is not UTF-8 (the byte offset, line and
    column), is not valid JSON (line and column) or is not a list."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataFileError(f"{path}: cannot read ({e.strerror or e})") from None
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = raw.count(b"\n", 0, at) + 1
        col = at - (raw.rfind(b"\n", 0, at) + 1) + 1
        raise DataFileError(f"{path}: not valid UTF-8 at byte offset {at} (line {line}, byte {col} of the line: "
                            f"0x{raw[at]:02x}); save the file as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise DataFileError(f"{path}: not valid JSON: nested too deeply to read") from None
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a JSON list of {what}, got {type(data).__name__}")
    return data


def load_dialogues(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    lang: str = "en",
    exclude_types: tuple[tuple[int, ...], ...] = ((0,),),
    strict: bool = False,
    num_candidates: int | None = 10,
) -> tuple[list[Dialogue], LoadReport]:
    """Read an IVCR-200K JSON file.

    Args:
      split: keep only records of this split ("train", "test", ...); None keeps all.
      lang: "en" reads ``value``; "zh" reads ``Chinese_value`` (a record without it is malformed).
      exclude_types: records whose ``type`` list equals one of these are dropped (the reference
        excludes ``[0]``, chit-chat, everywhere). Pass ``()`` to keep all.
      strict: raise :class:`RecordError` on the first malformed record instead of skipping it.
      num_candidates: required length of ``candidate_videos`` on retrieval turns, every list also
        free of repeats (None: any list, as read by ``retrieval.search.write_candidates``).
    """
    path = Path(path)
    records = read_json_list(path, "dialogue records")
    excluded = {tuple(t) for t in exclude_types}
    report = LoadReport(path=str(path), total=len(records))
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, dict) and isinstance(rec.get("split"), str) and rec["split"] not in KNOWN_SPLITS \
                and rec["split"] != split:
            report.add_unknown_split(i, rec)
        # Split and type filters first: a record of another split is not this run's concern.
        if split is not None and isinstance(rec, dict) and isinstance(rec.get("split"), str) and rec["split"] != split:
            report.other_split += 1
            continue
        # Excluded types are not validated: chit-chat records need not follow the retrieval schema.
        if isinstance(rec, dict) and _types_of(rec.get("type")) in excluded:
            report.excluded_type += 1
            continue
        try:
            d = parse_record(i, rec, lang=lang, num_candidates=num_candidates)
        except RecordError as e:
            if strict:
                raise RecordError(e.index, e.field, f"{e.problem} [{path}]", e.record_id) from None
            report.add_error(e)
            if split is None or (isinstance(rec, dict) and rec.get("split") == split):  # as the reference reads it
                report.skipped_turns.extend(readable_turns(i, rec))
            continue
        out.append(d)
    report.loaded = len(out)
    for w in report.split_warnings():
        log.warning(w)
    return out, report


def resolve_video_root(annotations: str | os.PathLike, video_root: str | os.PathLike | None = None,
                       dialogues=()) -> str:
    """The directory the JSON's relative video paths are resolved against — the one rule.

    ``video_root`` when given; else the JSON's ``videos/`` subdirectory when there is one (the
    corpus layout ``<dir>/ivcr.json`` + ``<dir>/videos/`` of the demo and of prepared corpora) and
    the first referenced video of ``dialogues`` is not found beside the JSON instead; else the
    JSON's own directory.
    """
    if video_root:
        return str(video_root)
    parent = Path(annotations).parent
    sub = parent / "videos"
    if sub.is_dir():
        first = next((v for d in dialogues for t in d.turns for v in ((t.video_id,) + t.candidate_videos) if v), None)
        if first is None or (sub / first).exists() or not (parent / first).exists():
            return str(sub)
    return str(parent)
