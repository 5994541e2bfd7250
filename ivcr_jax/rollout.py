"""Answering dialogue turns with the model: the loop that evaluation and the training loop's
held-out monitor share.

:func:`answer_samples` builds each sample's inference prompt (``data/prompts.py``: the turn's
history with ground-truth answers, or with the model's own under ``history="model"``), packs
prompts into batches in waves of equal turn index (so a turn follows its dialogue's previous
one), shows each turn only videos the system could know (:func:`shown_dialogue`), and runs the KV-cache generator (``models/generate.py``). It yields one :class:`Answered`
or :class:`Skipped` per sample, in order.

:func:`monitor_scores` is the quick score the training loop logs: retrieval R@1, moment
R@1 IoU≥0.5 and the parse rates, with the project's answer parsers (``data/answers.py``). The
evaluator (``python -m ivcr_jax.eval``) computes the full metrics from a predictions file.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterator, Mapping, Sequence

import jax

from ivcr_jax.data.answers import iou, parse_moment, parse_video_index
from ivcr_jax.data.frames import VideoError
from ivcr_jax.data.prompts import Prompt, PromptLoader, clean_answer
from ivcr_jax.data.samples import SampleRef, SampleTooLong
from ivcr_jax.models.generate import Generation, Generator

__all__ = ["Answered", "Skipped", "answer_samples", "monitor_scores", "shown_dialogue", "with_history"]


@dataclasses.dataclass
class Answered:
    ref: SampleRef
    prompt: Prompt
    generation: Generation   # of the batch this sample was in
    row: int                 # its row in that batch
    rows: int                # real rows in that batch (the batch's stage times are shared by them)
    text: str                # the decoded answer

    @property
    def turn(self):
        return self.ref.dialogue.turns[self.ref.turn_idx]


@dataclasses.dataclass
class Skipped:
    ref: SampleRef
    error: str
    reason: str = "bad_prompt"   # the pipeline's skip reasons: video, too_long, bad_text, span_beyond_video

    @property
    def turn(self):
        return self.ref.dialogue.turns[self.ref.turn_idx]


def _waves(refs: Sequence[SampleRef], batch_size: int):
    """Batches of samples in waves of equal turn index, so a turn follows its dialogue's previous one."""
    by_turn: dict[int, list] = collections.defaultdict(list)
    for r in refs:
        by_turn[r.turn_idx].append(r)
    for t in sorted(by_turn):
        wave = by_turn[t]
        for b0 in range(0, len(wave), batch_size):
            yield wave[b0:b0 + batch_size]


def with_history(dialogue, turn_idx: int, answers: Mapping[tuple[int, int], str]):
    """``dialogue`` with the answers of turns before ``turn_idx`` replaced by the model's own."""
    turns = list(dialogue.turns)
    for j in range(turn_idx):
        a = answers.get((dialogue.index, j))
        if a is not None:
            turns[j] = dataclasses.replace(turns[j], answer=a)
    return dataclasses.replace(dialogue, turns=tuple(turns))


def shown_dialogue(dialogue, turn_idx: int, answers: Mapping[tuple[int, int], str] | None = None):
    """``dialogue`` as the system can show it at turn ``turn_idx``: no video the system could not know.

    * A first-turn moment is shown the first stage's top-1 (candidate 1), not the ground-truth
      video; under the reference's test filter they are the same video, without it this is no oracle.
    * ``answers`` (the closed loop, ``history="model"``): the earlier turns carry the model's own
      answers (:func:`with_history`), and a moment turn after a retrieval turn is shown the candidate
      the model chose there (its "video N", read by ``data/answers.py``; candidate 1 when it named
      none), numbered so in ``Current video : <VID> k </VID>``. Without ``answers`` (teacher
      forcing, as the reference) such a turn shows the ground-truth video.
    """
    if answers is not None:
        dialogue = with_history(dialogue, turn_idx, answers)
    turns = list(dialogue.turns)
    chosen = None   # (k, video) the last retrieval turn led to, in the closed loop
    for j in range(min(turn_idx + 1, len(turns))):
        t = turns[j]
        if t.kind == "retrieval":
            chosen = None
            if answers is not None and (dialogue.index, j) in answers and t.candidate_videos:
                k = parse_video_index(answers[(dialogue.index, j)])
                k = k if k is not None and 1 <= k <= len(t.candidate_videos) else 1
                chosen = (k, t.candidate_videos[k - 1])
        elif t.kind == "moment":
            if j == 0 and t.candidate_videos:
                turns[j] = dataclasses.replace(t, video_id=t.candidate_videos[0])
            elif chosen is not None:
                turns[j] = dataclasses.replace(t, video_id=chosen[1], answer_video=chosen[0])
    return dataclasses.replace(dialogue, turns=tuple(turns))


