"""Interactive, multi-turn video corpus retrieval in the terminal.

    python -m ivcr_jax.chat --config configs/paper.py:tiny --corpus DIR [--checkpoint CKPT]
        [--video FILE] [--index INDEX_DIR [--retriever-model XPOOL]] [--script FILE] [--json-out FILE]
        [--config.eval.max_new_tokens=64] [--config.eval.temperature=1.0 --config.eval.top_p=0.8]

The corpus directory holds ``ivcr.json`` (dialogues in the IVCR-200K schema) and ``videos/`` (the
layout of ``python -m ivcr_jax.data.demo``); ``videos.json`` (ids and descriptions) is optional.
Prompts are built exactly as for training and evaluation (``ivcr_jax.data.samples``,
reference-architecture §8.3), the history holds the model's own earlier answers, and the model is
run with the KV-cache generator (``ivcr_jax.models.generate``) as ``config.eval`` says (greedy by default).

A conversation moves through the dialogues the model is trained on (``ivcr_jax.data.demo``,
paper Figure 8): a retrieval question picks a video from the candidates, "when does X happen in it"
locates the moment inside *that* video, and a follow-up keeps working with it (another moment, or a
similar video from a new candidate list). The **current video** carries this: it is set by the
model ("video N" of a retrieval answer: candidate N), by ``/video N`` or by ``/open FILE``, and it
stays through moment and chat turns (as ``samples.moment_number`` keeps a retrieval's target across
them) until another video is chosen or ``/reset``.

Each user turn:

1. **Candidates** (the top 10 shown to the model): the annotated list when the question is one of
   the corpus JSON's questions (whitespace and case ignored); else a retriever
   (``ivcr_jax.retrieval.search.Retriever``) when ``--index`` is given; else a lexical fallback:
   videos ranked by how many of the question's words their ``videos.json`` description shares
   (ties, and corpora without descriptions, in sorted id order).
2. **The turn's kind is decided by the model's answer** (``answer_kind``: the intent parsed with
   ``ivcr_jax.data.answers``), in at most two generations:

   * with no current video the model sees the candidates (``Candidate videos : <VID> 1 </VID> …``).
     An answer asking for a moment is asked again as ``Current video : <VID> n </VID> …`` on
     candidate n, n the answer's "video n" or else 1 (the dataset opens a dialogue with a moment
     query on the top-1 as "video 1");
   * with a current video the model first sees that video as ``Current video : <VID> k </VID> …``
     (k its number in the list it was chosen from; 1 for an opened file). An answer asking for a
     video is asked again with the candidates: a retrieval intent, or an answer without a time span
     naming a video other than video k (the dataset's "find another video with a similar moment.
     Video 4 also shows …", whose intent sentence ``parse_intent`` reads as a moment);
   * in both, an answer asking for chat (a chat intent, or no intent and no span, as the dataset's
     chat answers) is asked again without videos.

   The answer of the last generation is kept; its prompt's kind is the turn's kind in the history.
   "video N" in a retrieval answer makes candidate N the current video; a moment answer's span is
   parsed. An unparseable answer is kept as it is (nothing chosen, no span): never an error.
3. The answer is printed with the turn's video, the parsed moment and the current video.

Commands (interactive or in a ``--script`` file): ``/video N`` makes candidate N of the last
candidate list shown the current video; ``/open FILE`` (or ``--video FILE`` at the start) makes a
clip of your own the current video, not part of the corpus (any suffix of
``ivcr_jax.data.frames.VIDEO_EXTS``): questions then go to the moment prompt on it; ``/reset``
clears the history and the current video; ``/help`` lists the commands; ``/quit`` (or EOF) leaves.
A command that cannot be done says why in one line and changes nothing.

``--script FILE`` reads one user line per line (blank lines and lines starting with ``#`` are
skipped) and prints the transcript; ``--json-out FILE`` writes every turn (prompts, answers, parsed
fields, the current video and who chose it, timings) and every command as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax

from ivcr_jax import cli
from ivcr_jax.cli import UsageError
from ivcr_jax.data import schema
from ivcr_jax.data.answers import parse_intent, parse_moment, parse_video_index
from ivcr_jax.data.frames import VIDEO_EXTS, VideoError, load_frames
from ivcr_jax.data.prompts import PromptLoader, clean_answer
from ivcr_jax.data.schema import Dialogue, Turn
from ivcr_jax.experiment import USER_ERRORS, Experiment
from ivcr_jax.models.generate import Generator
from ivcr_jax.retrieval.search import Retriever

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

    def __init__(self, exp: Experiment, model, tokenizer, corpus: Corpus, *, retriever=None, mesh=None):
        ec = exp.eval
        self.tokenizer, self.corpus, self.retriever = tokenizer, corpus, retriever
        self.pcfg = exp.pipeline(1, video_root=str(corpus.video_root))
        self.loader = PromptLoader(self.pcfg, tokenizer, video_slots=ec.video_slots)
        self.gen = Generator(model, max_new_tokens=int(ec.max_new_tokens), buckets=self.pcfg.buckets, mesh=mesh)
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


# ------------------------------------------------------------------------------ printing ---

def describe_current(cur: CurrentVideo | None) -> str:
    if cur is None:
        return "none"
    how = {"model": f"chosen by the model in turn {cur.after_turn}", "/video": "picked with /video",
           "/open": "opened with /open", "--video": "opened with --video"}[cur.chosen_by]
    return f"video {cur.number}: {cur.video_id}, {how}"  # an opened file's id is its path


def format_turn(rec: dict) -> str:
    """The turn as printed; control characters of the question, the answer and the corpus's ids
    are escaped (``cli.printable``): a terminal escape code in the data is shown, not obeyed."""
    return cli.printable(_format_turn(rec))


def _format_turn(rec: dict) -> str:
    lines = [f"[turn {rec['turn']}] you: {rec['question']}"]
    if rec.get("error"):
        return "\n".join(lines + [f"  error: {rec['error']}"])
    lines.append(f"  assistant: {rec['answer']}")
    kinds = " -> ".join(p["kind"] for p in rec["passes"])
    lines.append(f"  turn kind: {rec['kind']} (prompts: {kinds}; parsed intent: {rec['intent']})")
    if rec["candidates_shown"]:
        lines.append(f"  candidates ({rec['candidate_source']}): "
                     + ", ".join(f"{i + 1}={c}" for i, c in enumerate(rec["candidates"])))
    if rec["video_id"] is not None:
        lines.append(f"  video {rec['video_index']}: {rec['video_id']} ({rec['video_path']})")
    elif rec["kind"] == "retrieval":
        lines.append("  video: none (no 'video N' of the list in the answer)")
    if rec["kind"] == "moment":
        m = rec["moment"]
        lines.append(f"  moment: {m[0]:.1f} - {m[1]:.1f} s" if m else "  moment: none (no time span in the answer)")
    cur = rec["current_video"]
    lines.append(f"  current video: {describe_current(CurrentVideo(**cur) if cur else None)}")
    t = rec["timings"]
    lines.append(f"  time: retrieval {t['retrieval']:.3f}s, prefill {t['prefill']:.3f}s, decode {t['decode']:.3f}s"
                 + (f" (+ compile {t['compile']:.1f}s)" if t["compile"] else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ commands ---

HELP = """commands:
  /video N    make candidate N of the last candidate list the current video
  /open FILE  chat about a clip of your own: FILE becomes the current video (not added to the corpus)
  /reset      clear the history and the current video
  /help       this list
  /quit       leave (also /exit, or end of input)
