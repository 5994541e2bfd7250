"""The reference's test protocol: which test turns it runs, and its own predictions files.

Transcribed from the reference code (``ivcr200k/ivcr200k.github.io``, HEAD c1664c3):

* **The test filter** (``convert_dataset.ipynb``, cell 1): a test dialogue (type ≠ [0]) is kept
  only if the first stage got its first turn right — a first retrieval turn's ground-truth video
  is among its ``candidate_videos`` (R@10), a first moment turn's ground-truth video is candidate
  1 (R@1). A type-[7] dialogue goes through a per-turn branch that keeps only its *human*
  messages, so it yields no sample at all (cell 2 builds samples from assistant messages). Both
  rules are reproduced: :func:`passes_test_filter`.
* **The samples** (cells 2, 4, 6 and ``video_instruct_dataset.py``'s 15-message filter): every
  prefix of a kept dialogue cut to 10 turns is a sample, and samples of more than 15 messages
  (system + 7 turns) are dropped: :func:`reference_samples`, in the notebook's order (dialogues
  in file order, prefixes in turn order). ``metrics/eval.py`` aligns the predictions with these
  samples by position and skips the first retrieval and the first moment sample of that order.
* **Its predictions file** (``evaluate.py``): ``result.json``, a JSON list of
  ``{"user_q": ..., "output": ...}``, one per sample in that order, ``user_q`` being the sample's
  last *rendered* user message (``Candidate videos : … .{question}``):
  :func:`read_reference_predictions` maps it onto ``text_id`` keys, checking that each entry's
  ``user_q`` ends with its sample's question.

Where the released code would raise (a chat turn in a scored dialogue: no ``gt_se`` /
``candidate_videos``), we keep going: a chat-first dialogue passes the filter (there is no first
stage to miss), and chat turns are scored only by BLEU and intent.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from ivcr_jax.data.schema import MOMENT, RETRIEVAL, Dialogue, read_json_list

__all__ = ["TEST_FILTERS", "passes_test_filter", "reference_samples", "RefSample", "read_reference_predictions",
           "ReferencePredictionsError", "is_reference_predictions", "first_samples"]

TEST_FILTERS = ("reference", "none")
MAX_TURNS = 10          # convert_dataset.ipynb cell 2: `if len(sub_sample) <= 10`
MAX_SAMPLE_TURNS = 7    # cell 6 and the dataset: `len(s) <= 15` messages = system + 7 turns


@dataclasses.dataclass(frozen=True)
class RefSample:
    """One sample of the reference's test set: turns ``0..turn_idx`` of ``dialogue``."""

    dialogue: Dialogue
    turn_idx: int

    @property
    def turn(self):
        return self.dialogue.turns[self.turn_idx]

    @property
    def videotokens(self) -> int:
        """``<VIDEOTOKEN>``s of its last user message: what ``cal_reslut`` classifies by (10:
        retrieval; anything else is scored as a moment sample)."""
        return len(self.turn.candidate_videos) if self.turn.kind == RETRIEVAL else (1 if self.turn.kind == MOMENT else 0)


def passes_test_filter(d: Dialogue) -> bool:
    """The notebook's cell 1 (see the module docstring). A chat-first dialogue passes."""
    if tuple(d.types) == (7,):
        return False
    first = d.turns[0]
    if first.kind == RETRIEVAL:
        return first.video_id in first.candidate_videos
    if first.kind == MOMENT:
        return bool(first.candidate_videos) and first.video_id == first.candidate_videos[0]
    return True


def reference_samples(dialogues: Sequence[Dialogue], *, test_filter: str = "reference",
                      max_turns: int = MAX_TURNS, max_sample_turns: int | None = MAX_SAMPLE_TURNS
                      ) -> list[RefSample]:
    """The samples the reference evaluates, in its order; ``test_filter="none"`` keeps every dialogue."""
    if test_filter not in TEST_FILTERS:
        raise ValueError(f"test_filter must be one of {', '.join(TEST_FILTERS)}, got {test_filter!r}")
    out = []
    for d in dialogues:
        if test_filter == "reference" and not passes_test_filter(d):
            continue
        n = min(len(d.turns), max_turns)
        if max_sample_turns is not None:
            n = min(n, max_sample_turns)
        out.extend(RefSample(d, t) for t in range(n))
    return out


class ReferencePredictionsError(ValueError):
    """A reference-format predictions file that does not fit the reference's samples."""


def is_reference_predictions(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a JSON list (``evaluate.py``'s ``result.json``) rather than JSONL."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    return head.startswith("[")


def read_reference_predictions(path: str | os.PathLike, samples: Sequence[RefSample]
                               ) -> tuple[dict[str, str], dict[str, str]]:
    """``result.json`` of the reference's ``evaluate.py`` → ``({text_id: output}, {user_q: output})``:
    aligned by position with ``samples`` (:func:`reference_samples`), as ``cal_reslut`` aligns it,
    and keyed by ``user_q`` (the first entry of each), as ``cal_multi_reslut`` matches it.

    Raises :class:`ReferencePredictionsError` naming the entry when the file is not a list of
    ``{"user_q": str, "output": str}``, has another length than the samples, or an entry's
    ``user_q`` does not end with its sample's question (the file is not in the samples' order:
    built from another annotation file or another filter).
    """
    try:
        data = read_json_list(path, "{'user_q', 'output'} objects")
    except ValueError as e:
        raise ReferencePredictionsError(str(e)) from None
    if len(data) != len(samples):
        raise ReferencePredictionsError(
            f"{path}: {len(data)} entries, but the reference's test filter gives {len(samples)} samples for "
            f"this annotation file (is it the same file, and the same --test-filter?)")
    out: dict[str, str] = {}
    by_q: dict[str, str] = {}
    for i, (entry, s) in enumerate(zip(data, samples)):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("output"), str):
            raise ReferencePredictionsError(f"{where}: expected an object with a string 'output'")
        q = entry.get("user_q")
        if not isinstance(q, str) or not q.strip().endswith(s.turn.question.strip()):
            raise ReferencePredictionsError(
                f"{where}: user_q {str(q)[-60:]!r} does not end with the question of sample {i} "
                f"(dialogue {s.dialogue.id!r} turn {s.turn_idx + 1}: {s.turn.question[-60:]!r})")
        out[s.turn.text_id] = entry["output"]
        by_q.setdefault(q, entry["output"])
    return out, by_q


def first_samples(samples: Sequence[RefSample]) -> tuple[str | None, str | None]:
    """The text_ids of the samples ``cal_reslut`` never scores: the first with 10 ``<VIDEOTOKEN>``s
    and the first with any other count (its dict-initialisation branch)."""
    ret = next((s.turn.text_id for s in samples if s.videotokens == 10), None)
    other = next((s.turn.text_id for s in samples if s.videotokens != 10), None)
    return ret, other

