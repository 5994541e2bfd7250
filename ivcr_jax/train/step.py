"""The jitted training step: one ``jax.jit`` over an explicit ``nnx.split`` of the model.

``graphdef, params, frozen = nnx.split(model, trainable, ...)``: gradients and optimizer state
exist only for ``params`` (image Q-Former, video Q-Former, queries, frame position table,
``llama_proj``, LoRA A/B); the frozen ViT and LLaMA base are a plain, non-donated input. The
train state (params, optimizer state, step, RNG) is donated, so it is updated in place.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ivcr_jax.train import losses as L


def init_state(params, tx: optax.GradientTransformation, seed: int, rng_impl: str | None = None) -> dict[str, Any]:
    """Params, optimizer state, step and the base key (stored as raw key data for checkpoints)."""
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed, impl=rng_impl))}


def state_shardings(params, tx: optax.GradientTransformation, seed: int, mesh, rng_impl: str | None = None):
    """Shardings of the whole train state: parameters and the optimizer's moment trees by the
    parameters' logical names (optax keeps their ``Variable`` wrappers), scalars and the key replicated."""
    from ivcr_jax import sharding

    return sharding.state_shardings(jax.eval_shape(lambda p: init_state(p, tx, seed, rng_impl), params), mesh)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: Callable, *,
                    aux_mode: str = "faithful", alpha: float = 0.01, beta: float = 0.01,
                    digit_ids=None, rng_impl: str | None = None) -> Callable:
    """Build ``step(state, frozen, batch) -> (state, metrics)`` (not yet jitted)."""
    if aux_mode not in ("faithful", "differentiable", "off"):
        raise ValueError(f"train.aux_loss_mode must be faithful|differentiable|off, got {aux_mode!r}")

    def step(state, frozen, batch):
        # Dropout keys: the base key folded with the step, so a resumed run draws the same masks.
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl=rng_impl), state["step"])

        def loss_fn(params):
            model = nnx.merge(graphdef, params, frozen)
            if aux_mode == "differentiable":
                from ivcr_jax.train import aux_losses
                logits, ext = aux_losses.forward_with_candidates(model, batch, rng)
            else:
                logits = model(batch, rng=rng).logits
            lm, ntok = L.lm_loss(logits, batch["labels"], batch.get("weight"))
            parts = {"lm": lm}
            total = lm
            if aux_mode == "differentiable":
                v, c = aux_losses.differentiable_aux(logits, ext, batch, digit_ids)
                parts.update(video=v, moment=c)
                total = total + alpha * v + beta * c
            pred = jnp.argmax(logits, axis=-1).astype(jnp.int32) if aux_mode == "faithful" else None
            return total, (parts, ntok, pred)

        (total, (parts, ntok, pred)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(total) & jnp.isfinite(optax.global_norm(grads))
        # A non-finite loss leaves the state untouched (the loop then stops the run).
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        params, opt = keep(params, state["params"]), keep(opt, state["opt"])
        metrics = {"loss": total, **{f"loss/{k}": v for k, v in parts.items()},
                   "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
                   "lr": schedule(state["step"]), "tokens": ntok,
                   "finite": finite}
        new = {"params": params, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}
        return new, metrics, pred

    return step


def jit_train_step(step: Callable, state_shardings=None, frozen_shardings=None) -> Callable:
    """``jax.jit`` the step with the train state donated."""
    kw = {}
    if state_shardings is not None:
        kw = dict(in_shardings=(state_shardings, frozen_shardings, None),
                  out_shardings=(state_shardings, None, None))
    return jax.jit(step, donate_argnums=(0,), **kw)
