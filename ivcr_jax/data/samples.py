"""IVCR dialogues → token ids, labels and video requests, as the reference builds them.

Follows reference-architecture §8.2 (every dialogue prefix is a sample; only the last assistant
turn is supervised; history turns use ground-truth answers and carry all their videos) and §8.3
(the HEAD prompt format with ``<VIDEOTOKEN>`` placeholders, Llama-2-chat template, labels).

A sample for turn ``t`` of a dialogue renders turns ``first..t`` as::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user_1} [/INST] {answer_1} </s><s>[INST] {user_2} [/INST] ... {answer_t} </s>

with user texts

* retrieval: ``Candidate videos : <VID> 1 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>,<VID> 2 </VID> ... <VID> 10 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>.{question}``
* moment: ``Current video : <VID> {k} </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>. The video contains N frames sampled at t1, ..., tN seconds.{question}``
  (k = the "video N" of the turn's ground-truth answer, else the previous retrieval turn's target,
  else 1). This is the reference HEAD's text: its ``load_video`` message ends in ``seconds`` (no
  period) and the dataset inserts it as ``"</VIDEO>. " + message + ".{question}"``.
  ``double_dot=True`` renders ``seconds..{question}`` instead (an earlier reading of the reference,
  kept as an option for runs made with it; ``config.data.double_dot``); ``frame_message=False``
  drops the frame-time sentence altogether (``config.data.frame_message``).
* chat: ``{question}``.

The text is rendered by hand exactly as HF's Llama-2-chat template renders these messages (the test
tokenizer has no template) and tokenised in one call with ``add_special_tokens=False``, as
``apply_chat_template`` does; the tokenizer maps the template's ``<s>`` / ``</s>`` to the bos / eos
ids (1 / 2). A check verifies that the ids appear exactly where the template puts them, so question
text that happens to contain ``<s>`` or ``<VIDEOTOKEN>`` raises :class:`SampleError` (the pipeline
skips and counts the sample) instead of corrupting it.
Labels are −100 up to and including the last ``[/INST]``; the final answer and ``</s>`` are
supervised. Each ``<VIDEOTOKEN>`` is then expanded to that video's ``n_tok = 32·ceil(frames/32)``
positions (label −100), and ``video_token_index`` tells, for each position, which row of the
sample's video-token sequence it takes (−1 for text). That sequence is, group by group in sorted
group-name order (groups are frame counts: ``"f12"``, ``"f96"``), video by video in prompt order,
each video's ``n_tok`` tokens.

Frame settings (§8.1): the paper's (12 frames per retrieval candidate, 96 for a moment video;
:meth:`SampleConfig.paper`) and the later HEAD code's (64 / 64; :meth:`SampleConfig.head`).
The prompt template text stays English under ``lang="zh"`` (the reference has no Chinese
template); only the questions and answers switch to ``Chinese_value``.

Over-long samples (more than ``max_len`` tokens, or more videos of a group than the per-sample cap)
lose their oldest history turns, one at a time, and record how many were dropped; a sample is
given up (:class:`SampleTooLong`) only when its supervised turn alone does not fit.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ivcr_jax.data.batch import IGNORE
from ivcr_jax.data.frames import frames_message
from ivcr_jax.data.schema import KINDS, MOMENT, RETRIEVAL, Dialogue
from ivcr_jax.tokenizer import BOS_ID, EOS_ID, VIDEO_TOKEN

SYSTEM_MESSAGE = "You are an excellent video retrieval AI assistant."


class SampleError(ValueError):
    """A sample that cannot be built from its (schema-valid) record: the input pipeline and the
    evaluation skip it and count it under ``reason``; a long run never stops for one record.

    The base class is for text that would corrupt the prompt: a question or answer containing the
    template's ``<s>`` / ``</s>`` or ``<VIDEOTOKEN>``, which the tokenizer reads as special ids.
    """

    reason = "bad_text"


class SampleTooLong(SampleError):
    """The supervised turn alone exceeds the token or video budget."""

    reason = "too_long"


class SpanBeyondVideo(SampleError):
    """A moment turn's ``gt_se`` ends past its video's decoded duration (``pipeline.check_span``)."""

    reason = "span_beyond_video"


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """How samples are cut, rendered and bounded.

    Attributes:
      retrieval_frames: frames per retrieval candidate (paper 12, HEAD 64).
      moment_frames: frames of a moment turn's video (paper 96, HEAD 64).
      max_turns: dialogues are cut to this many turns (reference 10): turns beyond it give no sample.
      max_sample_turns: a prefix with more turns is dropped (the reference keeps samples of at most
        15 messages = system + 7 turns); None keeps all. ``long_prefix="truncate"`` instead keeps the
        last ``max_sample_turns`` turns of such a prefix.
      max_len: token budget of a sample after ``<VIDEOTOKEN>`` expansion (LLaMA-2: 4096).
      max_retrieval_videos / max_moment_videos: per-sample caps on videos of each kind (the batch
        pads each frame-count group to the sum of the caps of the kinds in it); None = no cap.
      window / tokens_per_window: the video Q-Former's window (32 frames) and its output (32 tokens):
        a video of F frames gives ``tokens_per_window * ceil(F / window)`` LLM tokens.
      frame_message: write the moment turn's frame-time sentence (the reference does).
      double_dot: end that sentence with an extra period, ``seconds..{question}`` (not the reference
        HEAD, which renders ``seconds.{question}``; an option reproducing an earlier reading of it).
      video_root: directory that the JSON's relative video paths are resolved against.
    """

    retrieval_frames: int = 12
    moment_frames: int = 96
    max_turns: int = 10
    max_sample_turns: int | None = 7
    long_prefix: str = "drop"  # "drop" (reference) | "truncate"
    max_len: int = 4096
    max_retrieval_videos: int | None = None
    max_moment_videos: int | None = None
    window: int = 32
    tokens_per_window: int = 32
    system_message: str = SYSTEM_MESSAGE
    frame_message: bool = True
    double_dot: bool = False  # True: "seconds..{question}" (HEAD: "seconds.{question}")
    video_root: str | None = None

    @classmethod
    def paper(cls, **kw) -> "SampleConfig":
        """The paper / Nov-2024 code: 12 frames per candidate, 96 per moment video."""
        return cls(**{"retrieval_frames": 12, "moment_frames": 96, **kw})

    @classmethod
    def head(cls, **kw) -> "SampleConfig":
        """The Jul-2025 reference code: 64 frames for both."""
        return cls(**{"retrieval_frames": 64, "moment_frames": 64, **kw})

    def __post_init__(self):
        if self.long_prefix not in ("drop", "truncate"):
            raise ValueError(f"long_prefix must be 'drop' or 'truncate', got {self.long_prefix!r}")
        if min(self.retrieval_frames, self.moment_frames, self.max_turns, self.max_len) <= 0:
            raise ValueError(f"frame counts, max_turns and max_len must be positive: {self}")

    def n_tok(self, num_frames: int) -> int:
        """LLM tokens of a video of ``num_frames`` frames."""
        return self.tokens_per_window * math.ceil(num_frames / self.window)

    def frames_for(self, kind: str) -> int:
        return self.retrieval_frames if kind == RETRIEVAL else self.moment_frames

    def group_tokens(self) -> dict[str, int]:
        """LLM tokens per video of each frame-count group."""
        return {group_name(n): self.n_tok(n) for n in (self.retrieval_frames, self.moment_frames)}

    def group_capacity(self) -> dict[str, int | None]:
        """Per-sample video cap of each frame-count group (None = unbounded)."""
        caps: dict[str, int | None] = {}
        for kind, cap in ((RETRIEVAL, self.max_retrieval_videos), (MOMENT, self.max_moment_videos)):
            g = group_name(self.frames_for(kind))
            if g in caps and (caps[g] is None or cap is None):
                caps[g] = None
            else:
                caps[g] = (caps.get(g) or 0) + cap if cap is not None else None
        return caps


def group_name(num_frames: int) -> str:
    return f"f{num_frames}"


def resolve_video(video_id: str, root: str | os.PathLike | None) -> str:
    p = Path(video_id)
    return str(p if root is None or p.is_absolute() else Path(root) / p)


@dataclasses.dataclass(frozen=True)
class VideoRequest:
    """One video a sample shows, in prompt order."""

    video_id: str  # as in the JSON
    path: str  # resolved against video_root
    num_frames: int
    group: str  # "f{num_frames}"
    turn: int  # turn index in the dialogue
    role: str  # "candidate" | "moment"
    number: int  # the "<VID> n </VID>" shown with it


@dataclasses.dataclass(frozen=True)
class SampleRef:
    """A (dialogue, turn) pair to build a sample from: what the input pipeline iterates over."""

    sample_id: int
    dialogue: Dialogue
    turn_idx: int

    @property
    def key(self) -> str:
        return f"{self.dialogue.id}:{self.turn_idx}"


@dataclasses.dataclass(frozen=True)
class Sample:
    sample_id: int
    dialogue_index: int
    turn_idx: int
    text_id: str
    kind: str  # of the supervised (last) turn
    input_ids: np.ndarray  # int32 [S], <VIDEOTOKEN> expanded
    labels: np.ndarray  # int32 [S], -100 except the last answer + </s>
    videos: tuple[VideoRequest, ...]  # prompt order
    video_starts: tuple[int, ...]  # position in input_ids of each video's first token
    target_index: int | None  # 1-based GT position among the candidates (retrieval turns)
    gt_span: tuple[float, float] | None  # moment turns
    first_turn: int  # first history turn kept
    dropped_turns: int  # history turns removed to fit the budgets
    text: str  # the rendered text before expansion
    n_tok: Mapping[str, int]  # tokens per video of each group of the config

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    def group_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.videos:
            out[v.group] = out.get(v.group, 0) + 1
        return out

    def video_slots(self) -> list[int]:
        """Each video's index within its group (prompt order)."""
        seen: dict[str, int] = {}
        slots = []
        for v in self.videos:
            slots.append(seen.get(v.group, 0))
            seen[v.group] = slots[-1] + 1
        return slots

    def video_token_index(self, capacity: Mapping[str, int] | None = None) -> np.ndarray:
        """int32 [S]: row of each position in the video-token sequence (−1 for text).

        Without ``capacity`` the sequence is this sample's own (group blocks hold exactly its
        videos); with it, each group block is padded to ``capacity[group]`` videos, which is the
        layout of a padded batch.
        """
        counts = self.group_counts()
        groups = sorted(set(counts) | set(capacity or {}))
        offset, base = {}, 0
        for g in groups:
            n = counts.get(g, 0) if capacity is None else capacity[g]
            if n < counts.get(g, 0):
                raise ValueError(f"sample {self.sample_id}: {counts[g]} videos in group {g}, capacity {n}")
            offset[g] = base
            base += n * self.n_tok[g]
        idx = np.full(self.length, -1, np.int32)
        for v, slot, start in zip(self.videos, self.video_slots(), self.video_starts):
            n = self.n_tok[v.group]
            idx[start:start + n] = offset[v.group] + slot * n + np.arange(n, dtype=np.int32)
        return idx


