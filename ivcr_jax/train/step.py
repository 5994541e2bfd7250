"""The jitted training step: one ``jax.jit`` over an explicit ``nnx.split`` of the model.

``graphdef, params, frozen = nnx.split(model, trainable, ...)``: gradients and optimizer state
exist only for ``params`` (image Q-Former, video Q-Former, queries, frame position table,
``llama_proj``, LoRA A/B); the frozen ViT and LLaMA base are a plain, non-donated input. The
train state (params, optimizer state, step, RNG) is donated, so it is updated in place.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ivcr_jax import sharding
from ivcr_jax.train import losses as L
from ivcr_jax.train.aux import AuxMode


def init_state(params, tx: optax.GradientTransformation, seed: int, rng_impl: str | None = None) -> dict[str, Any]:
    """Params, optimizer state, step and the base key (stored as raw key data for checkpoints)."""
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed, impl=rng_impl))}


def state_shardings(params, tx: optax.GradientTransformation, seed: int, mesh, rng_impl: str | None = None):
    """Shardings of the whole train state: parameters and the optimizer's moment trees by the
    parameters' logical names (optax keeps their ``Variable`` wrappers), scalars and the key replicated."""
    return sharding.state_shardings(jax.eval_shape(lambda p: init_state(p, tx, seed, rng_impl), params), mesh)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: Callable, aux: AuxMode, *,
                    rng_impl: str | None = None, lm_reduction: str = "token_mean") -> Callable:
    """Build ``step(state, frozen, batch) -> (state, metrics, outputs)`` (not yet jitted).

    ``aux`` (``train/aux.py``) is the aux-loss mode: its forward pass (logits, or hidden states
    for the blockwise LM loss when built with ``train.lm_loss_chunk > 0``), its differentiable terms
    (added to the LM loss with their weights from ``aux.start_step`` on) and the outputs the host
    reads after the step. ``lm_reduction`` is ``train.lm_loss_reduction`` (``losses.lm_head_loss``).
    """
    if lm_reduction not in L.LM_REDUCTIONS:
        raise ValueError(f"train.lm_loss_reduction must be one of {L.LM_REDUCTIONS}, got {lm_reduction!r}")
    start = int(getattr(aux, "start_step", 0))

    def step(state, frozen, batch):
        # Dropout keys: the base key folded with the step, so a resumed run draws the same masks.
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl=rng_impl), state["step"])
        # The aux terms from batch ``start`` on: a traced comparison, so the step compiles once.
        aux_on = state["step"] >= start

        def loss_fn(params):
            model = nnx.merge(graphdef, params, frozen)
            out, extra = aux.forward(model, batch, rng)
            lm, ntok, pred = L.lm_head_loss(out, batch["labels"], batch.get("weight"), batch.get("loss_index"),
                                            reduction=lm_reduction, argmax=aux.needs_argmax)
            parts, total = {"lm": lm}, lm
            for name, (weight, value) in aux.terms(out, extra, batch).items():
                value = jnp.where(aux_on, value, 0.0)   # 0 (and no gradient) before the start
                parts[name] = value
                total = total + weight * value
            return total, (parts, ntok, aux.outputs(pred))

        (total, (parts, ntok, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(total) & jnp.isfinite(optax.global_norm(grads))
        # A non-finite loss leaves the state untouched (the loop then stops the run).
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        params, opt = keep(params, state["params"]), keep(opt, state["opt"])
        metrics = {"loss": total, **{f"loss/{k}": v for k, v in parts.items()},
                   "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
                   "lr": schedule(state["step"]), "tokens": ntok,
                   "finite": finite, "aux_on": aux_on.astype(jnp.float32)}
        new = {"params": params, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}
        return new, metrics, outputs

    return step


def jit_train_step(step: Callable, state_shardings=None, frozen_shardings=None) -> Callable:
    """``jax.jit`` the step with the train state donated."""
    kw = {}
    if state_shardings is not None:
        kw = dict(in_shardings=(state_shardings, frozen_shardings, None),
                  out_shardings=(state_shardings, None, None))
    return jax.jit(step, donate_argnums=(0,), **kw)
