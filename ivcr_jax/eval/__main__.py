"""Command line: score a predictions file against the IVCR-200K annotations, or run a model.

    python -m ivcr_jax.eval --annotations IVCR-200K.json --split test --lang en \\
        --predictions predictions.jsonl --out eval_out/

The predictions file is JSONL, one ``{"text_id": ..., "answer": ...}`` per line (``"prediction"``
is accepted for ``"answer"``; an optional ``"timings": {"retrieval": s, "prefill": s, "decode": s}``
feeds the latency table). Any system's outputs can be scored this way, the PyTorch original's
included. A malformed line stops the run with an error naming the line number; ``--skip-bad-lines``
skips such lines and reports how many. Writes ``metrics.json``, ``turn_scores.jsonl``, ``report.md``
and PNG charts under ``--out`` and prints the metrics table.

Without ``--predictions`` the model-driven mode (``--config``, ``--checkpoint``) is delegated to
``ivcr_jax.eval.run_model.main(args)``: it generates the answers of every test turn, writes
``predictions.jsonl`` (with per-stage timings) under ``--out`` and scores it the same way::

    python -m ivcr_jax.eval --config configs/paper.py:tiny --checkpoint WORKDIR_OR_CONVERTED_DIR \\
        --annotations corpus/ivcr.json [--split test] [--history teacher|model] [--max-samples N]
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ivcr_jax.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", help="IVCR-200K dialogue JSON (model mode: default config.data.annotations)")
    p.add_argument("--split", default="test", help="split to score (default: test)")
    p.add_argument("--lang", default="en", choices=("en", "zh"), help="answer language; selects the BLEU tokenizer")
    p.add_argument("--predictions", help="predictions JSONL; without it a model is run (see --config)")
    p.add_argument("--out", help="output directory for metrics.json, report.md and charts (model mode: default "
                                "<workdir>/eval_<split> or ./eval_<split>)")
    p.add_argument("--match", default="text_id", choices=("text_id", "question"),
                   help="match predictions to turns by text_id (default) or by the exact user question "
                        "(the reference's matching)")
    p.add_argument("--history", default="teacher", choices=("teacher", "model"),
                   help="how the predictions were produced: ground-truth history or the model's own (recorded)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed predictions lines (counted in metrics.json) instead of failing")
    p.add_argument("--max-turn", type=int, default=7, help="last per-turn row collects turns >= this (default 7)")
    p.add_argument("--no-charts", action="store_true", help="do not write PNG charts")
    # --- model-driven mode (implemented in ivcr_jax.eval.run_model) ---
    p.add_argument("--config", help="[model mode] experiment config, e.g. configs/paper.py:tiny")
    p.add_argument("--checkpoint", help="[model mode] checkpoint directory to evaluate")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="[model mode] config override, e.g. --set data.moment_frames=32 (repeatable)")
    p.add_argument("--max-samples", type=int, help="[model mode] evaluate only the first N samples (dialogue order)")
    p.add_argument("--batch-size", type=int, default=1, help="[model mode] prompts per generation batch (default 1)")
    p.add_argument("--max-new-tokens", type=int, help="[model mode] answer budget (default config.eval.max_new_tokens "
                                                     "or 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="[model mode] 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="[model mode] nucleus sampling mass (with --temperature)")
    p.add_argument("--seed", type=int, help="[model mode] sampling seed (default config.seed)")
    p.add_argument("--video-root", help="[model mode] directory the JSON's video paths are relative to")
    p.add_argument("--index", help="[model mode] retriever index directory: time retrieval per retrieval turn")
    p.add_argument("--retriever-model", help="[model mode] exported X-Pool for --index")
    p.add_argument("--mesh", action="store_true", help="[model mode] shard the model over config.mesh")
    p.add_argument("--video-slots", default="bucketed", choices=("bucketed", "cap"),
                   help="[model mode] pad video groups to 1/2/10k slots (default) or always to the config cap")
    return p


def _run_model(args) -> int:
    # --- model-driven mode: --config / --checkpoint are handled by ivcr_jax.eval.run_model ---
    try:
        run_model = importlib.import_module("ivcr_jax.eval.run_model")
    except ImportError as e:
        print(f"model evaluation not available: {e}. Score an existing file with --predictions PRED.jsonl.",
              file=sys.stderr)
        return 2
    return int(run_model.main(args) or 0)


def score_file(args) -> int:
    from ivcr_jax.data.schema import load_dialogues
    from ivcr_jax.eval.metrics import PredictionsFormatError, evaluate_predictions, read_predictions
    from ivcr_jax.eval.report import format_table, write_report

    for name in ("annotations", "out"):
        if not getattr(args, name):
            print(f"error: --{name} is required with --predictions", file=sys.stderr)
            return 2
    for name in ("annotations", "predictions"):
        if not Path(getattr(args, name)).is_file():
            print(f"error: --{name} {getattr(args, name)}: no such file", file=sys.stderr)
            return 2
    dialogues, load_report = load_dialogues(args.annotations, split=args.split, lang=args.lang)
    if not dialogues:
        print(f"error: no dialogues of split {args.split!r} in {args.annotations}\n{load_report.summary()}",
              file=sys.stderr)
        return 2
    try:
        preds, timings, stats = read_predictions(args.predictions, match=args.match,
                                                 skip_bad_lines=args.skip_bad_lines)
    except PredictionsFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = evaluate_predictions(dialogues, preds, history=args.history, match=args.match, lang=args.lang,
                                   max_turn=args.max_turn)
    results["input"] = {
        "annotations": str(args.annotations),
        "split": args.split,
        "annotation_records_skipped_as_malformed": load_report.num_skipped,
        "predictions_file": str(args.predictions),
        "predictions_lines": stats["lines"],
        "predictions_bad_lines_skipped": stats["bad_lines"],
        "predictions_duplicate_keys": stats["duplicates"],
    }
    if stats["bad_line_examples"]:
        results["input"]["predictions_bad_line_examples"] = stats["bad_line_examples"]
    paths = write_report(results, args.out, timings=timings, charts=not args.no_charts)
    print(format_table(results, timings))
    print()
    print(f"metrics: {paths['metrics']}")
    print(f"report:  {paths['report']}")
    pngs = [str(v) for k, v in paths.items() if v.suffix == ".png"]
    if pngs:
        print("charts:  " + ", ".join(pngs))
    if stats["bad_lines"]:
        print(f"warning: skipped {stats['bad_lines']} malformed predictions lines", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.predictions is None:
        return _run_model(args)
    return score_file(args)


if __name__ == "__main__":
    sys.exit(main())
