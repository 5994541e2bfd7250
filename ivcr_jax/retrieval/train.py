"""X-Pool training on cached features, top to bottom (after big_vision's ``train.py``).

    python -m ivcr_jax.retrieval.train --config configs/xpool.py:tiny \
        --index INDEX --annotations IVCR.json --workdir DIR

Training pairs are the retrieval turns of an IVCR-format JSON (reference-architecture.md §8.2):
the user's question <-> the ground-truth ``video_id``, whose frame features come from the index
(``retrieval/index.py``); texts are encoded once with the extractor the index was built with.
The recipe is X-Pool's (§5): symmetric InfoNCE with a learned, clamped logit scale; AdamW (wd 0.2),
cosine schedule with 10 % linear warmup, global-norm clipping 1.0. The frame/text towers are frozen
here (cached features), so only the pooling block and the logit scale train.

Outputs in ``workdir``: ``checkpoints/`` (Orbax: model, optimizer, step and the Grain iterator —
a restarted run resumes where it stopped), ``metrics.jsonl``, and at the end ``xpool.safetensors``
+ ``xpool_config.json`` (``ivcr_jax.models.xpool.save_xpool``; what
:class:`ivcr_jax.retrieval.search.Retriever` loads).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from ivcr_jax.models.xpool import XPool, XPoolConfig, clamp_logit_scale, infonce, save_xpool, similarity_matrix
from ivcr_jax import cli
from ivcr_jax.retrieval import metrics as metrics_lib
from ivcr_jax.models.params import CheckpointError
from ivcr_jax.retrieval.index import USER_ERRORS, VideoIndex
from ivcr_jax.retrieval.search import Retriever, retrieval_turns


# ----------------------------------------------------------------------------- data

def retrieval_pairs(annotations: str | os.PathLike, index: VideoIndex, split: str | None
                    ) -> tuple[list[str], np.ndarray]:
    """(questions, index rows of their ground-truth videos) of the retrieval turns of ``split``.

    The JSON is read by ``ivcr_jax.data.schema.load_dialogues`` (through
    :func:`~ivcr_jax.retrieval.search.retrieval_turns`). Dialogues of type ``[0]`` (chit-chat) are
    excluded as everywhere in the reference; turns whose video is not in the index (e.g. skipped as
    unreadable) are dropped.
    """
    pos = index.position()
    texts, rows = [], []
    for _, _, question, vid in retrieval_turns(annotations, split=split, exclude_types=((0,),)):
        if vid in pos:
            texts.append(question)
            rows.append(pos[vid])
    return texts, np.asarray(rows, np.int64)


@dataclasses.dataclass
class PairSource:
    """Grain random-access source: pair ``i`` -> its text feature, its video's frame tokens and row."""

    text: np.ndarray      # [P, D]
    rows: np.ndarray      # [P]
    index: VideoIndex

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        r = int(self.rows[i])
        return {"text": self.text[i], "frames": self.index.frames(np.array([r]))[0], "row": np.int32(r)}

    def __repr__(self) -> str:  # Grain checks the source's repr when restoring an iterator
        return f"PairSource(pairs={len(self.rows)}, index={self.index.root})"


def make_pipeline(source: PairSource, batch_size: int, seed: int):
    """Shuffled (a new order every epoch), repeated, fixed-size batches; a checkpointable iterator."""
    import grain
    ds = (grain.MapDataset.source(source).seed(seed).shuffle().repeat()
          .batch(batch_size, drop_remainder=True))
    # Batches are cheap memory-mapped reads: a short prefetch suffices, and a long one would keep
    # Python threads busy (holding the GIL) while the step is traced and compiled.
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


# ----------------------------------------------------------------------------- optimizer

def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, Any]:
    """AdamW with X-Pool's two learning rates: the pooling block, and the logit scale (a CLIP
    parameter upstream, trained at CLIP's lr). Same schedule for both: linear warmup over
    ``warmup_frac`` of the steps, then cosine to 0 (``get_cosine_schedule_with_warmup``)."""
    return _make_tx(float(cfg.lr), float(cfg.lr_logit_scale), float(cfg.weight_decay),
                    float(cfg.grad_clip), int(cfg.warmup_frac * total_steps), int(total_steps))


