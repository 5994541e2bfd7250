"""Model-driven evaluation: run InterLLaVA over the test dialogues, write predictions, score them.

    python -m ivcr_jax.eval --config configs/paper.py:tiny --checkpoint WORKDIR_OR_CONVERTED_DIR \\
        [--split test] [--annotations FILE] [--out DIR] [--history teacher|model|both] [--max-samples N] \\
        [--test-filter reference|none] [--scorer official|lenient] [--reference-bugs] \\
        [--config.eval.batch_size=8] [--config.eval.temperature=1.0 --config.eval.top_p=0.8]

The samples run are the reference's test samples (``eval/protocol.py``, reference-architecture
§8.2): its test filter keeps a dialogue only if the first stage got its first turn right (and
leaves type-[7] dialogues without samples), every prefix of turns 1–7 is a sample, and the turns
not run count as failures end to end. ``--test-filter none`` runs every dialogue. No video is shown
that the system could not know (``rollout.shown_dialogue``): a first-turn moment is shown the first
stage's top-1, not the ground-truth video (under the filter they are the same video).

Each sample's prompt holds the earlier turns with their **ground-truth** answers (``--history
teacher``, as the reference evaluates) or, in the closed loop (``--history model``), with the
model's own earlier answers, and a moment turn after a retrieval turn is shown the video the model
chose there; ``--history both`` runs both and reports them side by side (``predictions.jsonl``
and ``predictions_model.jsonl``). The prompt ends after the turn's ``[/INST]``
(:func:`ivcr_jax.data.samples.build_prompt`). Turns are processed in waves of equal turn index,
so in the closed loop turn ``t`` of a dialogue is prompted after its turn ``t - 1`` was answered;
a turn that could not be run (missing video, prompt too long) keeps its ground-truth answer in
later prompts.

Evaluation is deterministic: frames are sampled uniformly, decoding is greedy unless
``config.eval.temperature > 0`` (then sampled from ``config.seed``). The reference's evaluation was not
(§8.5: random crops and frames, sampled decoding).

Outputs under ``--out``: ``predictions.jsonl`` (``text_id``, ``answer``, ``timings`` in seconds per
stage, the turn's kind, prompt and answer lengths, and on moment turns the decoded video's
``duration`` for the random baseline), then the files of the scorer
(``metrics.json``, ``turn_scores.jsonl``, ``report.md``, PNG charts; ``ivcr_jax.eval.report``).

Timings per query (paper appendix Table 6 reports retrieval 0.06 s and MLLM 0.59–0.80 s on an
RTX 4090):

* ``retrieval``: 0 unless ``--index`` names a retriever index — the candidate lists come from the
  annotation JSON (X-Pool's top-10, precomputed). With an index, each retrieval turn's question is
  searched (``ivcr_jax.retrieval.search.Retriever``) and timed, and its line records
  ``gt_in_retrieved_top10`` (the GT ``video_id`` among the retriever's top 10), from which the
  scorer counts R@10. The prompt still shows the JSON's candidates, which the ground truth's
  "video N" refers to, so R@1 is the re-ranking of those, not of the retriever's list.
* ``prefill``: encoding the prompt's videos and the LLM pass over the prompt (``video_encode``
  gives the first part alone);
* ``decode``: the decode loop. Compilation is excluded (reported separately in metrics.json).

At ``config.eval.batch_size`` 1 (default) these are per-query latencies; with larger batches each query is
given its batch's stage time divided by the batch's real rows (amortised cost).

Each prompt is padded to a text bucket (``config.data.text_buckets``) and each video group to a
few slot counts (1, 2, then multiples of 10 up to the config's cap), so the model compiles once per
combination met.
"""
from __future__ import annotations

import collections
import io
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import jax

