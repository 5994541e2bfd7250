"""The optimizer: schedule, decay mask, multipliers, clipping and gradient accumulation."""
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from ivcr_jax.cli import load_config
from ivcr_jax.train import optim


def _cfg(**kw):
    c = mlc.ConfigDict(dict(lr=3e-5, min_lr=1e-5, warmup_init_lr=1e-6, warmup_steps=10, steps=110,
                            weight_decay=0.05, b1=0.9, b2=0.999, clip_norm=1.0, lr_mults=(),
                            grad_accum=1))
    c.update(kw)
    return c


def _params():
    return {"qformer": {"layer": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,)),
                                  "norm": {"scale": jnp.ones((4,))}}},
            "llama_proj": {"kernel": jnp.ones((4, 2))}}


def test_schedule_warms_up_then_cosines_to_the_floor():
    paper = load_config("configs/paper.py").train
    s = optim.schedule(paper)
    w = int(paper.warmup_steps)
    assert float(s(0)) == pytest.approx(1e-6, rel=1e-5)
    assert float(s(w)) == pytest.approx(3e-5, rel=1e-5)
    assert float(s(w // 2)) == pytest.approx((1e-6 + 3e-5) / 2, rel=1e-3)
    assert float(s(int(paper.steps))) == pytest.approx(1e-5, rel=1e-5)
    mid = w + (int(paper.steps) - w) // 2
    assert float(s(mid)) == pytest.approx((3e-5 + 1e-5) / 2, rel=1e-3)


def test_decay_mask_skips_biases_norms_and_vectors():
    m = optim.decay_mask(_params())
    assert m["qformer"]["layer"]["kernel"] and m["llama_proj"]["kernel"]
    assert not m["qformer"]["layer"]["bias"] and not m["qformer"]["layer"]["norm"]["scale"]


def test_lr_multipliers_by_regex_first_match_wins():
    cfg = _cfg(lr_mults=((r"llama_proj/.*", 10.0), (r".*", 0.5)), weight_decay=0.0, clip_norm=0.0)
    p = _params()
    tx, _ = optim.make_optimizer(cfg, p)
    g = jax.tree.map(jnp.ones_like, p)
    up, _ = tx.update(g, tx.init(p), p)
    base = -float(optim.schedule(cfg)(0))   # Adam's first step: ±lr per element
    np.testing.assert_allclose(up["llama_proj"]["kernel"], 10.0 * base, rtol=1e-4)
    np.testing.assert_allclose(up["qformer"]["layer"]["kernel"], 0.5 * base, rtol=1e-4)


def test_clipping_bounds_the_global_norm():
    cfg = _cfg(weight_decay=0.0)
    p = _params()
    clip = optax.clip_by_global_norm(cfg.clip_norm)
    g = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), p)
    clipped, _ = clip.update(g, clip.init(p))
    assert float(optax.global_norm(clipped)) == pytest.approx(1.0, rel=1e-5)


def test_gradient_accumulation_equals_the_mean_gradient_step():
    """k micro-batches with accumulation = one update on their mean gradient, at the rate of the
    k-th batch; parameters do not move in between."""
    k = 3
    p = _params()
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p) for _ in range(2 * k)]

    acc_tx, lr = optim.make_optimizer(_cfg(grad_accum=k), p)
    st = acc_tx.init(p)
    q = p
    seen = []
    for g in grads:
        up, st = acc_tx.update(g, st, q)
        q = optax.apply_updates(q, up)
        seen.append(q)

    # Reference: plain AdamW whose u-th update uses lr(u·k + k − 1), fed the mean gradients.
    plain = optax.chain(*plain_chain(_cfg(), p, lambda u: lr(u * k + k - 1)))
    rs = plain.init(p)
    r = p
    for u in range(2):
        mean = jax.tree.map(lambda *xs: sum(xs) / k, *grads[u * k:(u + 1) * k])
        up, rs = plain.update(mean, rs, r)
        r = optax.apply_updates(r, up)
        for leaf_a, leaf_b in zip(jax.tree.leaves(seen[(u + 1) * k - 1]), jax.tree.leaves(r)):
            np.testing.assert_allclose(leaf_a, leaf_b, rtol=1e-6, atol=1e-9)
    for leaf_a, leaf_b in zip(jax.tree.leaves(seen[k - 2]), jax.tree.leaves(p)):
        np.testing.assert_array_equal(leaf_a, leaf_b)


def plain_chain(cfg, p, lr):
    return [optax.clip_by_global_norm(cfg.clip_norm), optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=1e-8),
            optax.add_decayed_weights(cfg.weight_decay, mask=optim.decay_mask(p)),
            optax.scale_by_learning_rate(lr)]
