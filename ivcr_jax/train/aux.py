"""The video-index (L_V) and moment (L_C) losses as one object per ``train.aux_loss_mode``.

Paper §4: L = L_LM + α·L_V + β·L_C. Each mode says, once, what it adds where:

* ``prepare(host_batch)`` — on the host, before the batch goes to the devices;
* ``forward(model, batch, rng)`` and ``terms(logits, extra, batch)`` — inside the jitted step: the
  logits, and the differentiable loss terms ``{name: (weight, value)}`` added to L_LM;
* ``outputs(logits)`` — what the step returns for the host to read after it;
* ``report(metrics, outputs, host_batch, mesh)`` — on the host, after the step: logged losses.

``off``: L_LM only. ``faithful``: the reference's L_V / L_C, computed from the argmax-decoded
answer (``train/losses.py`` ``faithful_aux``; ``train.faithful_select`` says how a sample's term
is chosen): logged, constants for the gradient. ``differentiable``: real L_V / L_C
(``train/aux_losses.py``).

``start_step`` (``train.aux_start_step``): the aux terms count from the batch of that index on
(0-based, as the train state's ``step``); before it they are 0 and the loss is L_LM. The step
compares its traced ``step`` counter with it, so it compiles once; it reports ``aux_on`` (1.0 /
0.0) for the host-side ``report``. The reference turns them on from epoch 1
(``ivcr/runners/runner_base.py : RunnerBase.train``: ``flag = 1`` when ``cur_epoch >= 1``, else
2), i.e. ``start_step`` = batches per epoch.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ivcr_jax import sharding
from ivcr_jax.train import aux_losses, losses
from ivcr_jax.tokenizer import digit_ids

__all__ = ["AuxMode", "Differentiable", "Faithful", "Off", "make_aux_mode"]


class Off:
    """L_LM only."""

    name = "off"
    batch_targets = False   # whether the batch carries data/batch.py's AUX arrays

    def __init__(self, alpha: float = 0.01, beta: float = 0.01, start_step: int = 0):
        self.alpha, self.beta = float(alpha), float(beta)
        self.start_step = int(start_step)

    def prepare(self, host_batch: dict) -> dict:
        return host_batch

    def forward(self, model, batch: Mapping[str, Any], rng):
        # ``loss_index`` (train.lm_head="supervised"): logits at the supervised positions only.
        return model(batch, rng=rng, logits_at=batch.get("loss_index")).logits, None

    def terms(self, logits, extra, batch) -> dict[str, tuple[float, jax.Array]]:
        return {}

    def outputs(self, logits):
        return None

    def report(self, metrics: dict, outputs, host_batch: Mapping[str, Any], mesh) -> None:
        metrics.pop("aux_on", None)


class Faithful(Off):
    """The reference's L_V / L_C from the teacher-forced argmax (reference-architecture §8.6)."""

    name = "faithful"

    def __init__(self, tokenizer, alpha: float = 0.01, beta: float = 0.01, start_step: int = 0,
                 select: str = "videotokens"):
        super().__init__(alpha, beta, start_step)
        if select not in losses.FAITHFUL_SELECTS:
            raise ValueError(f"train.faithful_select must be one of {losses.FAITHFUL_SELECTS}, got {select!r}")
        self.tokenizer, self.select = tokenizer, select

    def outputs(self, logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def report(self, metrics: dict, outputs, host_batch, mesh) -> None:
        # Every process sees the same aux_on (one replicated scalar), so all or none gather.
        if not metrics.pop("aux_on", 1.0):
            metrics["loss/video"] = metrics["loss/moment"] = 0.0
            metrics["loss"] = metrics["loss/lm"]
            return
        aux = losses.combine_across_processes(
            losses.faithful_aux(sharding.to_host_local(outputs, mesh), host_batch, self.tokenizer, self.select))
        metrics["loss/video"], metrics["loss/moment"] = aux["video"], aux["moment"]
        metrics["loss"] = metrics["loss/lm"] + self.alpha * aux["video"] + self.beta * aux["moment"]


class Differentiable(Off):
    """L_V over candidates scored by sequence log-probability, L_C from expected digit spans."""

    name = "differentiable"
    batch_targets = True

    def __init__(self, tokenizer, alpha: float = 0.01, beta: float = 0.01, start_step: int = 0):
        super().__init__(alpha, beta, start_step)
        self.tokenizer = tokenizer
        self.digit_ids = digit_ids(tokenizer)

    def prepare(self, host_batch: dict) -> dict:
        return aux_losses.add_targets(host_batch, self.tokenizer)

    def forward(self, model, batch, rng):
        return aux_losses.forward_with_candidates(model, batch, rng)

    def terms(self, logits, extra, batch):
        v, c = aux_losses.differentiable_aux(logits, extra, batch, self.digit_ids)
        return {"video": (self.alpha, v), "moment": (self.beta, c)}


AuxMode = Off  # the interface every mode implements (Off is the base class)


def make_aux_mode(name: str, tokenizer=None, *, alpha: float = 0.01, beta: float = 0.01,
                  start_step: int = 0, faithful_select: str = "videotokens") -> Off:
    """The mode object of ``train.aux_loss_mode`` (with ``train.aux_start_step`` and, for
    ``faithful``, ``train.faithful_select``)."""
    if name == "off":
        return Off(alpha, beta, start_step)
    if name == "faithful":
        return Faithful(tokenizer, alpha, beta, start_step, faithful_select)
    if name == "differentiable":
        return Differentiable(tokenizer, alpha, beta, start_step)
    raise ValueError(f"train.aux_loss_mode must be faithful|differentiable|off, got {name!r}")