@functools.lru_cache(maxsize=8)
def _make_tx(lr, lr_scale, weight_decay, grad_clip, warmup, total):
    # Cached: the optimizer is static data of the jitted step, so an equal hyper-parameter set
    # must give the same object for a second run in one process to reuse the compiled step.
    def sched(peak):
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), max(total, 1), 0.0)

    def adamw(peak):
        return optax.adamw(sched(peak), b1=0.9, b2=0.999, eps=1e-6, weight_decay=weight_decay)

    def label(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "scale" if "logit_scale" in jax.tree_util.keystr(path) else "head", params)

    tx = optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.multi_transform({"head": adamw(lr), "scale": adamw(lr_scale)}, label))
    return tx, sched(lr)


# ----------------------------------------------------------------------------- the compiled step

@nnx.jit(static_argnames=("mask_same_video",))
def train_step(model: XPool, opt: nnx.Optimizer, batch: dict, rng: jax.Array, mask_same_video: bool = False):
    def loss_fn(m: XPool):
        sims = m(batch["text"], batch["frames"], rng=rng)                     # [B, B]
        return infonce(sims, m.logit_scale[...], video_ids=batch["row"] if mask_same_video else None)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    clamp_logit_scale(model)          # torch.clamp_(logit_scale, max=ln 100) after the step
    return {"loss": loss, "grad_norm": optax.global_norm(grads), "logit_scale": model.logit_scale[...]}


# ----------------------------------------------------------------------------- evaluation

def evaluate(model: XPool, index: VideoIndex, text: np.ndarray, rows: np.ndarray, cfg) -> dict[str, float]:
    """X-Pool t2v metrics over the whole index (every text against every video, chunked) and the
    two-stage retriever's R@k (first-stage top-``rerank_k``, then X-Pool)."""
    sims = similarity_matrix(model, text, index.all_frames(), text_chunk=cfg.search.eval_text_chunk,
                             video_chunk=cfg.search.eval_video_chunk)
    out = {f"xpool/{k}": v for k, v in metrics_lib.t2v_metrics(sims, rows).items()}
    ret = Retriever(index, model, rerank_k=cfg.search.rerank_k)
    got, _ = ret.search_rows(text, k=min(10, len(index)))
    ranks = metrics_lib.ranks_from_lists(got.tolist(), rows.tolist())
    out.update({f"two_stage/{k}": v for k, v in metrics_lib.compute_metrics(ranks, (1, 5, 10)).items()
                if k.startswith("R")})
    first, _ = Retriever(index, None).search_rows(text, k=min(10, len(index)))
    ranks = metrics_lib.ranks_from_lists(first.tolist(), rows.tolist())
    out.update({f"mean_pool/{k}": v for k, v in metrics_lib.compute_metrics(ranks, (1, 5, 10)).items()
                if k.startswith("R")})
    return out


# ----------------------------------------------------------------------------- the loop

