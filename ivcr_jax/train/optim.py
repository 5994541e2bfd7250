"""Optimizer (optax): AdamW with the reference schedule, decay mask, clipping, accumulation
and per-group learning-rate multipliers (reference-architecture §3 hyper-parameters).

Schedule: linear warmup from ``warmup_init_lr`` to ``lr`` over ``warmup_steps``, then cosine
to ``min_lr`` at ``steps`` (LAVIS ``linear_warmup_cosine_lr``). Weight decay skips biases,
norms and every parameter with fewer than two dimensions, as the reference does.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ivcr_jax.models.params import map_with_path


def schedule(cfg) -> optax.Schedule:
    warm = optax.linear_schedule(cfg.warmup_init_lr, cfg.lr, max(int(cfg.warmup_steps), 1))
    decay_steps = max(int(cfg.steps) - int(cfg.warmup_steps), 1)
    cos = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr / cfg.lr)
    return optax.join_schedules([warm, cos], [int(cfg.warmup_steps)])


def decay_mask(params) -> Any:
    """True where weight decay applies: ≥2-D and not a norm / bias / embedding-position table."""
    def f(path: str, x) -> bool:
        name = path.rsplit("/", 1)[-1]
        if x.ndim < 2 or name in ("bias", "scale"):
            return False
        return not re.search(r"(^|/)(ln|norm|layernorm|LayerNorm)", path)
    return map_with_path(f, params)


def lr_multipliers(params, mults) -> Any:
    """Per-leaf learning-rate multiplier from ``((regex, mult), ...)`` (first match wins)."""
    regs = [(re.compile(p), float(m)) for p, m in mults]

    def f(path: str, x):
        for r, m in regs:
            if r.fullmatch(path):
                return m
        return 1.0
    return map_with_path(f, params)


def scale_by_multipliers(mults) -> optax.GradientTransformation:
    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults), state
    return optax.GradientTransformation(init, update)


def make_optimizer(cfg, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW for ``params`` (the trainable subset) from the ``config.train`` node.

    Returns ``(tx, lr)`` where ``lr(step)`` is the learning rate of the step-th batch. Steps count
    batches; with ``grad_accum = k`` the parameters change every k batches and update ``u`` uses
    the rate of its last batch, ``lr(u·k + k − 1)`` (as LAVIS, which steps its scheduler every
    iteration and its optimizer every k).
    """
    lr = schedule(cfg)
    k = int(cfg.grad_accum)
    update_lr = lr if k <= 1 else (lambda count: lr(count * k + k - 1))
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=1e-8))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(params)))
    if cfg.lr_mults:
        parts.append(scale_by_multipliers(lr_multipliers(params, cfg.lr_mults)))
    parts.append(optax.scale_by_learning_rate(update_lr))
    tx = optax.chain(*parts)
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k)
    return tx, lr
