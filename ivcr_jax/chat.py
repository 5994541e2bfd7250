"""Interactive, multi-turn video corpus retrieval in the terminal.

    python -m ivcr_jax.chat --config configs/paper.py:tiny --corpus DIR [--checkpoint CKPT]
        [--index INDEX_DIR [--retriever-model XPOOL]] [--script FILE] [--json-out FILE]
        [--config.eval.max_new_tokens=64] [--config.eval.temperature=1.0 --config.eval.top_p=0.8]

The corpus directory holds ``ivcr.json`` (dialogues in the IVCR-200K schema) and ``videos/`` (the
layout of ``python -m ivcr_jax.data.demo``); ``videos.json`` (ids and descriptions) is optional.
Prompts are built exactly as for training and evaluation (``ivcr_jax.data.samples``,
reference-architecture §8.3), the history holds the model's own earlier answers, and the model is
run with the KV-cache generator (``ivcr_jax.models.generate``) as ``config.eval`` says (greedy by default).

Each user turn:

1. **Candidates** (the top 10 shown to the model): the annotated list when the question is one of
   the corpus JSON's questions (whitespace and case ignored); else a retriever
   (``ivcr_jax.retrieval.search.Retriever``) when ``--index`` is given; else a lexical fallback:
   videos ranked by how many of the question's words their ``videos.json`` description shares
   (ties, and corpora without descriptions, in sorted id order).
2. **The turn's kind is decided by the model's answer** (parsed with ``ivcr_jax.data.answers``), in at
   most two generations:

   * with no current video (first turn, or after a chat turn) the model sees the candidates
     (``Candidate videos : <VID> 1 </VID> …``). An answer whose intent is a moment (and which names no
     video) is asked again on the top-1 candidate as ``Current video : <VID> 1 </VID> …`` (how the
     dataset opens a dialogue with a moment query); a chat intent is asked again without videos;
   * with a current video (a video was chosen earlier) the model first sees that video as
     ``Current video : <VID> k </VID> …`` (k its number in the list it was chosen from). An answer
     whose intent is retrieval is asked again with the candidates; a chat intent without videos.

   The answer of the last generation is kept; its prompt's kind is the turn's kind in the history.
   "video N" in a retrieval answer chooses candidate N as the current video; a moment answer's span
   is parsed. An unparseable answer is kept as it is (nothing chosen, no span): never an error.
3. The answer is printed with the chosen video's id and path and the parsed moment.

``--script FILE`` reads one user line per line (blank lines and lines starting with ``#`` are
skipped) and prints the transcript; ``--json-out FILE`` writes every turn (prompts, answers, parsed
fields, timings) as JSON. Interactive commands: ``/reset`` clears the history, ``/quit`` (or EOF)
leaves.
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
from ivcr_jax.data.frames import VIDEO_EXTS
from ivcr_jax.data.prompts import PromptLoader, clean_answer
from ivcr_jax.data.schema import Dialogue, Turn
from ivcr_jax.experiment import Experiment
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
            dialogues, _ = schema.load_dialogues(ann, exclude_types=(), num_candidates=None)
            for d in dialogues:
                for t in d.turns:
                    if t.candidate_videos:
                        self.annotated.setdefault(_norm_question(t.question), list(t.candidate_videos))
        self.descriptions: dict[str, str] = {}
        listing = self.root / "videos.json"
        if listing.is_file():
            for item in json.loads(listing.read_text(encoding="utf-8")):
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

@dataclasses.dataclass
class _Current:
    video_id: str
    number: int  # its "<VID> k </VID>" number


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
        self.current: _Current | None = None

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
        return {"kind": turn.kind, "turn": turn, "prompt": p.sample.text, "prompt_tokens": int(g.prompt_lengths[0]),
                "history_turns_dropped": int(p.sample.dropped_turns), "answer": g.texts(self.tokenizer)[0],
                "new_tokens": int(g.lengths[0]), "prefill_s": g.encode_s + g.prefill_s, "decode_s": g.decode_s,
                "compile_s": g.compile_s}

    # -------------------------------------------------------------- one user turn
    def ask(self, question: str) -> dict:
        """Run one user turn; returns its record (also appended to the history)."""
        question = question.strip()
        cands, source, t_ret = self.corpus.candidates(question, self.retriever)

        def retrieval():
            return self._generate(self._turn(question, "retrieval", candidates=cands))

        def moment(cur: _Current):
            return self._generate(self._turn(question, "moment", video_id=cur.video_id, number=cur.number))

        def chat():
            return self._generate(self._turn(question, "chat"))

        passes = []
        if self.current is None:
            passes.append(retrieval())
            intent = parse_intent(passes[-1]["answer"])
            if intent == "moment" and parse_video_index(passes[-1]["answer"]) is None and cands:
                passes.append(moment(_Current(cands[0], 1)))
            elif intent == "chat":
                passes.append(chat())
        else:
            passes.append(moment(self.current))
            intent = parse_intent(passes[-1]["answer"])
            if intent == "retrieval":
                passes.append(retrieval())
            elif intent == "chat":
                passes.append(chat())
        final = passes[-1]
        answer, kind, turn = final["answer"], final["kind"], final["turn"]
        rec: dict[str, Any] = {"turn": len(self.history) + 1, "question": question, "kind": kind,
                               "answer": answer, "intent": parse_intent(answer), "candidates": list(cands),
                               "candidate_source": source, "video_index": None, "video_id": None,
                               "video_path": None, "moment": None}
        if kind == "retrieval":
            n = parse_video_index(answer)
            rec["video_index"] = n
            if n is not None and n <= len(cands):
                self.current = _Current(cands[n - 1], n)
        elif kind == "moment":
            cur = _Current(turn.video_id, turn.answer_video)
            self.current = cur
            rec["video_index"] = cur.number
            span = parse_moment(answer)
            rec["moment"] = list(span) if span is not None else None
        else:
            self.current = None
        if kind != "chat" and self.current is not None:
            rec["video_id"] = self.current.video_id
            rec["video_path"] = str(self.corpus.path(self.current.video_id))
        rec["prompt"] = final["prompt"]
        rec["passes"] = [{k: v for k, v in p.items() if k != "turn"} for p in passes]
        rec["timings"] = {"retrieval": t_ret, "prefill": sum(p["prefill_s"] for p in passes),
                          "decode": sum(p["decode_s"] for p in passes),
                          "compile": sum(p["compile_s"] for p in passes)}
        self.history.append(dataclasses.replace(turn, answer=clean_answer(answer, self.tokenizer)))
        return rec


# ------------------------------------------------------------------------------ printing ---

def format_turn(rec: dict) -> str:
    lines = [f"[turn {rec['turn']}] you: {rec['question']}"]
    if rec.get("error"):
        return "\n".join(lines + [f"  error: {rec['error']}"])
    lines.append(f"  assistant: {rec['answer']}")
    kinds = " -> ".join(p["kind"] for p in rec["passes"])
    lines.append(f"  turn kind: {rec['kind']} (prompts: {kinds}; parsed intent: {rec['intent']})")
    if rec["kind"] == "retrieval":
        lines.append(f"  candidates ({rec['candidate_source']}): "
                     + ", ".join(f"{i + 1}={c}" for i, c in enumerate(rec["candidates"])))
    if rec["video_id"] is not None:
        lines.append(f"  video {rec['video_index']}: {rec['video_id']} ({rec['video_path']})")
    elif rec["kind"] == "retrieval":
        lines.append("  video: none (no 'video N' in the answer)")
    if rec["kind"] == "moment":
        m = rec["moment"]
        lines.append(f"  moment: {m[0]:.1f} - {m[1]:.1f} s" if m else "  moment: none (no time span in the answer)")
    t = rec["timings"]
    lines.append(f"  time: retrieval {t['retrieval']:.3f}s, prefill {t['prefill']:.3f}s, decode {t['decode']:.3f}s"
                 + (f" (+ compile {t['compile']:.1f}s)" if t["compile"] else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line ---

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ivcr_jax.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="corpus directory: ivcr.json + videos/ (+ videos.json)")
    p.add_argument("--checkpoint", help="converted weights or a training workdir (default: config.init / random)")
    p.add_argument("--script", help="read user lines from this file instead of the terminal")
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
        print(f"warning: cannot load the retriever index {args.index} ({e}); using the lexical fallback",
              file=sys.stderr)
        return None


def _lines(args):
    if args.script:
        for line in Path(args.script).read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                yield line.strip()
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
    return cli.run(lambda: _main(argv, model, tokenizer))


def _main(argv, model, tokenizer) -> int:
    config, args = cli.parse(argv, build_parser())
    exp = Experiment.resolve(config)
    try:
        corpus = Corpus(args.corpus)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if args.script and not Path(args.script).is_file():
        raise UsageError(f"--script {args.script}: no such file")
    mesh = exp.mesh() if args.mesh else None
    if model is None:
        t0 = time.perf_counter()
        model, what = exp.load_model(args.checkpoint, mesh)
        print(f"model ready in {time.perf_counter() - t0:.1f}s ({what})")
    session = ChatSession(exp, model, tokenizer or exp.tokenizer, corpus, retriever=_retriever(args), mesh=mesh)
    print(f"corpus {corpus.root}: {len(corpus.video_ids)} videos, {len(corpus.annotated)} annotated questions"
          + ("" if args.script else "; /reset clears the history, /quit leaves"))
    records = []
    for line in _lines(args):
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            print("(history cleared)")
            continue
        try:
            rec = session.ask(line)
        except Exception as e:  # noqa: BLE001 - a bad line (e.g. an undecodable video) must not end the chat
            rec = {"turn": len(session.history) + 1, "question": line, "error": f"{type(e).__name__}: {e}"}
        records.append(rec)
        print(format_turn(rec), flush=True)
    if args.json_out:
        out = {"config": args.config, "corpus": str(corpus.root), "checkpoint": args.checkpoint, "turns": records}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
        print(f"transcript: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