def answer_samples(refs: Sequence[SampleRef], loader: PromptLoader, gen: Generator, tokenizer, *,
                   batch_size: int, history: str = "teacher", temperature: float = 0.0, top_p: float = 1.0,
                   key: jax.Array | None = None) -> Iterator[Answered | Skipped]:
    """Generate an answer for every sample of ``refs``; a sample whose prompt cannot be built
    (missing or corrupt video, too long, an unparseable prompt) is yielded as :class:`Skipped`, and
    its turn keeps its ground-truth answer in later prompts under ``history="model"``."""
    if history not in ("teacher", "model"):
        raise ValueError(f"history must be 'teacher' or 'model', got {history!r}")
    key = jax.random.key(0) if key is None else key
    answers: dict[tuple[int, int], str] = {}
    n_batch = 0   # generated batches: batch n samples with fold_in(key, n)
    for chunk in _waves(refs, batch_size):
        prompts, ok = [], []
        for ref in chunk:
            d = shown_dialogue(ref.dialogue, ref.turn_idx, answers if history == "model" else None)
            try:
                prompts.append(loader.prompt(d, ref.turn_idx, ref.sample_id, truth=ref.dialogue))
                ok.append(ref)
            except (VideoError, SampleTooLong, ValueError) as e:  # ValueError: an unparseable prompt
                yield Skipped(ref, str(e), "video" if isinstance(e, VideoError) else getattr(e, "reason", "bad_prompt"))
        if not prompts:
            continue
        g = gen(loader.batch(prompts, batch_size), temperature=temperature, top_p=top_p,
                key=jax.random.fold_in(key, n_batch))
        n_batch += 1
        for i, (ref, p, text) in enumerate(zip(ok, prompts, g.texts(tokenizer))):
            answers[(ref.dialogue.index, ref.turn_idx)] = clean_answer(text, tokenizer)
            yield Answered(ref, p, g, i, len(prompts), text)


def monitor_scores(items: Sequence[Answered | Skipped]) -> dict[str, float]:
    """Retrieval R@1 and parse rate, moment R@1 IoU≥0.5 and parse rate, in % of the retrieval /
    moment samples given (a skipped sample counts as a failure); chat turns are not scored."""
    n = collections.Counter()
    for it in items:
        turn = it.turn
        text = it.text if isinstance(it, Answered) else None
        if turn.kind == "retrieval":
            n["retrieval"] += 1
            k = parse_video_index(text)
            n["retrieval_parsed"] += k is not None
            n["retrieval_hit"] += k is not None and k == turn.target_index
        elif turn.kind == "moment":
            n["moment"] += 1
            span = parse_moment(text)
            n["moment_parsed"] += span is not None
            n["moment_hit"] += span is not None and turn.gt_se is not None and iou(span, turn.gt_se) >= 0.5
    out = {}
    for kind, hit, name in (("retrieval", "retrieval_hit", "R@1"), ("moment", "moment_hit", "R@1_IoU0.5")):
        if n[kind]:
            out[f"{kind}/{name}"] = 100.0 * n[hit] / n[kind]
            out[f"{kind}/parsed"] = 100.0 * n[f"{kind}_parsed"] / n[kind]
            out[f"{kind}/samples"] = float(n[kind])
    return out