from ivcr_jax import checkpoints, distributed
from ivcr_jax.cli import UsageError
from ivcr_jax.data import features as features_lib
from ivcr_jax.data.prompts import PromptLoader
from ivcr_jax.data.official_answers import OfficialScorerError
from ivcr_jax.data.samples import SampleRef
from ivcr_jax.eval.metrics import RETRIEVED_FIELD, evaluate_predictions, prior_span, read_predictions
from ivcr_jax.eval import protocol
from ivcr_jax.eval.report import closed_loop_summary, publish
from ivcr_jax.experiment import Experiment
from ivcr_jax.models.generate import Generator
from ivcr_jax.rollout import Skipped, answer_samples
from ivcr_jax.retrieval.search import Retriever

__all__ = ["evaluate_model", "run", "test_samples"]


# ------------------------------------------------------------------------------ the run ---

def _moment_duration(prompt, turn_idx: int) -> float | None:
    """The length (seconds) of the turn's own moment video, as decoded for the prompt."""
    for v in prompt.sample.videos:
        if v.role == "moment" and v.turn == turn_idx:
            return float(prompt.frames[(v.path, v.num_frames)].duration)
    return None


def _record(ref, prompt, g, i: int, text: str, n: int, retriever) -> dict:
    """The predictions-file line of row ``i`` of generation ``g`` (``n`` real rows share its stage times)."""
    turn = ref.dialogue.turns[ref.turn_idx]
    t_ret, extra = 0.0, {}
    if retriever is not None and turn.kind == "retrieval":
        t0 = time.perf_counter()
        ids, _ = retriever.search([turn.question], 10)
        t_ret = time.perf_counter() - t0
        extra[RETRIEVED_FIELD] = turn.video_id in ids[0]
    duration = _moment_duration(prompt, ref.turn_idx) if turn.kind == "moment" else None
    if duration is not None and round(duration, 3) > 0:  # the scorer reads only positive lengths
        extra["duration"] = round(duration, 3)
    return {"text_id": turn.text_id, "answer": text,
            "timings": {"retrieval": t_ret, "prefill": (g.encode_s + g.prefill_s) / n,
                        "decode": g.decode_s / n, "video_encode": g.encode_s / n},
            "dialogue_id": ref.dialogue.id, "turn": ref.turn_idx + 1, "kind": turn.kind,
            "prompt_tokens": int(g.prompt_lengths[i]), "new_tokens": int(g.lengths[i]),
            "finished": bool(g.finished[i]), "history_turns_dropped": int(prompt.sample.dropped_turns), **extra}


def test_samples(dialogues: Sequence, sample_cfg, test_filter: str = "reference") -> tuple[list, list[SampleRef]]:
    """The samples to run: the reference's test samples (``eval/protocol.py``: its test filter, turns
    cut at ``max_turns``, prefixes of more than ``max_sample_turns`` dropped), and them as
    ``SampleRef``s; with ``long_prefix="truncate"`` the long prefixes are kept (truncated when prompted)."""
    keep = sample_cfg.max_sample_turns if sample_cfg.long_prefix == "drop" else None
    samples = protocol.reference_samples(dialogues, test_filter=test_filter, max_turns=sample_cfg.max_turns,
                                         max_sample_turns=keep)
    return samples, [SampleRef(i, s.dialogue, s.turn_idx) for i, s in enumerate(samples)]