def enumerate_samples(dialogues: Iterable[Dialogue], cfg: SampleConfig) -> list[SampleRef]:
    """Every dialogue prefix that is a sample (§8.2): turns ``1..t`` for ``t <= max_turns``.

    With ``long_prefix="drop"`` prefixes of more than ``max_sample_turns`` turns are left out, as the
    reference's 15-message filter does. ``sample_id`` is the position in the returned list.
    """
    out = []
    for d in dialogues:
        for t in range(min(len(d.turns), cfg.max_turns)):
            if cfg.long_prefix == "drop" and cfg.max_sample_turns is not None and t + 1 > cfg.max_sample_turns:
                break
            out.append(SampleRef(len(out), d, t))
    return out


def moment_number(dialogue: Dialogue, turn_idx: int) -> int:
    """k of "Current video : <VID> k </VID>": the answer's "video N", else the previous retrieval
    turn's target, else 1. (The reference formats ``None`` when the answer names no video.)"""
    turn = dialogue.turns[turn_idx]
    if turn.answer_video is not None:
        return turn.answer_video
    for prev in reversed(dialogue.turns[:turn_idx]):
        if prev.kind == RETRIEVAL:
            if prev.target_index is not None:
                return prev.target_index
            if prev.answer_video is not None:
                return prev.answer_video
            break
    return 1


