"""One conversation with the model over a video corpus: the session behind every interactive front end.

The terminal chat (``python -m ivcr_jax.chat``, whose docstring describes a turn in full) and the
browser app (``python -m ivcr_jax.app``) are siblings that both drive a :class:`ChatSession`: the
candidates of a question (:class:`Corpus`: annotated lists, a retriever, or a lexical fallback), the
turn's kind decided by the model's answer (:func:`answer_kind`, at most two generations), the current
video carried from a retrieval to its moments (:class:`CurrentVideo`), and a user's own clip
(:meth:`ChatSession.open`). Prompts are built exactly as for training and evaluation
(``ivcr_jax.data.prompts``); generation is the KV-cache generator (``ivcr_jax.models.generate``).
"""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import jax

from ivcr_jax.cli import UsageError
from ivcr_jax.data import schema
from ivcr_jax.data.answers import parse_intent, parse_moment, parse_video_index
from ivcr_jax.data.frames import VIDEO_EXTS, VideoError, load_frames
from ivcr_jax.data.prompts import PromptLoader, clean_answer
from ivcr_jax.data.schema import Dialogue, Turn
from ivcr_jax.experiment import Experiment
from ivcr_jax.models.generate import Generator
from ivcr_jax.tokenizer import SPECIAL_TOKENS

NUM_CANDIDATES = 10
_WORD = re.compile(r"[a-z0-9]+|[\u4e00-\u9fff]")
_STOP = frozenset("a an the of in on at to is are was were be it this that where when what which who how "
                  "video videos clip clips show shows find me i want with and or for from does do there one".split())


def _norm_question(q: str) -> str:
    return " ".join(q.lower().split())


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def _naming(path: Path, e: Exception) -> str:
    """``e``'s message, prefixed with ``path`` unless it names it already."""
    msg = str(e)
    return msg if str(path) in msg else f"{path}: {msg}"


# ------------------------------------------------------------------------------ the corpus ---