def run(exp: Experiment, model, tokenizer, dialogues: Sequence, *, out_dir: str | Path, history: str = "teacher",
        max_samples: int | None = None, video_root: str | None = None, retriever=None, mesh=None,
        test_filter: str = "reference", name: str = "predictions.jsonl", log=print) -> dict:
    """Generate an answer for every test sample of ``dialogues`` (:func:`test_samples`; ``exp.eval``:
    batch size, budget, decoding, video slots); write ``name`` under ``out_dir``.

    Returns ``{"predictions": path, "records": [...], "skipped": [...], "generation": {...}}``.
    """
    ec = exp.eval
    batch_size, max_new_tokens = int(ec.batch_size), int(ec.max_new_tokens)
    temperature, top_p, seed = float(ec.temperature), float(ec.top_p), exp.seed
    pcfg = exp.pipeline(batch_size, video_root=video_root)
    _, refs = test_samples(dialogues, pcfg.sample, test_filter)
    if max_samples:  # None or 0: every sample
        refs = refs[: int(max_samples)]
    loader = PromptLoader(pcfg, tokenizer, video_slots=ec.video_slots)
    gen = Generator(model, max_new_tokens=max_new_tokens, buckets=pcfg.buckets, mesh=mesh)
    out_dir = Path(out_dir)
    writer = distributed.is_writer()   # several processes: every one generates the same answers, one writes
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        log = lambda *a, **k: None  # noqa: E731
    pred_path = out_dir / name

    records, skipped = [], []
    compile_s, t_start = 0.0, time.perf_counter()
    items = answer_samples(refs, loader, gen, tokenizer, batch_size=batch_size, history=history,
                           temperature=temperature, top_p=top_p, key=jax.random.key(int(seed)))
    with open(pred_path, "w", encoding="utf-8") if writer else io.StringIO() as f:
        for it in items:
            if isinstance(it, Skipped):
                skipped.append({"text_id": it.turn.text_id, "error": it.error, "reason": it.reason})
                log(f"skipped {it.ref.key}: {it.error}")
                continue
            g = it.generation
            records.append(_record(it.ref, it.prompt, g, it.row, it.text, it.rows, retriever))
            f.write(json.dumps(records[-1], ensure_ascii=False) + "\n")
            if it.row == 0:  # once per batch
                compile_s += g.compile_s
            if it.row == it.rows - 1:
                log(f"wave {it.ref.turn_idx + 1}: {len(records)}/{len(refs)} samples "
                    f"(bucket {g.bucket}, video encoding {g.encode_s:.3f}s, prefill {g.prefill_s:.3f}s, "
                    f"decode {g.decode_s:.3f}s over {g.steps} steps"
                    + (f", compiled in {g.compile_s:.1f}s" if g.compile_s else "") + ")")
    generation = {
        "max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p),
        "decoding": "greedy" if temperature <= 0 else "sampled", "seed": int(seed), "batch_size": int(batch_size),
        "samples": len(refs), "answered": len(records), "skipped": len(skipped),
        "skipped_by_reason": dict(collections.Counter(s["reason"] for s in skipped).most_common()),
        "compiled_shapes": gen.compile_counts, "compile_s": compile_s,
        "wall_s": time.perf_counter() - t_start, "frames": "uniform",
        "timings": ("per-query latency (batch size 1)" if batch_size == 1 else
                    f"batch stage time / real rows (batch size {batch_size})")
                   + "; prefill includes video_encode",
        "retrieval_timing": ("retriever search per retrieval turn; R@10 from its top 10" if retriever is not None
                             else "0: candidate lists read from the annotation JSON (no --index)"),
    }
    return {"predictions": pred_path, "records": records, "skipped": skipped, "generation": generation}


def nothing_answered(result: dict, video_root: str) -> str:
    """The one-line reason of a run that answered no sample (the evaluation then exits 1)."""
    n, skipped = result["generation"]["samples"], result["skipped"]
    if not n:
        return (f"error: no test sample to run (the test filter and --max-samples left none); "
                f"nothing written but {result['predictions']}")
    eg = "; ".join(dict.fromkeys(s["error"] for s in skipped[:3]))
    return (f"error: nothing answered: all {n} samples were skipped (e.g. {eg}); is the video root "
            f"{video_root} right? No metrics written")


