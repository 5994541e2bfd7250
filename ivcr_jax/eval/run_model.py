"""Model-driven evaluation: run InterLLaVA over the test dialogues, write predictions, score them.

    python -m ivcr_jax.eval --config configs/paper.py:tiny --checkpoint WORKDIR_OR_CONVERTED_DIR \\
        [--split test] [--annotations FILE] [--out DIR] [--history teacher|model] [--max-samples N]

Follows reference-architecture §8.2–§8.5: every turn of every test dialogue (type ≠ [0]) is a
sample; its prompt holds the earlier turns with their **ground-truth** answers (``--history
teacher``, as the reference evaluates) or with the model's own earlier answers (``--history
model``), and ends after the turn's ``[/INST]`` (:func:`ivcr_jax.data.samples.build_prompt`).
Turns are processed in waves of equal turn index, so in ``model`` mode turn ``t`` of a dialogue
is prompted after its turn ``t - 1`` was answered; a turn that could not be run (missing video,
prompt too long) keeps its ground-truth answer in later prompts.

Evaluation is deterministic: frames are sampled uniformly, decoding is greedy unless
``--temperature`` is given (then sampled from ``--seed``). The reference's evaluation was not
(§8.5: random crops and frames, sampled decoding).

Outputs under ``--out``: ``predictions.jsonl`` (``text_id``, ``answer``, ``timings`` in seconds per
stage, and the turn's kind, prompt and answer lengths), then the files of the scorer
(``metrics.json``, ``turn_scores.jsonl``, ``report.md``, PNG charts; ``ivcr_jax.eval.report``).

Timings per query (paper appendix Table 6 reports retrieval 0.06 s and MLLM 0.59–0.80 s on an
RTX 4090):

* ``retrieval``: 0 unless ``--index`` names a retriever index — the candidate lists come from the
  annotation JSON (X-Pool's top-10, precomputed). With an index, each retrieval turn's question is
  searched (``ivcr_jax.retrieval.search.Retriever``) and timed; the prompt still shows the JSON's
  candidates, which the ground truth refers to.
* ``prefill``: encoding the prompt's videos and the LLM pass over the prompt (``video_encode``
  gives the first part alone);
* ``decode``: the decode loop. Compilation is excluded (reported separately in metrics.json).

At ``--batch-size`` 1 (default) these are per-query latencies; with larger batches each query is
given its batch's stage time divided by the batch's real rows (amortised cost).

Each prompt is padded to a text bucket (``config.data.text_buckets``) and each video group to a
few slot counts (1, 2, then multiples of 10 up to the config's cap), so the model compiles once per
combination met.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["PromptLoader", "Prompt", "build_and_load", "clean_answer", "load_eval_config", "main", "pipeline_config",
           "run", "video_root_for"]


# ------------------------------------------------------------------------------ config helpers ---

def _get(node, dotted: str, default=None):
    cur = node
    for part in dotted.split("."):
        try:
            cur = cur[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return default if cur is None else cur


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def load_eval_config(spec: str, overrides: Sequence[str] = ()):
    """``configs/<file>.py[:arg]`` with ``KEY=VALUE`` overrides (values parsed as JSON when they can be)."""
    from ivcr_jax.configs_loader import load_config

    ov = {}
    for item in overrides or ():
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        v = _parse_value(v)
        ov[k.strip()] = tuple(v) if isinstance(v, list) else v
    return load_config(spec, ov)


def video_root_for(annotations: str | Path, explicit: str | None, dialogues: Sequence = ()) -> str:
    """Where the JSON's relative video paths live: ``explicit``, else the JSON's directory, or its
    ``videos/`` subdirectory when that is where the first referenced video is (the demo corpus)."""
    if explicit:
        return str(explicit)
    parent = Path(annotations).parent
    sub = parent / "videos"
    if sub.is_dir():
        first = next((v for d in dialogues for t in d.turns for v in ((t.video_id,) + t.candidate_videos) if v), None)
        if first is None or (sub / first).exists() or not (parent / first).exists():
            return str(sub)
    return str(parent)


def pipeline_config(config, *, batch_size: int = 1, video_root: str | None = None):
    """The input-pipeline config of ``config.data``, with the video-token layout of ``config.model``.

    ``PipelineConfig.from_config`` assumes the paper's 32 tokens per window of 32 frames; the number
    of placeholder positions per video must be what the model's video Q-Former produces
    (``num_query_tokens`` per window, windows of ``stride`` frames), or the splice would gather
    rows that do not exist (e.g. the tiny config: 8 queries). Same wiring as
    ``ivcr_jax.train.data.pipeline_config``, so evaluation prompts match the training samples.
    """
    from ivcr_jax.data.pipeline import PipelineConfig

    pc = PipelineConfig.from_config(config.data, batch_size=batch_size)
    vq = _get(config, "model.video_qformer", None)
    sample = pc.sample
    if vq is not None:
        window, stride = int(vq["window"]), int(vq["stride"])
        frames_per_window = (stride if stride > 0 else window) if window > 0 else 1 << 30
        sample = dataclasses.replace(sample, window=frames_per_window, tokens_per_window=int(vq["num_query_tokens"]))
    if video_root:
        sample = dataclasses.replace(sample, video_root=str(video_root))
    return dataclasses.replace(pc, sample=sample)


def clean_answer(text: str, tokenizer=None) -> str:
    """A generated answer made safe to put back into a prompt as history: the strings of special
    tokens (``<s>``, ``</s>``, ``<VIDEOTOKEN>``, ``<VID>`` ...) are removed, since the tokenizer would
    read them as the special ids and the prompt would no longer parse."""
    from ivcr_jax.tokenizer import SPECIAL_TOKENS

    specials = set(SPECIAL_TOKENS) | {"<s>", "</s>", "<unk>"}
    if tokenizer is not None:
        specials |= {t for t in getattr(tokenizer, "all_special_tokens", ()) if t}
    for t in sorted(specials, key=len, reverse=True):
        text = text.replace(t, " ")
    return " ".join(text.split())


# ------------------------------------------------------------------------------ prompts → batches ---

@dataclasses.dataclass
class Prompt:
    """An inference prompt with its decoded videos."""

    sample: Any  # ivcr_jax.data.samples.Sample (labels all -100)
    frames: dict  # (path, num_frames) -> frames.Frames


def _slots(n: int, cap: int | None) -> int:
    """Video slots for a group needing ``n``: 1, 2, then multiples of 10, clamped to the config cap."""
    c = max(int(n), 1)
    if c > 2:
        c = 10 * math.ceil(c / 10)
    return min(c, cap) if cap is not None and cap >= n else c


class PromptLoader:
    """Inference prompts (``samples.build_prompt``) with decoded frames, packed into the pipeline's
    batch contract (``ivcr_jax.data.pipeline``).

    ``video_slots="bucketed"`` (default) pads each video group to 1, 2 or a multiple of 10 slots
    (clamped to the config's per-sample cap): a first-turn prompt does not encode the empty slots of
    a long history, at the price of a few more compiled shapes. ``"cap"`` always pads to the cap,
    as the training pipeline does: one shape per text bucket.

    Decoded videos are kept in a small LRU cache: later turns of a dialogue show the earlier turns'
    videos again. Frames are sampled uniformly (deterministic).
    """

    def __init__(self, pcfg, tokenizer, *, videos=None, cache_videos: int = 64, video_slots: str = "bucketed"):
        from ivcr_jax.data.pipeline import RawVideos

        if video_slots not in ("bucketed", "cap"):
            raise ValueError(f"video_slots must be 'bucketed' or 'cap', got {video_slots!r}")
        self.pcfg, self.tokenizer, self.video_slots = pcfg, tokenizer, video_slots
        self.videos = videos or RawVideos(pcfg.frame_size, pcfg.decode_threads)
        self.caps = pcfg.sample.group_capacity()
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_size = int(cache_videos)
        self._loads: dict = {}

    def _frames(self, req):
        key = (req.path, req.num_frames)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        f = self.videos.load(req, "uniform", None)
        self._cache[key] = f
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return f

    def prompt(self, dialogue, turn_idx: int, sample_id: int = 0) -> Prompt:
        """Raises ``frames.VideoError`` (a video is missing or corrupt) or ``samples.SampleTooLong``."""
        from ivcr_jax.data.samples import build_prompt, prefix_videos

        decoded = {}
        reqs = prefix_videos(dialogue, turn_idx, self.pcfg.sample)
        for r in reqs:
            decoded[(r.path, r.num_frames)] = self._frames(r)
        timestamps = {r.turn: decoded[(r.path, r.num_frames)].timestamps for r in reqs if r.role == "moment"}
        s = build_prompt(dialogue, turn_idx, self.tokenizer, self.pcfg.sample, timestamps=timestamps,
                         sample_id=sample_id)
        return Prompt(s, decoded)

    def capacity(self, prompts: Sequence[Prompt]) -> dict[str, int]:
        from ivcr_jax.data.pipeline import group_frames

        need = collections.Counter()
        for p in prompts:
            for g, n in p.sample.group_counts().items():
                need[g] = max(need[g], n)
        caps = self.caps
        if self.video_slots == "cap" and all(caps.get(g) is not None for g in group_frames(self.pcfg.sample)):
            return {g: max(int(caps[g]), 1) for g in sorted(group_frames(self.pcfg.sample))}
        return {g: _slots(need[g], caps.get(g)) for g in sorted(group_frames(self.pcfg.sample))}

    def batch(self, prompts: Sequence[Prompt], batch_size: int | None = None) -> dict:
        """Numpy batch of ``batch_size`` rows (default ``len(prompts)``; extra rows are padding)."""
        from ivcr_jax.data.pipeline import _Batch, _Load

        B = len(prompts) if batch_size is None else int(batch_size)
        if not 0 < len(prompts) <= B:
            raise ValueError(f"{len(prompts)} prompts for a batch of {B}")
        cap = self.capacity(prompts)
        key = tuple(sorted(cap.items()))
        if key not in self._loads:
            self._loads[key] = _Load(self.pcfg, self.tokenizer, cap, False, 0, self.videos)
        load = self._loads[key]
        rows = [load.pack(p.sample, p.frames) for p in prompts]
        return _Batch(dataclasses.replace(self.pcfg, batch_size=B), cap)(rows)


# ------------------------------------------------------------------------------ model ---

def build_and_load(config, checkpoint: str | None, *, mesh=None):
    """Build the model of ``config`` (sharded over ``mesh`` when given) and load ``checkpoint``."""
    from ivcr_jax import sharding
    from ivcr_jax.eval.restore import load_weights
    from ivcr_jax.models import build

    cfg = build.model_config(config.model)
    if mesh is None:
        model = build.build_model(cfg, seed=int(config.seed))
        what = load_weights(model, checkpoint, config)
    else:
        with sharding.use_mesh(mesh):
            model = build.build_model(cfg, mesh=mesh, seed=int(config.seed))
            what = load_weights(model, checkpoint, config)
    return model, what


def _retriever(args):
    index = getattr(args, "index", None)
    if not index:
        return None
    try:
        from ivcr_jax.retrieval.search import Retriever
    except ImportError as e:  # the retrieval package is optional here
        print(f"warning: --index given but the retriever is unavailable ({e}); retrieval time is recorded as 0",
              file=sys.stderr)
        return None
    return Retriever.load(index, getattr(args, "retriever_model", None))


# ------------------------------------------------------------------------------ the run ---

def _waves(refs: Sequence) -> list[list]:
    by_turn: dict[int, list] = collections.defaultdict(list)
    for r in refs:
        by_turn[r.turn_idx].append(r)
    return [by_turn[t] for t in sorted(by_turn)]


def _with_history(dialogue, turn_idx: int, answers: Mapping[tuple[int, int], str]):
    """``dialogue`` with the answers of turns before ``turn_idx`` replaced by the model's own."""
    turns = list(dialogue.turns)
    for j in range(turn_idx):
        a = answers.get((dialogue.index, j))
        if a is not None:
            turns[j] = dataclasses.replace(turns[j], answer=a)
    return dataclasses.replace(dialogue, turns=tuple(turns))


def run(config, model, tokenizer, dialogues: Sequence, *, out_dir: str | Path, history: str = "teacher",
        max_samples: int | None = None, batch_size: int = 1, max_new_tokens: int = 512,
        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, video_root: str | None = None,
        retriever=None, mesh=None, video_slots: str = "bucketed", log=print) -> dict:
    """Generate an answer for every sample of ``dialogues``; write ``predictions.jsonl``.

    Returns ``{"predictions": path, "records": [...], "skipped": [...], "generation": {...}}``.
    """
    import jax

    from ivcr_jax.data.frames import VideoError
    from ivcr_jax.data.samples import SampleTooLong, enumerate_samples
    from ivcr_jax.eval.generate import Generator

    if history not in ("teacher", "model"):
        raise ValueError(f"history must be 'teacher' or 'model', got {history!r}")
    pcfg = pipeline_config(config, batch_size=batch_size, video_root=video_root)
    refs = enumerate_samples(dialogues, pcfg.sample)
    if max_samples is not None:
        refs = refs[: int(max_samples)]
    loader = PromptLoader(pcfg, tokenizer, video_slots=video_slots)
    gen = Generator(model, max_new_tokens=max_new_tokens, buckets=pcfg.buckets, mesh=mesh)
    key = jax.random.key(int(seed))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / "predictions.jsonl"

    answers: dict[tuple[int, int], str] = {}
    records, skipped = [], []
    compile_s, n_batches, t_start = 0.0, 0, time.perf_counter()
    with open(pred_path, "w", encoding="utf-8") as f:
        for wave in _waves(refs):
            for b0 in range(0, len(wave), batch_size):
                chunk = wave[b0:b0 + batch_size]
                prompts, refs_ok = [], []
                for ref in chunk:
                    d = _with_history(ref.dialogue, ref.turn_idx, answers) if history == "model" else ref.dialogue
                    try:
                        prompts.append(loader.prompt(d, ref.turn_idx, ref.sample_id))
                        refs_ok.append(ref)
                    except (VideoError, SampleTooLong, ValueError) as e:  # ValueError: an unparseable prompt
                        skipped.append({"text_id": ref.dialogue.turns[ref.turn_idx].text_id, "error": str(e)})
                        log(f"skipped {ref.key}: {e}")
                if not prompts:
                    continue
                batch = loader.batch(prompts, batch_size)
                sub = jax.random.fold_in(key, n_batches)
                g = gen(batch, temperature=temperature, top_p=top_p, key=sub)
                n_batches += 1
                compile_s += g.compile_s
                texts = g.texts(tokenizer)
                n = len(prompts)
                for i, (ref, p) in enumerate(zip(refs_ok, prompts)):
                    turn = ref.dialogue.turns[ref.turn_idx]
                    t_ret = 0.0
                    if retriever is not None and turn.kind == "retrieval":
                        t0 = time.perf_counter()
                        retriever.search([turn.question], 10)
                        t_ret = time.perf_counter() - t0
                    answers[(ref.dialogue.index, ref.turn_idx)] = clean_answer(texts[i], tokenizer)
                    rec = {"text_id": turn.text_id, "answer": texts[i],
                           "timings": {"retrieval": t_ret, "prefill": (g.encode_s + g.prefill_s) / n,
                                       "decode": g.decode_s / n, "video_encode": g.encode_s / n},
                           "dialogue_id": ref.dialogue.id, "turn": ref.turn_idx + 1, "kind": turn.kind,
                           "prompt_tokens": int(g.prompt_lengths[i]), "new_tokens": int(g.lengths[i]),
                           "finished": bool(g.finished[i]), "history_turns_dropped": int(p.sample.dropped_turns)}
                    records.append(rec)
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                log(f"wave {refs_ok[0].turn_idx + 1}: {len(records)}/{len(refs)} samples "
                    f"(bucket {g.bucket}, video encoding {g.encode_s:.3f}s, prefill {g.prefill_s:.3f}s, "
                    f"decode {g.decode_s:.3f}s over {g.steps} steps"
                    + (f", compiled in {g.compile_s:.1f}s" if g.compile_s else "") + ")")
    generation = {
        "max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p),
        "decoding": "greedy" if temperature <= 0 else "sampled", "seed": int(seed), "batch_size": int(batch_size),
        "samples": len(refs), "answered": len(records), "skipped": len(skipped),
        "compiled_shapes": gen.compile_counts, "compile_s": compile_s,
        "wall_s": time.perf_counter() - t_start, "frames": "uniform",
        "timings": ("per-query latency (batch size 1)" if batch_size == 1 else
                    f"batch stage time / real rows (batch size {batch_size})")
                   + "; prefill includes video_encode",
        "retrieval_timing": ("retriever search per retrieval turn" if retriever is not None else
                             "0: candidate lists read from the annotation JSON (no --index)"),
    }
    return {"predictions": pred_path, "records": records, "skipped": skipped, "generation": generation}


def main(args, *, model=None, tokenizer=None) -> int:
    """The model-driven mode of ``python -m ivcr_jax.eval`` (``args`` from its parser).

    ``model`` / ``tokenizer`` may be passed in (notebooks, tests); otherwise they are built from
    ``--config`` and loaded from ``--checkpoint``.
    """
    from ivcr_jax.data.schema import load_dialogues
    from ivcr_jax.eval.metrics import evaluate_predictions, read_predictions
    from ivcr_jax.eval.report import format_table, write_report
    from ivcr_jax.train import data as data_lib

    if not getattr(args, "config", None):
        print("error: the model-driven mode needs --config (or score a file with --predictions)", file=sys.stderr)
        return 2
    config = load_eval_config(args.config, getattr(args, "set", None) or ())
    annotations = getattr(args, "annotations", None) or _get(config, "data.annotations", "")
    if not annotations or not Path(annotations).is_file():
        print(f"error: annotations {annotations or '(none)'}: no such file (give --annotations or "
              f"config.data.annotations)", file=sys.stderr)
        return 2
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None and not Path(checkpoint).exists():
        print(f"error: --checkpoint {checkpoint}: no such directory", file=sys.stderr)
        return 2
    split, lang = getattr(args, "split", "test"), getattr(args, "lang", "en")
    exclude = tuple(tuple(t) for t in _get(config, "data.exclude_types", ((0,),)))
    dialogues, load_report = load_dialogues(annotations, split=split, lang=lang, exclude_types=exclude)
    if not dialogues:
        print(f"error: no dialogues of split {split!r} in {annotations}\n{load_report.summary()}", file=sys.stderr)
        return 2
    out = getattr(args, "out", None)
    if not out:
        out = (Path(checkpoint) / f"eval_{split}" if checkpoint and not Path(checkpoint, "ivcr_meta.json").is_file()
               else Path(f"eval_{split}"))
    out = Path(out)

    mesh = None
    if getattr(args, "mesh", False):
        from ivcr_jax import sharding

        mesh = sharding.make_mesh(config.mesh)
    what = "model passed in by the caller"
    if model is None:
        t0 = time.perf_counter()
        model, what = build_and_load(config, checkpoint, mesh=mesh)
        print(f"model built and loaded in {time.perf_counter() - t0:.1f}s: {what}")
    if tokenizer is None:
        tokenizer = data_lib.tokenizer(config)
    max_new = getattr(args, "max_new_tokens", None) or int(_get(config, "eval.max_new_tokens", 512))
    seed = getattr(args, "seed", None)
    seed = int(config.seed) if seed is None else int(seed)
    root = video_root_for(annotations, getattr(args, "video_root", None) or _get(config, "data.video_root", ""),
                          dialogues)
    result = run(config, model, tokenizer, dialogues, out_dir=out, history=getattr(args, "history", "teacher"),
                 max_samples=getattr(args, "max_samples", None), batch_size=int(getattr(args, "batch_size", 1) or 1),
                 max_new_tokens=int(max_new), temperature=float(getattr(args, "temperature", 0.0) or 0.0),
                 top_p=float(getattr(args, "top_p", 1.0) or 1.0), seed=seed, video_root=root,
                 retriever=_retriever(args), mesh=mesh, video_slots=getattr(args, "video_slots", None) or "bucketed")

    preds, timings, stats = read_predictions(result["predictions"])
    answered_dialogues = {r["dialogue_id"] for r in result["records"]}
    subset = [d for d in dialogues if d.id in answered_dialogues]
    results = evaluate_predictions(subset or dialogues, preds, all_test_turns=dialogues,
                                   history=getattr(args, "history", "teacher"), match="text_id", lang=lang,
                                   max_turn=int(getattr(args, "max_turn", 7) or 7))
    gen = result["generation"]
    results["generation"] = gen
    results["input"] = {
        "config": args.config, "checkpoint": str(checkpoint), "weights": what, "annotations": str(annotations),
        "split": split, "video_root": root, "annotation_records_skipped_as_malformed": load_report.num_skipped,
        "predictions_file": str(result["predictions"]), "samples": gen["samples"], "answered": gen["answered"],
        "samples_skipped (missing video / too long)": gen["skipped"],
        "decoding": f"{gen['decoding']}, max_new_tokens {gen['max_new_tokens']}, frames uniform",
        "timings": gen["timings"], "retrieval timing": gen["retrieval_timing"],
        "compiled shapes": gen["compiled_shapes"], "compile seconds (excluded from timings)": round(gen["compile_s"], 2),
    }
    if result["skipped"]:
        results["input"]["skipped examples"] = [s["error"] for s in result["skipped"][:5]]
    paths = write_report(results, out, timings=timings, charts=not getattr(args, "no_charts", False))
    print(format_table(results, timings))
    print()
    print(f"predictions: {result['predictions']}")
    print(f"metrics: {paths['metrics']}")
    print(f"report:  {paths['report']}")
    pngs = [str(v) for k, v in paths.items() if v.suffix == ".png"]
    if pngs:
        print("charts:  " + ", ".join(pngs))
    return 0