anything else is a question to the model"""


def run_command(session: ChatSession, line: str) -> dict:
    """A ``/`` line other than ``/quit``: ``{"command", "before_turn", "message"}`` plus ``"error"``
    (one line; nothing changed) or ``"current_video"``."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    rec: dict[str, Any] = {"command": line, "before_turn": len(session.history) + 1}
    try:
        if name == "/help":
            rec["message"] = HELP
            return rec
        if name == "/reset":
            session.reset()
            rec["message"] = "(history and current video cleared)"
        elif name == "/video":
            if not arg.isdigit():
                raise ChatError(f"{line}: give the number of a candidate, e.g. /video 3")
            session.pick(int(arg))
        elif name == "/open":
            if not arg:
                raise ChatError("/open: give a video file, e.g. /open clip.mp4")
            session.open(arg)
        else:
            raise ChatError(f"{name}: no such command (/help lists them)")
    except (ChatError, VideoError) as e:
        rec["error"] = str(e)
        rec["message"] = f"error: {e}"
        return rec
    rec["current_video"] = session.current.record() if session.current is not None else None
    rec.setdefault("message", f"(current video: {describe_current(session.current)})")
    return rec


# ------------------------------------------------------------------------------ command line ---

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ivcr_jax.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="corpus directory: ivcr.json + videos/ (+ videos.json)")
    p.add_argument("--checkpoint", help="converted weights or a training workdir (default: config.init / random)")
    p.add_argument("--video", help="start with this video file (your own clip) as the current video, as /open")
    p.add_argument("--script", help="read user lines (questions and /commands) from this file instead of the terminal")
    p.add_argument("--json-out", help="write the transcript as JSON to this file")
    p.add_argument("--index", help="retriever index directory (ivcr_jax.retrieval) for unannotated questions")
    p.add_argument("--retriever-model", help="exported X-Pool for --index")
    p.add_argument("--mesh", action="store_true", help="shard the model over config.mesh")
    return p


