"""Interactive video corpus retrieval in the browser.

    python -m ivcr_jax.app --config configs/paper.py:tiny --corpus DIR [--checkpoint CKPT] [--video FILE]
        [--host 127.0.0.1] [--port 7860] [--config.eval.max_new_tokens=64]
    python -m ivcr_jax.app --demo [--workdir runs/demo]    # after python -m ivcr_jax --workdir runs/demo

The same conversation as ``python -m ivcr_jax.chat`` (``ivcr_jax.conversation.ChatSession``: the
candidates, the turn kind decided by the model's answer, the current video carried from a retrieval
to its moments), on a page: the chat; for a retrieval turn the candidates as thumbnails with the chosen
one framed and playing; for a moment turn the video playing from the moment, the span shaded on its
timeline; each stage's latency under the answer; a reset button; an upload of a clip of your own.
Each browser session has its own conversation; they share the model.

``--demo`` runs on the demo's trained model: ``--config configs/demo.py``, ``--checkpoint
WORKDIR/train`` and ``--corpus WORKDIR/demo_corpus`` (the layout ``python -m ivcr_jax`` writes), each
unless given. The server binds to 127.0.0.1 unless ``--host`` says otherwise (``--host 0.0.0.0``
serves the network: there is no authentication). Needs gradio (``pip install 'ivcr_jax[app]'``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from ivcr_jax import cli
from ivcr_jax.cli import UsageError
from ivcr_jax.conversation import ChatError, ChatSession, Corpus, video_file
from ivcr_jax.data.frames import VideoError
from ivcr_jax.experiment import USER_ERRORS, Experiment

DEMO_CONFIG = "configs/demo.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ivcr_jax.app", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="corpus directory: ivcr.json + videos/ (+ videos.json); required without --demo")
    p.add_argument("--checkpoint", help="converted weights or a training workdir (default: config.init / random)")
    p.add_argument("--demo", action="store_true",
                   help="the demo's trained model and corpus under --workdir (after python -m ivcr_jax)")
    p.add_argument("--workdir", default="runs/demo", help="the demo's workdir, for --demo (default: runs/demo)")
    p.add_argument("--video", help="every conversation starts with this video file (your own clip) as the current video")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--mesh", action="store_true", help="shard the model over config.mesh")
    return p


class App:
    """The built page and where to serve it; :meth:`launch` serves it, :meth:`close` stops it."""

    def __init__(self, page, host: str, port: int, allowed_paths: list[str]):
        self.page, self.host, self.port, self.allowed_paths = page, host, port, allowed_paths
        self.url: str | None = None

    def launch(self, *, block: bool = True) -> str:
        kw = dict(server_name=self.host, server_port=self.port, allowed_paths=self.allowed_paths,
                  prevent_thread_lock=not block, show_error=False, ssr_mode=False)
        try:
            if not block:
                self.page.launch(**kw)
                self.url = self.page.local_url
                return self.url
            self.page.launch(**kw)   # serves until Ctrl-C
        except OSError as e:   # the port is taken, or the host is not an address of this machine
            raise UsageError(f"--host {self.host} --port {self.port}: cannot serve there ({e})") from None
        return self.url or ""

    def close(self) -> None:
        self.page.close()


def _demo_defaults(args) -> None:
    """``--demo``: the checkpoint and corpus of ``python -m ivcr_jax --workdir WORKDIR`` unless given."""
    work = Path(args.workdir)
    args.checkpoint = args.checkpoint or str(work / "train")
    args.corpus = args.corpus or str(work / "demo_corpus")
    for what, path in (("--checkpoint", args.checkpoint), ("--corpus", args.corpus)):
        if not Path(path).exists():
            raise UsageError(f"--demo: {what} {path} does not exist; run the demo first "
                             f"(python -m ivcr_jax --workdir {args.workdir}) or give {what}")


def build(argv: Sequence[str] | None = None, *, model=None, tokenizer=None) -> App:
    """The app of a command line, not yet serving: config, corpus, model, page (tests, notebooks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config, args = cli.parse(argv, build_parser(), default_config=DEMO_CONFIG if "--demo" in argv else None)
    exp = Experiment.resolve(config)
    if args.demo:
        _demo_defaults(args)
    if not args.corpus:
        raise UsageError("--corpus DIR is required (or --demo for the demo's corpus)")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0-65535, got {args.port}")
    try:
        corpus = Corpus(args.corpus)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    start_video = None
    if args.video:
        try:
            start_video = str(video_file(args.video))  # before the model is loaded: a typo should not cost minutes
        except VideoError as e:
            raise UsageError(f"--video: {e}") from None
    try:
        # Lazy: gradio (imported by ui) is an optional dependency; --help and the checks above work without it
        from ivcr_jax.app import ui
    except ImportError as e:
        raise UsageError(f"the app needs gradio ({e}): pip install 'ivcr_jax[app]'") from None
    mesh = exp.mesh() if args.mesh else None
    what = "model given by the caller"
    if model is None:
        t0 = time.perf_counter()
        model, what = exp.load_model(args.checkpoint, mesh)
        print(f"model ready in {time.perf_counter() - t0:.1f}s ({what})", flush=True)
    tokenizer = tokenizer or exp.tokenizer
    first = ChatSession(exp, model, tokenizer, corpus, mesh=mesh)
    if start_video:
        try:
            first.open(start_video, chosen_by="--video")   # decodes it: an undecodable clip is one line now
        except VideoError as e:
            raise UsageError(f"--video: {e}") from None
    sessions = iter([first])

    def make_session() -> ChatSession:   # one conversation per browser session, one generator for all
        return next(sessions, None) or ChatSession(exp, model, tokenizer, corpus, mesh=mesh, generator=first.gen)

    info = (f"corpus {corpus.root}: {len(corpus.video_ids)} videos, {len(corpus.annotated)} annotated questions "
            f"· model: {what}")
    page = ui.build_ui(make_session, info=cli.printable(info, newlines=False), start_video=start_video)
    allowed = [str(Path(corpus.video_root).resolve())] + ([str(Path(start_video).parent)] if start_video else [])
    return App(page, args.host, args.port, allowed)


def main(argv: Sequence[str] | None = None, *, model=None, tokenizer=None) -> int:
    """Command line entry point (``ivcr-app``). ``model`` / ``tokenizer`` may be passed in (tests)."""
    def body() -> int:
        build(argv, model=model, tokenizer=tokenizer).launch(block=True)
        return 0
    return cli.run(body, known=USER_ERRORS + (ChatError,))


if __name__ == "__main__":
    sys.exit(main())