def train(config, index_dir: str | os.PathLike, annotations: str | os.PathLike, workdir: str | os.PathLike,
          *, log=print, evaluate_at_end: bool = True) -> dict[str, Any]:
    """Train X-Pool; returns ``{"step", "losses", "eval"}``. Resumes from ``workdir`` if it holds
    checkpoints. The final model is evaluated on ``config.train.eval_split`` unless
    ``evaluate_at_end`` is False."""
    import grain
    import orbax.checkpoint as ocp

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tc = config.train

    # --- features: the index and the (frozen) text features of the training pairs ---
    index = VideoIndex.load(index_dir)
    if int(config.model.embed_dim) != index.dim:
        raise cli.UsageError(f"config.model.embed_dim={config.model.embed_dim}, but the index {index_dir} holds "
                             f"{index.dim}-d features: set config.model.embed_dim={index.dim}")
    encode = index.extractor().encode_text
    texts, rows = retrieval_pairs(annotations, index, tc.split)
    if len(rows) < tc.batch_size:
        raise cli.UsageError(f"{annotations}: {len(rows)} training pairs in split {tc.split!r}, fewer than one "
                             f"batch of config.train.batch_size={tc.batch_size}")
    text_feats = np.asarray(encode(texts), np.float32)
    log(f"[xpool] {len(rows)} training pairs over {len(index)} videos ({index.dim}-d, {index.tokens} tokens/video)")

    # --- input pipeline ---
    it = make_pipeline(PairSource(text_feats, rows, index), tc.batch_size, config.seed)
    steps_per_epoch = len(rows) // tc.batch_size
    total = int(tc.steps) if tc.steps else int(tc.epochs) * steps_per_epoch

    # --- model and optimizer ---
    mcfg = XPoolConfig(embed_dim=index.dim, num_heads=config.model.num_heads,
                       dropout=config.model.dropout, layer_norm_eps=config.model.layer_norm_eps)
    model = XPool(mcfg, rngs=nnx.Rngs(config.seed))
    tx, sched = make_optimizer(tc, total)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    # --- restore or initialise ---
    mngr = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=tc.keep_ckpts, create=True))
    start = 0
    if mngr.latest_step() is not None:
        start = mngr.latest_step()
        target = {"model": nnx.state(model), "opt": nnx.state(opt)}
        r = mngr.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                        data=grain.checkpoint.CheckpointRestore(it)))
        nnx.update(model, r.state["model"])
        nnx.update(opt, r.state["opt"])
        log(f"[xpool] resumed from step {start}")

    def save(step):
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"model": nnx.state(model), "opt": nnx.state(opt)}),
            data=grain.checkpoint.CheckpointSave(it)), force=True)

    # --- loop: step, log, checkpoint, evaluate ---
    base_key = jax.random.key(config.seed, impl=tc.prng_impl)
    losses, t0 = [], time.time()
    mlog = open(workdir / "metrics.jsonl", "a")
    with mngr:  # closing waits for a save in flight, also when the loop raises
        for step in range(start + 1, total + 1):
            batch = next(it)
            m = train_step(model, opt, batch, jax.random.fold_in(base_key, step),
                           mask_same_video=bool(tc.mask_same_video))
            loss = float(m["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at step {step}")
            losses.append(loss)
            if step % tc.log_every == 0 or step == total:
                rec = {"step": step, "loss": loss, "grad_norm": float(m["grad_norm"]),
                       "logit_scale": float(m["logit_scale"]), "lr": float(sched(step - 1)),
                       "sec": round(time.time() - t0, 2)}
                mlog.write(json.dumps(rec) + "\n")
                mlog.flush()
                log(f"[xpool] step {step}/{total} loss {loss:.4f} scale {rec['logit_scale']:.3f}")
            if tc.ckpt_every and step % tc.ckpt_every == 0 and step < total:
                save(step)
            if tc.eval_every and step % tc.eval_every == 0 and step < total:
                _eval_and_log(model, index, annotations, encode, config, step, mlog, log)
        if total > start:
            save(total)
    save_xpool(model, workdir)
    result = {"step": total, "losses": losses,
              "eval": _eval_and_log(model, index, annotations, encode, config, total, mlog, log)
              if evaluate_at_end else {}}
    mlog.close()
    return result


def _eval_and_log(model, index, annotations, encode, config, step, mlog, log) -> dict[str, float]:
    texts, rows = retrieval_pairs(annotations, index, config.train.eval_split)
    if not len(rows):
        return {}
    res = evaluate(model, index, np.asarray(encode(texts), np.float32), rows, config)
    mlog.write(json.dumps({"step": step, "eval_split": config.train.eval_split, "num_queries": len(rows),
                           **res}) + "\n")
    mlog.flush()
    log(f"[xpool] eval ({config.train.eval_split}, {len(rows)} queries, {len(index)} videos): "
        + " ".join(f"{k}={v:.1f}" for k, v in res.items() if k.endswith(("R1", "R5", "R10", "MedR"))))
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ivcr_jax.retrieval.train [--config configs/xpool.py[:tiny]] --index I --annotations A --workdir W``."""
    p = argparse.ArgumentParser(prog="python -m ivcr_jax.retrieval.train", description=__doc__.split("\n")[0])
    p.add_argument("--index", required=True, help="index directory (python -m ivcr_jax.retrieval.index)")
    p.add_argument("--annotations", required=True, help="IVCR-format JSON")
    p.add_argument("--workdir", required=True)

    def body() -> int:
        config, args = cli.parse(argv, p, default_config="configs/xpool.py")
        train(config, args.index, args.annotations, args.workdir)
        return 0
    return cli.run(body, known=USER_ERRORS + (CheckpointError,))


if __name__ == "__main__":
    raise SystemExit(main())