class Corpus:
    """A corpus directory: annotated candidate lists, the video list and descriptions.

    ``ivcr.json`` is read by ``data/schema.py`` (every split and type, any number of candidates);
    the video root follows the one rule of ``schema.resolve_video_root``.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: corpus directory not found")
        ann = self.root / "ivcr.json"
        self.video_root = Path(schema.resolve_video_root(ann))
        self.annotated: dict[str, list[str]] = {}
        if ann.is_file():
            try:
                dialogues, _ = schema.load_dialogues(ann, exclude_types=(), num_candidates=None)
            except (ValueError, OSError) as e:  # not UTF-8, not JSON, not a list: name the file
                raise UsageError(_naming(ann, e)) from None
            for d in dialogues:
                for t in d.turns:
                    if t.candidate_videos:
                        self.annotated.setdefault(_norm_question(t.question), list(t.candidate_videos))
        self.descriptions: dict[str, str] = {}
        listing = self.root / "videos.json"
        if listing.is_file():
            try:
                items = schema.read_json_list(listing, "videos (ids, or {video_id, description} objects)")
            except (ValueError, OSError) as e:
                raise UsageError(_naming(listing, e)) from None
            for item in items:
                if isinstance(item, dict) and item.get("video_id"):
                    self.descriptions[str(item["video_id"])] = str(item.get("description", ""))
                elif isinstance(item, str):
                    self.descriptions[item] = ""
        if not self.descriptions:
            for p in sorted(self.video_root.rglob("*")):
                if p.is_file() and p.suffix.lower() in VIDEO_EXTS:
                    self.descriptions[p.relative_to(self.video_root).as_posix()] = ""
        self.video_ids = sorted(self.descriptions)
        if not self.video_ids:
            raise FileNotFoundError(f"{self.root}: no videos (no videos.json and no video files under {self.video_root})")

    def path(self, video_id: str) -> Path:
        return self.video_root / video_id

    def lexical(self, question: str, k: int = NUM_CANDIDATES) -> list[str]:
        q = _words(question)
        scored = sorted(self.video_ids, key=lambda v: (-len(q & _words(self.descriptions[v])), v))
        return scored[:k]

    def candidates(self, question: str, retriever=None, k: int = NUM_CANDIDATES) -> tuple[list[str], str, float]:
        """``(top-k ids, where they came from, retrieval seconds)``."""
        t0 = time.perf_counter()
        hit = self.annotated.get(_norm_question(question))
        if hit:
            return hit[:k], "annotations", time.perf_counter() - t0
        if retriever is not None:
            ids, _ = retriever.search([question], k)
            return [str(v) for v in ids[0]], "retriever", time.perf_counter() - t0
        return self.lexical(question, k), "lexical", time.perf_counter() - t0


# ------------------------------------------------------------------------------ the session ---

class ChatError(ValueError):
    """A command that cannot be done (no candidate list, a number out of range): one line to the user."""


@dataclasses.dataclass(frozen=True)
class CurrentVideo:
    """The video the conversation is about, and why."""

    video_id: str  # corpus id, or the absolute path of an opened file
    path: str
    number: int  # its "<VID> k </VID>" number: its place in the list it was chosen from (1 if opened)
    chosen_by: str  # "model" | "/video" | "/open" | "--video"
    after_turn: int  # turns done when it became current (the choosing turn's own number for "model")

    def record(self) -> dict:
        return dataclasses.asdict(self)


def answer_kind(answer: str, current_number: int | None = None) -> str:
    """What an answer asks for: ``"retrieval"``, ``"moment"`` or ``"chat"``.

    Its intent (``answers.parse_intent``), with two readings of the dataset's answers added: one
    without a time span that names a video (other than ``current_number``, the video shown) asks for
    that video, whatever its wording (type-4 follow-ups: "The intent of this query is to find another
    video with a similar moment. Video 4 also shows …", read as a moment intent); one that declares
    no intent and has no span is chat (the dataset's chat answers carry no intent sentence; an
    intent-less answer naming a video is already read as retrieval).
    """
    intent = parse_intent(answer)
    if parse_moment(answer) is None:
        n = parse_video_index(answer)
        if intent == "moment" and n is not None and n != current_number:
            return "retrieval"
        if intent is None:
            return "chat"
    return intent or "moment"


def special_tokens_in(text: str, tokenizer=None) -> list[str]:
    """The strings of the prompt template's special tokens (``<s>``, ``</s>``, ``<VIDEOTOKEN>``, ``<VID>``
    ...) that occur in ``text``: a question holding one would be read as those ids, not as words."""
    specials = set(SPECIAL_TOKENS) | {"<s>", "</s>", "<unk>"}
    if tokenizer is not None:
        specials |= {t for t in getattr(tokenizer, "all_special_tokens", ()) if t}
    return sorted(t for t in specials if t in text)


def video_file(file: str | Path) -> Path:
    """The absolute path of a user's video file; ``VideoError`` naming it when it is missing or its
    suffix is not one of ``VIDEO_EXTS`` (decoding is left to the caller)."""
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    if path.suffix.lower() not in VIDEO_EXTS:
        raise VideoError(f"{path}: not a video file (expected one of {', '.join(VIDEO_EXTS)})")
    return path


class ChatSession:
    """One conversation: the history of turns (as shown to the model) and the current video."""

    def __init__(self, exp: Experiment, model, tokenizer, corpus: Corpus, *, retriever=None, mesh=None,
                 generator: Generator | None = None):
        """``generator``: share one :class:`Generator` (and its compiled programs) between sessions,
        as the browser app does for its users; by default the session makes its own."""
        ec = exp.eval
        self.tokenizer, self.corpus, self.retriever = tokenizer, corpus, retriever
        self.pcfg = exp.pipeline(1, video_root=str(corpus.video_root))
        self.loader = PromptLoader(self.pcfg, tokenizer, video_slots=ec.video_slots)
        self.gen = generator or Generator(model, max_new_tokens=int(ec.max_new_tokens), buckets=self.pcfg.buckets,
                                          mesh=mesh)
        self.temperature, self.top_p = float(ec.temperature), float(ec.top_p)
        self.key = jax.random.key(exp.seed)
        self.n_generations = 0
        self.reset()

    def reset(self) -> None:
        self.history: list = []  # schema.Turn, answers = the model's (cleaned)
        self.current: CurrentVideo | None = None
        self.shown: list[str] = []  # the last candidate list shown (what /video N picks from)

    # -------------------------------------------------------------- choosing the current video
    def _choose(self, video_id: str, number: int, chosen_by: str, after_turn: int | None = None) -> CurrentVideo:
        after = len(self.history) if after_turn is None else after_turn
        self.current = CurrentVideo(video_id, str(self.corpus.path(video_id)), number, chosen_by, after)
        return self.current

    def pick(self, n: int) -> CurrentVideo:
        """``/video N``: candidate ``n`` (1-based) of the last candidate list shown."""
        if not self.shown:
            raise ChatError(f"/video {n}: no candidate list yet (ask for a video first)")
        if not 1 <= n <= len(self.shown):
            raise ChatError(f"/video {n}: the last candidate list has {len(self.shown)} videos (1-{len(self.shown)})")
        return self._choose(self.shown[n - 1], n, "/video")

    def open(self, file: str | Path, chosen_by: str = "/open") -> CurrentVideo:
        """``/open FILE``: a clip of the user's own as the current video ("video 1"), not added to the
        corpus. Raises ``VideoError`` naming the file when it is missing, not a video or undecodable."""
        path = video_file(file)
        load_frames(path, 1, size=self.pcfg.frame_size)  # decodes now, so a bad file fails here, not mid-turn
        return self._choose(str(path), 1, chosen_by)  # an absolute id: samples.resolve_video keeps it

    # -------------------------------------------------------------- prompts
    def _turn(self, question: str, kind: str, *, candidates=(), video_id=None, number=None):
        i = len(self.history)
        return Turn(index=i, text_id=f"chat-{i + 1}", question=question, answer="", kind=kind,
                    video_id=video_id, candidate_videos=tuple(candidates), gt_se=None, target_index=None,
                    answer_video=number)

    def _generate(self, turn) -> dict:
        d = Dialogue(index=0, id="chat", split="chat", types=(), turns=tuple(self.history) + (turn,))
        p = self.loader.prompt(d, turn.index)
        batch = self.loader.batch([p])
        key = jax.random.fold_in(self.key, self.n_generations)
        self.n_generations += 1
        g = self.gen(batch, temperature=self.temperature, top_p=self.top_p, key=key)
        return {"kind": turn.kind, "turn": turn, "video_id": turn.video_id, "prompt": p.sample.text,
                "prompt_tokens": int(g.prompt_lengths[0]), "history_turns_dropped": int(p.sample.dropped_turns),
                "answer": g.texts(self.tokenizer)[0], "new_tokens": int(g.lengths[0]),
                "prefill_s": g.encode_s + g.prefill_s, "decode_s": g.decode_s, "compile_s": g.compile_s}

    # -------------------------------------------------------------- one user turn
    def ask(self, question: str) -> dict:
        """Run one user turn; returns its record (also appended to the history)."""
        question = question.strip()
        bad = special_tokens_in(question, self.tokenizer)
        if bad:
            raise ChatError(f"the question contains {', '.join(bad)}: special tokens of the model's prompt template "
                            f"are not allowed in a question; remove them")
        cands, source, t_ret = self.corpus.candidates(question, self.retriever)

        def retrieval():
            return self._generate(self._turn(question, "retrieval", candidates=cands))

        def moment(video_id: str, number: int):
            return self._generate(self._turn(question, "moment", video_id=video_id, number=number))

        def chat():
            return self._generate(self._turn(question, "chat"))

        cur = self.current
        passes = [moment(cur.video_id, cur.number) if cur is not None else retrieval()]
        answer = passes[0]["answer"]
        wants = answer_kind(answer, cur.number if cur is not None else None)
        if wants == "chat":
            passes.append(chat())
        elif wants == "retrieval" and cur is not None:
            passes.append(retrieval())
        elif wants == "moment" and cur is None and cands:
            n = parse_video_index(answer) or 1  # "locate a moment in video 1": the dataset's top-1
            n = n if n <= len(cands) else 1
            passes.append(moment(cands[n - 1], n))
        shown = any(p["kind"] == "retrieval" for p in passes)
        if shown:
            self.shown = list(cands)
        final = passes[-1]
        answer, kind, turn = final["answer"], final["kind"], final["turn"]
        number = len(self.history) + 1
        rec: dict[str, Any] = {"turn": number, "question": question, "kind": kind, "answer": answer,
                               "intent": parse_intent(answer), "candidates": list(cands),
                               "candidate_source": source, "candidates_shown": shown,
                               "video_index": None, "video_id": None, "video_path": None, "moment": None}
        video = None  # the turn's video: the candidate it chose, or the video it located a moment in
        if kind == "retrieval":
            n = parse_video_index(answer)
            rec["video_index"] = n
            if n is not None and n <= len(cands):
                video = self._choose(cands[n - 1], n, "model", number)
        elif kind == "moment":
            if self.current is None or self.current.video_id != turn.video_id:
                self._choose(turn.video_id, turn.answer_video, "model", number)
            video = self.current
            span = parse_moment(answer)
            rec["moment"] = list(span) if span is not None else None
        if video is not None:
            rec["video_index"], rec["video_id"], rec["video_path"] = video.number, video.video_id, video.path
        rec["current_video"] = self.current.record() if self.current is not None else None
        rec["prompt"] = final["prompt"]
        rec["passes"] = [{k: v for k, v in p.items() if k != "turn"} for p in passes]
        rec["timings"] = {"retrieval": t_ret, "prefill": sum(p["prefill_s"] for p in passes),
                          "decode": sum(p["decode_s"] for p in passes),
                          "compile": sum(p["compile_s"] for p in passes)}
        self.history.append(dataclasses.replace(turn, answer=clean_answer(answer, self.tokenizer)))
        return rec



def describe_current(cur: CurrentVideo | None) -> str:
    if cur is None:
        return "none"
    how = {"model": f"chosen by the model in turn {cur.after_turn}", "/video": "picked with /video",
           "/open": "opened with /open", "--video": "opened with --video"}[cur.chosen_by]
    return f"video {cur.number}: {cur.video_id}, {how}"  # an opened file's id is its path