def turn_videos(dialogue: Dialogue, turn_idx: int, cfg: SampleConfig) -> list[VideoRequest]:
    """The videos turn ``turn_idx`` shows, in prompt order."""
    turn = dialogue.turns[turn_idx]
    if turn.kind == RETRIEVAL:
        n = cfg.retrieval_frames
        return [VideoRequest(c, resolve_video(c, cfg.video_root), n, group_name(n), turn_idx, "candidate", i + 1)
                for i, c in enumerate(turn.candidate_videos)]
    if turn.kind == MOMENT:
        n = cfg.moment_frames
        return [VideoRequest(turn.video_id, resolve_video(turn.video_id, cfg.video_root), n, group_name(n),
                             turn_idx, "moment", moment_number(dialogue, turn_idx))]
    return []


def prefix_videos(dialogue: Dialogue, turn_idx: int, cfg: SampleConfig) -> list[VideoRequest]:
    """All videos of the prefix ending at ``turn_idx`` (before any truncation), prompt order."""
    first = _first_turn(turn_idx, cfg)
    return [v for t in range(first, turn_idx + 1) for v in turn_videos(dialogue, t, cfg)]


def user_text(dialogue: Dialogue, turn_idx: int, cfg: SampleConfig,
              timestamps: Mapping[int, Sequence[float]] | None = None) -> str:
    """The user message of a turn, as the reference writes it (§8.3)."""
    turn = dialogue.turns[turn_idx]
    q = turn.question.strip()
    if turn.kind == RETRIEVAL:
        blocks = [f"<VID> {i + 1} </VID> <VIDEO> {VIDEO_TOKEN} </VIDEO>" for i in range(len(turn.candidate_videos))]
        return ("Candidate videos : " + ",".join(blocks) + "." + q).strip()
    if turn.kind == MOMENT:
        k = moment_number(dialogue, turn_idx)
        head = f"Current video : <VID> {k} </VID> <VIDEO> {VIDEO_TOKEN} </VIDEO>"
        if cfg.frame_message:
            if timestamps is None or turn_idx not in timestamps:
                raise ValueError(f"dialogue {dialogue.index} turn {turn_idx}: the moment turn's frame-time "
                                 f"message needs the decoded frames' timestamps (timestamps[{turn_idx}])")
            # IVCR inserts ". <message>." after </VIDEO>; the turn text already starts with ".".
            head += ". " + frames_message(timestamps[turn_idx]) + ("." if cfg.double_dot else "")
        return (head + "." + q).strip()
    return q