def evaluate_model(exp: Experiment, args, *, model=None, tokenizer=None) -> int:
    """The model-driven mode of ``python -m ivcr_jax.eval`` (``args``: its parsed flags).

    ``model`` / ``tokenizer`` may be passed in (notebooks, tests); otherwise the model is built from
    the experiment and ``--checkpoint`` loaded over it. Returns the exit status: 0, or 1 when no
    sample was answered (every video missing, say), with the reason on stderr and no metrics.
    """
    distributed.initialize()   # a no-op in one process
    annotations = args.annotations or exp.data.annotations
    dialogues, load_report = exp.dialogues(args.split, annotations=annotations)
    if not dialogues:
        raise UsageError(f"no dialogues of split {args.split!r} in {annotations}\n{load_report.summary()}")
    out = Path(args.out or checkpoints.default_eval_dir(args.checkpoint, args.split))
    mesh = exp.mesh() if args.mesh else None
    what = "model passed in by the caller"
    if model is None:
        t0 = time.perf_counter()
        model, what = exp.load_model(args.checkpoint, mesh)
        print(f"model built and loaded in {time.perf_counter() - t0:.1f}s: {what}")
    print(features_lib.vision_line(exp.data.vit_features or None, model), flush=True)
    tokenizer = tokenizer or exp.tokenizer
    root = exp.video_root(dialogues, annotations)
    retriever = Retriever.load(args.index, args.retriever_model) if args.index else None
    pcfg = exp.pipeline(int(exp.eval.batch_size), video_root=root)
    samples, _ = test_samples(dialogues, pcfg.sample, args.test_filter)
    train_dialogues, _ = exp.dialogues("train", annotations=annotations)
    score = dict(all_test_turns=dialogues, match="text_id", lang=exp.data.lang, max_turn=args.max_turn,
                 prior=prior_span(train_dialogues), scorer=args.scorer, reference_bugs=args.reference_bugs,
                 test_filter=args.test_filter, skipped_turns=load_report.skipped_turns)
    histories = ("teacher", "model") if args.history == "both" else (args.history,)
    runs = {}
    for h in histories:
        name = "predictions.jsonl" if h == histories[0] else f"predictions_{h}.jsonl"
        result = run(exp, model, tokenizer, dialogues, out_dir=out, history=h, max_samples=args.max_samples,
                     video_root=root, retriever=retriever, mesh=mesh, test_filter=args.test_filter, name=name)
        if not result["records"]:   # every process generates the same: all stop here
            if distributed.is_writer():
                print(nothing_answered(result, root), file=sys.stderr, flush=True)
            return 1
        if not distributed.is_writer():   # process 0 scores and reports
            continue
        preds, timings_h, _, fields = read_predictions(result["predictions"])
        run_samples = samples[: int(args.max_samples)] if args.max_samples else samples
        try:
            runs[h] = (result, timings_h, evaluate_predictions(dialogues, preds, history=h, turn_fields=fields,
                                                               samples=run_samples, **score))
        except OfficialScorerError as e:
            raise UsageError(f"--reference-bugs: {e}") from None
    if not distributed.is_writer():
        return 0
    result, timings, results = runs[histories[0]]
    if len(histories) > 1:
        results["closed_loop"] = closed_loop_summary(runs["model"][2], str(runs["model"][0]["predictions"]))
    gen = result["generation"]
    results["generation"] = gen
    results["input"] = {
        "config": args.config, "checkpoint": str(args.checkpoint), "weights": what, "annotations": str(annotations),
        "split": args.split, "video_root": root, "annotation_records_skipped_as_malformed": load_report.num_skipped,
        "predictions_file": str(result["predictions"]), "samples": gen["samples"], "answered": gen["answered"],
        "samples_skipped": gen["skipped"], "samples_skipped_by_reason": gen["skipped_by_reason"],
        "decoding": f"{gen['decoding']}, max_new_tokens {gen['max_new_tokens']}, frames uniform",
        "timings": gen["timings"], "retrieval timing": gen["retrieval_timing"],
        "compiled shapes": gen["compiled_shapes"], "compile seconds (excluded from timings)": round(gen["compile_s"], 2),
    }
    if result["skipped"]:
        results["input"]["skipped examples"] = [s["error"] for s in result["skipped"][:5]]
        why = ", ".join(f"{r} {n}" for r, n in gen["skipped_by_reason"].items())
        print(f"{gen['samples']} samples: {gen['answered']} answered, {gen['skipped']} skipped ({why})")
    publish(results, out, timings=timings, charts=not args.no_charts, predictions=result["predictions"])
    return 0