def _retriever(args):
    if not args.index:
        return None
    try:
        return Retriever.load(args.index, args.retriever_model)
    except Exception as e:  # noqa: BLE001 - a broken index must not end the chat before it starts
        print(cli.printable(f"warning: cannot load the retriever index {args.index} ({e}); using the lexical "
                            f"fallback"), file=sys.stderr)
        return None


def read_script(path: str | Path) -> list[str]:
    """The user lines of a ``--script`` file (blank and ``#`` lines skipped); a missing file, a
    directory or bytes that are not UTF-8 are a :class:`UsageError` naming the file and where."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"--script {path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UsageError(f"--script {path}: not valid UTF-8 at byte offset {e.start} (line {line}: "
                         f"0x{raw[e.start]:02x}); save the file as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _lines(args, script: list[str] | None):
    if script is not None:
        yield from script
        return
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return
        if line.strip():
            yield line.strip()


def main(argv: Sequence[str] | None = None, *, model=None, tokenizer=None) -> int:
    """Command line entry point. ``model`` / ``tokenizer`` may be passed in (notebooks, tests)."""
    return cli.run(lambda: _main(argv, model, tokenizer), known=USER_ERRORS + (ChatError,))


def _main(argv, model, tokenizer) -> int:
    config, args = cli.parse(argv, build_parser())
    exp = Experiment.resolve(config)
    try:
        corpus = Corpus(args.corpus)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if args.script and not Path(args.script).is_file():
        raise UsageError(f"--script {args.script}: no such file")
    script = read_script(args.script) if args.script else None  # before the model: a bad file costs nothing
    if args.json_out and Path(args.json_out).is_dir():
        raise UsageError(f"--json-out {args.json_out}: is a directory; give a file name")
    if args.json_out:   # before the conversation, so a transcript is never lost at the end
        cli.output_dir(Path(args.json_out).absolute().parent, f"--json-out {args.json_out}: its directory")
    if args.video:
        try:
            video_file(args.video)  # before the model is loaded: a typo should not cost minutes
        except VideoError as e:
            raise UsageError(f"--video: {e}") from None
    mesh = exp.mesh() if args.mesh else None
    if model is None:
        t0 = time.perf_counter()
        model, what = exp.load_model(args.checkpoint, mesh)
        print(f"model ready in {time.perf_counter() - t0:.1f}s ({what})")
    session = ChatSession(exp, model, tokenizer or exp.tokenizer, corpus, retriever=_retriever(args), mesh=mesh)
    commands = []
    if args.video:
        try:
            session.open(args.video, chosen_by="--video")
        except VideoError as e:
            raise UsageError(f"--video: {e}") from None
        commands.append({"command": f"--video {args.video}", "before_turn": 1,
                         "current_video": session.current.record()})
    print(cli.printable(f"corpus {corpus.root}: {len(corpus.video_ids)} videos, {len(corpus.annotated)} "
                        f"annotated questions" + ("" if args.script else "; /help lists the commands")))
    if session.current is not None:
        print(cli.printable(f"(current video: {describe_current(session.current)})"))
    records = []
    for line in _lines(args, script):
        if line.split(" ", 1)[0] in ("/quit", "/exit"):
            break
        if line.startswith("/"):
            cmd = run_command(session, line)
            commands.append({k: v for k, v in cmd.items() if k != "message"})
            print(cli.printable(cmd["message"]), flush=True)
            continue
        try:
            rec = session.ask(line)
        except Exception as e:  # noqa: BLE001 - a bad line (e.g. an undecodable video) must not end the chat
            rec = {"turn": len(session.history) + 1, "question": line, "error": f"{type(e).__name__}: {e}"}
        records.append(rec)
        print(format_turn(rec), flush=True)
    if args.json_out:
        out = {"config": args.config, "corpus": str(corpus.root), "checkpoint": args.checkpoint, "turns": records,
               "commands": commands}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
        print(f"transcript: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
