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

The session (the corpus, the turn, the current video) is ``ivcr_jax.conversation``, shared with the
browser app ``python -m ivcr_jax.app``; this file is the terminal around it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ivcr_jax import cli
from ivcr_jax.cli import UsageError
from ivcr_jax.conversation import (  # noqa: F401 - answer_kind, Corpus ...: the chat's names, kept importable here
    NUM_CANDIDATES, ChatError, ChatSession, Corpus, CurrentVideo, answer_kind, describe_current, video_file)
from ivcr_jax.data.frames import VideoError
from ivcr_jax.experiment import USER_ERRORS, Experiment
from ivcr_jax.retrieval.search import Retriever

# ------------------------------------------------------------------------------ printing ---

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
