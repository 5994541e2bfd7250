"""The training loop, top to bottom (after big_vision's ``train.py``).

    python -m ivcr_jax.train --config configs/demo.py --workdir runs/demo

Sections: mesh → input pipeline → model (frozen / trainable split) → optimizer → restore or
initialise → compiled step → loop (step, log, checkpoint). A resumed run (same workdir)
continues from the latest complete checkpoint with the data iterator where it stood, so its
losses equal those of an uninterrupted run.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from ivcr_jax import checkpoints, distributed, sharding
from ivcr_jax.cli import UsageError, output_dir
from ivcr_jax.data import features as features_lib
from ivcr_jax.experiment import Experiment
from ivcr_jax.models.params import count, trainable_filter
from ivcr_jax.train import data as data_lib
from ivcr_jax.train import logging as log_lib
from ivcr_jax.train import optim, step as step_lib
from ivcr_jax.train.aux import make_aux_mode
from ivcr_jax.train.monitor import HeldOut


class NonFiniteLoss(FloatingPointError):
    pass


def non_finite_message(step: int, m: dict, start: int, ckpt: checkpoints.Checkpointer) -> str:
    last = ckpt.latest_step()
    msg = (f"non-finite loss at step {step} (loss {m['loss']}, grad norm {m['grad_norm']}); the state was not "
           f"updated and the last good checkpoint (step {last}) in {ckpt.directory} was saved before it")
    if start and step == start + 1:
        # The restored state passed its checksums and finite check: the divergence is the config's.
        msg += (f"; this run resumed from step {start} and diverged on its first step, so a restart with the "
                f"same config repeats it: change the config (e.g. a lower train.lr) or resume an earlier step")
    return msg


class _Preemption:
    """SIGTERM → finish the current step, save, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train(exp: Experiment, workdir: str | Path, *, max_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the experiment in ``workdir``; returns a summary (losses per step, final step)."""
    if "://" in str(workdir):
        raise UsageError(f"workdir {workdir}: give a filesystem path every process can reach (a shared "
                         f"or network mount; mount gs:// buckets with gcsfuse), not a URL")
    workdir = output_dir(workdir, "workdir")
    tc = exp.train

    # --- mesh and devices ---
    distributed.initialize()
    mesh = exp.mesh()

    # --- input pipeline ---
    data = data_lib.train_data(exp)

    # --- model, frozen and trainable parts ---
    model = exp.build_model(mesh)
    print(features_lib.vision_line(exp.data.vit_features, model), flush=True)
    graphdef, params, frozen = nnx.split(model, trainable_filter(exp.trainable), ...)
    del model
    n_train, n_frozen = count(params), count(frozen)
    if n_train == 0:
        raise ValueError(f"config.trainable {exp.trainable} selects no parameter")

    # --- optimizer and schedule ---
    tx, schedule = optim.make_optimizer(tc, params)

    # --- restore or initialise ---
    state_sh = step_lib.state_shardings(params, tx, exp.seed, mesh, exp.rng_impl)
    state = jax.jit(lambda p: step_lib.init_state(p, tx, exp.seed, exp.rng_impl), out_shardings=state_sh)(params)
    del params
    ckpt = checkpoints.Checkpointer(workdir, keep=tc.keep_checkpoints)
    # The newest intact step (corrupt ones are reported and set aside); a config whose model does
    # not fit the saved state is named by its changed keys (<workdir>/config.json vs exp.config).
    start, restored = ckpt.restore_latest(checkpoints.abstract_like(state), data.iterator, config=exp.config,
                                          log=print if jax.process_index() == 0 else lambda _: None)
    start, state = (0, state) if start is None else (start, restored)
    del restored
    total = int(tc.steps if max_steps is None else min(tc.steps, max_steps))

    # --- the compiled step ---
    aux = make_aux_mode(tc.aux_loss_mode, exp.tokenizer, alpha=tc.alpha, beta=tc.beta,
                        start_step=tc.aux_start_step, faithful_select=tc.faithful_select,
                        lm_chunk=tc.lm_loss_chunk)
    # The LM head only where the next token is supervised (the differentiable aux losses read
    # logits everywhere: they get the full head, unless the blockwise loss gives them hidden states).
    supervised_head = tc.lm_head == "supervised" and (tc.lm_loss_chunk > 0 or not aux.batch_targets)
    step_fn = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, schedule, aux, rng_impl=exp.rng_impl,
                                                               lm_reduction=tc.lm_loss_reduction))

    # --- the held-out monitor ---
    # (one process only: generation over a mesh spanning processes is not supported yet)
    heldout = HeldOut(exp, graphdef, frozen, mesh) if tc.eval_every and jax.process_count() == 1 else None
    if tc.eval_every and heldout is None and jax.process_index() == 0:
        print(f"note: train.eval_every={tc.eval_every} is ignored with {jax.process_count()} processes "
              f"(the held-out monitor runs in single-process training)")

    # --- loop: step, log, checkpoint ---
    lead = jax.process_index() == 0
    if lead:
        log_lib.save_config(exp.config, workdir / "config.json", resumed=start > 0, log=print)
    title = (f"{workdir.name}: batch {tc.batch_size}, lr {tc.lr:g}, {total} steps, "
             f"aux {tc.aux_loss_mode}")
    logger = log_lib.Logger(workdir, enabled=lead, total=total, start=start, progress=progress,
                            log_every=tc.log_every, title=title)
    logger.info(log_lib.summary(exp, n_train, n_frozen, dict(mesh.shape), start, total, data.num_samples,
                                len(heldout.refs) if heldout else 0))
    history = []
    with ckpt, _Preemption() as pre:
        for step in range(start, total):
            t0 = time.perf_counter()
            host_batch = data_lib.agree_text_length(aux.prepare(next(data.iterator)))
            if supervised_head:
                host_batch = data_lib.with_loss_index(host_batch)
            batch = sharding.to_device(host_batch, mesh)
            with sharding.use_mesh(mesh):
                state, metrics, outputs = step_fn(state, frozen, batch)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not m.pop("finite"):
                ckpt.wait()
                raise NonFiniteLoss(non_finite_message(step + 1, m, start, ckpt))
            aux.report(m, outputs, host_batch, mesh)
            dt = time.perf_counter() - t0
            m["step_time"] = dt
            m["tokens_per_s"] = m["tokens"] / dt
            history.append({"step": step + 1, **m})
            last = step + 1 == total
            extra = None
            if heldout is not None and ((step + 1) % tc.eval_every == 0 or last):
                extra = heldout(state["params"])
            stop = pre.requested   # read once: the signal may arrive at any time
            save = (step + 1) % tc.ckpt_every == 0 or last or stop or ckpt.reached_preemption(step + 1)
            logger.step(step + 1, m, extra, flush=save)   # a saved step always has its metrics row
            if save:
                ckpt.save(step + 1, state, data.iterator, force=True)
            if stop:
                logger.info(f"SIGTERM: saved step {step + 1}, exiting")
                break
    logger.close(data.report())
    return {"history": history, "final_step": start + len(history), "workdir": str(workdir),
            "state": state, "frozen": frozen, "graphdef": graphdef}
