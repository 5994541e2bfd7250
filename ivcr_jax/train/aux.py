"""The video-index (L_V) and moment (L_C) losses as one object per ``train.aux_loss_mode``.

Paper §4: L = L_LM + α·L_V + β·L_C. Each mode says, once, what it adds where:

* ``prepare(host_batch)`` — on the host, before the batch goes to the devices;
* ``forward(model, batch, rng)`` and ``terms(out, extra, batch)`` — inside the jitted step: the
  LM head's output ``out`` (the logits, or with ``lm_chunk > 0`` a ``losses.HiddenHead``: hidden
  states and the head's kernel, for the blockwise loss) and the differentiable loss terms
  ``{name: (weight, value)}`` added to L_LM;
* ``outputs(pred)`` — what the step returns for the host to read after it (``pred``: the
  teacher-forced argmax the LM loss computes when ``needs_argmax``);
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

``lm_chunk`` (``train.lm_loss_chunk``): 0, the forward computes the ``[B, K, V]`` logits (``[B, S,
V]`` for ``differentiable``, which reads them everywhere); > 0, no forward path forms them: the LM
loss (and argmax) run over vocabulary blocks of that size from the hidden states
(``losses.chunked_lm_loss``), and the differentiable terms take logits at their few positions only.
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
    needs_argmax = False    # whether outputs() reads the teacher-forced argmax

    def __init__(self, alpha: float = 0.01, beta: float = 0.01, start_step: int = 0, lm_chunk: int = 0):
        self.alpha, self.beta = float(alpha), float(beta)
        self.start_step = int(start_step)
        if isinstance(lm_chunk, bool) or int(lm_chunk) != lm_chunk or lm_chunk < 0:
            raise ValueError(f"train.lm_loss_chunk must be an integer >= 0 (0 = full logits), got {lm_chunk!r}")
        self.lm_chunk = int(lm_chunk)

    def prepare(self, host_batch: dict) -> dict:
        return host_batch

    def forward(self, model, batch: Mapping[str, Any], rng):
        # ``loss_index`` (train.lm_head="supervised"): logits at the supervised positions only.
        if self.lm_chunk:
            out = model(batch, rng=rng, compute_logits=False)
            return self.hidden_head(out.hidden, model.llama.lm_head_weight(), batch), None
        return model(batch, rng=rng, logits_at=batch.get("loss_index")).logits, None

    def hidden_head(self, hidden, kernel, batch) -> losses.HiddenHead:
        """The LM loss's input without logits: ``hidden [B, S, D]`` at ``loss_index`` when given."""
        index = batch.get("loss_index")
        if index is not None:
            hidden = jnp.take_along_axis(hidden, jnp.maximum(index, 0)[..., None], axis=1)   # [B, K, D]
        return losses.HiddenHead(hidden, kernel, self.lm_chunk)

    def terms(self, out, extra, batch) -> dict[str, tuple[float, jax.Array]]:
        return {}

    def outputs(self, pred):
        return None

    def report(self, metrics: dict, outputs, host_batch: Mapping[str, Any], mesh) -> None:
        metrics.pop("aux_on", None)


class Faithful(Off):
    """The reference's L_V / L_C from the teacher-forced argmax (reference-architecture §8.6)."""

    name = "faithful"
    needs_argmax = True

    def __init__(self, tokenizer, alpha: float = 0.01, beta: float = 0.01, start_step: int = 0,
                 select: str = "videotokens", lm_chunk: int = 0):
        super().__init__(alpha, beta, start_step, lm_chunk)
        if select not in losses.FAITHFUL_SELECTS:
            raise ValueError(f"train.faithful_select must be one of {losses.FAITHFUL_SELECTS}, got {select!r}")
        self.tokenizer, self.select = tokenizer, select

    def outputs(self, pred):
        return pred   # [B, K] int32 argmax ids at the loss positions

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

    def __init__(self, tokenizer, alpha: float = 0.01, beta: float = 0.01, start_step: int = 0,
                 lm_chunk: int = 0):
        super().__init__(alpha, beta, start_step, lm_chunk)
        self.tokenizer = tokenizer
        self.digit_ids = digit_ids(tokenizer)

    def prepare(self, host_batch: dict) -> dict:
        return aux_losses.add_targets(host_batch, self.tokenizer)

    def forward(self, model, batch, rng):
        if self.lm_chunk:
            main, ext, kernel = aux_losses.forward_hidden_with_candidates(model, batch, rng)
            return self.hidden_head(main, kernel, batch), (main, ext, kernel)
        return aux_losses.forward_with_candidates(model, batch, rng)   # logits [B, S, V], [B, K*C, V]

    def terms(self, out, extra, batch):
        if self.lm_chunk:
            v, c = aux_losses.differentiable_aux_hidden(*extra, batch, self.digit_ids, self.lm_chunk)
        else:
            v, c = aux_losses.differentiable_aux(out, extra, batch, self.digit_ids)
        return {"video": (self.alpha, v), "moment": (self.beta, c)}


AuxMode = Off  # the interface every mode implements (Off is the base class)


def make_aux_mode(name: str, tokenizer=None, *, alpha: float = 0.01, beta: float = 0.01,
                  start_step: int = 0, faithful_select: str = "videotokens", lm_chunk: int = 0) -> Off:
    """The mode object of ``train.aux_loss_mode`` (with ``train.aux_start_step``,
    ``train.lm_loss_chunk`` and, for ``faithful``, ``train.faithful_select``)."""
    if name == "off":
        return Off(alpha, beta, start_step, lm_chunk)
    if name == "faithful":
        return Faithful(tokenizer, alpha, beta, start_step, faithful_select, lm_chunk)
    if name == "differentiable":
        return Differentiable(tokenizer, alpha, beta, start_step, lm_chunk)
    raise ValueError(f"train.aux_loss_mode must be faithful|differentiable|off, got {name!r}")