def render(system: str, users: Sequence[str], answers: Sequence[str | None]) -> str:
    """HF's Llama-2-chat template, by hand. ``answers[-1] = None`` leaves the last turn open."""
    out = []
    for i, (u, a) in enumerate(zip(users, answers)):
        content = (f"<<SYS>>\n{system}\n<</SYS>>\n\n{u}" if i == 0 and system else u).strip()
        out.append(f"<s>[INST] {content} [/INST]")
        if a is not None:
            out.append(f" {a.strip()} </s>")
    return "".join(out)


def _first_turn(turn_idx: int, cfg: SampleConfig) -> int:
    if cfg.long_prefix == "truncate" and cfg.max_sample_turns is not None:
        return max(0, turn_idx + 1 - cfg.max_sample_turns)
    return 0


def _special_id(tokenizer, token: str) -> int:
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or i == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token!r} token; load it with ivcr_jax.tokenizer.load_tokenizer")
    return int(i)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_sample(
    dialogue: Dialogue,
    turn_idx: int,
    tokenizer,
    cfg: SampleConfig,
    *,
    timestamps: Mapping[int, Sequence[float]] | None = None,
    sample_id: int = 0,
    with_answer: bool = True,
) -> Sample:
    """The training sample for turn ``turn_idx`` of ``dialogue`` (turns ``0..turn_idx``).

    Args:
      timestamps: the decoded frames' timestamps (seconds) of each moment turn's video, keyed by
        turn index; needed when the kept turns include a moment turn and ``cfg.frame_message``.
      with_answer: False gives the inference prompt (see :func:`build_prompt`).
    Raises:
      SampleTooLong: even with all history dropped, the sample exceeds ``max_len`` or a video cap.
      SampleError: a question or answer holds ``<s>``, ``</s>`` or ``<VIDEOTOKEN>``.
    """
    if not 0 <= turn_idx < len(dialogue.turns):
        raise IndexError(f"dialogue {dialogue.index} has {len(dialogue.turns)} turns, asked for turn {turn_idx}")
    vt_id = _special_id(tokenizer, VIDEO_TOKEN)
    caps = cfg.group_capacity()
    start = _first_turn(turn_idx, cfg)
    first = start
    while True:
        s = _build(dialogue, first, turn_idx, tokenizer, cfg, timestamps, vt_id, sample_id, with_answer)
        counts = s.group_counts()
        over = [g for g, n in counts.items() if caps.get(g) is not None and n > caps[g]]
        if s.length <= cfg.max_len and not over:
            return dataclasses.replace(s, dropped_turns=first - start)
        if first == turn_idx:
            why = (f"{s.length} tokens > max_len {cfg.max_len}" if s.length > cfg.max_len
                   else f"{', '.join(f'{counts[g]} videos in {g} > cap {caps[g]}' for g in over)}")
            raise SampleTooLong(f"dialogue {dialogue.index} ({dialogue.id!r}) turn {turn_idx}: the supervised "
                                f"turn alone does not fit ({why})")
        first += 1


def build_prompt(dialogue: Dialogue, turn_idx: int, tokenizer, cfg: SampleConfig, *,
                 timestamps: Mapping[int, Sequence[float]] | None = None, sample_id: int = 0) -> Sample:
    """The inference prompt: everything up to and including the last ``[/INST]``, no answer.

    The last turn's answer is not read (except, as the reference does, its "video N" for the moment
    turn's ``<VID> k </VID>``; set ``Turn.answer_video=None`` to avoid that). Labels are all −100.
    """
    return build_sample(dialogue, turn_idx, tokenizer, cfg, timestamps=timestamps, sample_id=sample_id,
                        with_answer=False)


def _build(dialogue: Dialogue, first: int, last: int, tokenizer, cfg: SampleConfig, timestamps,
           vt_id: int, sample_id: int, with_answer: bool) -> Sample:
    turns = range(first, last + 1)
    users = [user_text(dialogue, t, cfg, timestamps) for t in turns]
    answers: list[str | None] = [dialogue.turns[t].answer for t in turns]
    prompt_text = render(cfg.system_message, users, answers[:-1] + [None])
    text = render(cfg.system_message, users, answers) if with_answer else prompt_text
    prompt_ids = _encode(tokenizer, prompt_text)
    ids = _encode(tokenizer, text) if with_answer else prompt_ids
    where = f"dialogue {dialogue.index} ({dialogue.id!r}) turn {last}"
    if ids[:len(prompt_ids)] != prompt_ids:
        raise SampleError(f"{where}: the tokenisation of the prompt is not a prefix of the full sample's; "
                         f"cannot place the label boundary after the last [/INST]")
    n_turns = len(users)
    n_bos, n_eos = ids.count(BOS_ID), ids.count(EOS_ID)
    want_eos = n_turns if with_answer else n_turns - 1
    if n_bos != n_turns or n_eos != want_eos or (with_answer and ids[-1] != EOS_ID):
        raise SampleError(f"{where}: expected {n_turns} <s> and {want_eos} </s> ids, found {n_bos} and {n_eos}; "
                         f"does a question or answer contain '<s>' or '</s>'?")
    videos = [v for t in turns for v in turn_videos(dialogue, t, cfg)]
    if ids.count(vt_id) != len(videos):
        raise SampleError(f"{where}: {ids.count(vt_id)} {VIDEO_TOKEN} ids for {len(videos)} videos; "
                         f"does a question contain '{VIDEO_TOKEN}'?")
    n_tok = cfg.group_tokens()
    out_ids, out_labels, starts = [], [], []
    boundary = len(prompt_ids)
    vi = 0
    for pos, tok in enumerate(ids):
        if tok == vt_id:
            n = n_tok[videos[vi].group]
            starts.append(len(out_ids))
            out_ids.extend([vt_id] * n)
            out_labels.extend([IGNORE] * n)
            vi += 1
        else:
            out_ids.append(tok)
            out_labels.append(tok if pos >= boundary else IGNORE)
    turn = dialogue.turns[last]
    return Sample(
        sample_id=sample_id, dialogue_index=dialogue.index, turn_idx=last, text_id=turn.text_id,
        kind=turn.kind, input_ids=np.asarray(out_ids, np.int32), labels=np.asarray(out_labels, np.int32),
        videos=tuple(videos), video_starts=tuple(starts),
        target_index=turn.target_index if turn.kind == RETRIEVAL else None,
        gt_span=turn.gt_se if turn.kind == MOMENT else None,
        first_turn=first, dropped_turns=0, text=text, n_tok=n_tok)


def kind_code(kind: str) -> int:
    """0 chat, 1 retrieval, 2 moment."""
    return KINDS.index(kind)


__all__ = [
    "SYSTEM_MESSAGE", "IGNORE", "SampleError", "SampleTooLong", "SpanBeyondVideo", "SampleConfig", "VideoRequest",
    "SampleRef", "Sample",
    "group_name", "resolve_video", "enumerate_samples", "moment_number", "turn_videos", "prefix_videos",
    "user_text", "render", "build_sample", "build_prompt", "kind_code",
]
