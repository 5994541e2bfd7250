"""X-Pool: pooling against a direct NumPy transcription of the reference, the loss by hand, the clamp."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ivcr_jax.models.params import flat_state
from ivcr_jax.models.xpool import (XPool, XPoolConfig, clamp_logit_scale, infonce, pair_cosine,
                                   similarity_matrix)


def _perturbed(config, seed=0):
    """A model whose identity-initialised weights are replaced by random ones (so errors show)."""
    model = XPool(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for k, var in flat_state(model).items():
        if k == "logit_scale":
            continue
        v = np.asarray(var[...])
        var[...] = jnp.asarray(v + rng.normal(0, 0.3, v.shape).astype(np.float32))
    return model


def _np_ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_xpool_pool(w, text, frames, heads, eps):
    """modules/transformer.py written out in NumPy (float64), one (video, text) pair at a time."""
    lin = lambda x, p: x @ p["kernel"] + p["bias"]
    t_all = _np_ln(text, w["layer_norm1"], eps)
    f_all = _np_ln(frames, w["layer_norm1"], eps)
    n_v, n_f, d = frames.shape
    hd = d // heads
    out = np.zeros((n_v, text.shape[0], d))
    ca = w["cross_attn"]
    for v in range(n_v):
        k = lin(f_all[v], ca["k_proj"]).reshape(n_f, heads, hd)
        val = lin(f_all[v], ca["v_proj"]).reshape(n_f, heads, hd)
        for t in range(text.shape[0]):
            q = lin(t_all[t], ca["q_proj"]).reshape(heads, hd)
            o = np.zeros((heads, hd))
            for h in range(heads):
                logits = k[:, h] @ q[h] / math.sqrt(hd)
                a = np.exp(logits - logits.max())
                a /= a.sum()                                  # softmax over frames
                o[h] = a @ val[:, h]
            attn = lin(o.reshape(d), ca["out_proj"])
            attn = _np_ln(attn, w["layer_norm2"], eps)
            out[v, t] = _np_ln(attn + lin(attn, w["linear_proj"]), w["layer_norm3"], eps)
    return out


@nnx.jit(static_argnames=("method",))
def _run(model, *args, method="__call__", **kw):
    """Jitted model calls: eager op-by-op dispatch is slow on the 2-core CI machine."""
    return getattr(model, method)(*args, **kw)


def _weights(model):
    def to_np(x):
        return {k: (to_np(v) if isinstance(v, dict) else np.asarray(v, np.float64)) for k, v in x.items()}
    return to_np(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("heads", [1, 2])
def test_pooling_and_sims_match_numpy_reference(heads):
    cfg = XPoolConfig(embed_dim=16, num_heads=heads)
    model = _perturbed(cfg, seed=heads)
    rng = np.random.default_rng(1)
    text = rng.normal(size=(3, 16)).astype(np.float32)
    frames = rng.normal(size=(4, 5, 16)).astype(np.float32)
    pooled = np.asarray(_run(model, jnp.asarray(text), jnp.asarray(frames), method="pool"))
    ref = _np_xpool_pool(_weights(model), text.astype(np.float64), frames.astype(np.float64), heads, 1e-5)
    assert pooled.shape == (4, 3, 16)                       # [num_vids, num_texts, D]
    np.testing.assert_allclose(pooled, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    if heads == 1:   # the similarity on top of the pooling (one compilation is enough)
        sims = np.asarray(_run(model, jnp.asarray(text), jnp.asarray(frames)))
        tn = text / np.linalg.norm(text, axis=-1, keepdims=True)      # raw text, not LN1(text)
        rn = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
        np.testing.assert_allclose(sims, np.einsum("td,vtd->tv", tn, rn), atol=2e-5)


def test_identity_initialisation_and_logit_scale():
    model = XPool(XPoolConfig(embed_dim=8), rngs=nnx.Rngs(0))
    flat = {k: np.asarray(v[...]) for k, v in flat_state(model).items()}
    projections = [k for k in flat if ("proj" in k or "linear" in k)]
    assert len(projections) == 10                                       # q, k, v, out, linear x (W, b)
    for k in projections:
        expect = np.eye(8) if k.endswith("kernel") else np.zeros(8)
        np.testing.assert_array_equal(flat[k], expect, err_msg=k)
    assert flat["logit_scale"] == pytest.approx(math.log(1 / 0.07))
    assert model.layer_norm1.eps == 1e-5
    # With identity projections, one frame per video pools to LN3(2 * LN2(LN1(frame))) = LN(frame).
    f = np.random.default_rng(0).normal(size=(2, 1, 8)).astype(np.float32)
    out = np.asarray(_run(model, jnp.ones((1, 8)), jnp.asarray(f), method="pool"))[:, 0]
    z = (f[:, 0] - f[:, 0].mean(-1, keepdims=True)) / np.sqrt(f[:, 0].var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, z, atol=1e-4)


def test_infonce_matches_hand_computation():
    sims = np.array([[0.9, 0.1, -0.2], [0.3, 0.5, 0.0], [-0.1, 0.4, 0.7]], np.float32)
    scale = math.log(10.0)
    logits = sims.astype(np.float64) * 10.0
    t2v = -np.mean([logits[i, i] - math.log(sum(math.exp(x) for x in logits[i])) for i in range(3)])
    v2t = -np.mean([logits[i, i] - math.log(sum(math.exp(logits[j, i]) for j in range(3))) for i in range(3)])
    got = float(jax.jit(infonce)(jnp.asarray(sims), jnp.asarray(scale)))
    assert got == pytest.approx((t2v + v2t) / 2, rel=1e-6)
    # video_ids masks off-diagonal entries of the same video (texts 0 and 1 describe one video).
    got_dedup = float(jax.jit(infonce)(jnp.asarray(sims), jnp.asarray(scale), video_ids=jnp.array([7, 7, 3])))
    l = logits.copy()
    l[0, 1] = l[1, 0] = -np.inf
    ls = lambda row: np.log(np.sum(np.exp(row[np.isfinite(row)])))
    t2v = -np.mean([l[i, i] - ls(l[i]) for i in range(3)])
    v2t = -np.mean([l[i, i] - ls(l[:, i]) for i in range(3)])
    assert got_dedup == pytest.approx((t2v + v2t) / 2, rel=1e-6)


def test_logit_scale_clamped_to_ln100():
    model = XPool(XPoolConfig(embed_dim=8), rngs=nnx.Rngs(0))
    model.logit_scale[...] = jnp.asarray(7.0)
    clamp_logit_scale(model)
    assert float(model.logit_scale[...]) == pytest.approx(math.log(100.0))
    model.logit_scale[...] = jnp.asarray(1.0)
    clamp_logit_scale(model)
    assert float(model.logit_scale[...]) == 1.0                          # only an upper bound


def test_dropout_only_with_rng():
    model = _perturbed(XPoolConfig(embed_dim=8), seed=3)
    t = jnp.ones((2, 8))
    f = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32))
    a, b = _run(model, t, f, method="pool"), _run(model, t, f, method="pool")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # an rbg key: threefry's compile alone costs seconds on a 2-core machine
    c = _run(model, t, f, method="pool", rng=jax.random.key(1, impl="rbg"))
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3


def test_chunked_similarity_matches_full_matrix():
    model = _perturbed(XPoolConfig(embed_dim=8), seed=4)
    rng = np.random.default_rng(2)
    text = rng.normal(size=(7, 8)).astype(np.float32)
    frames = rng.normal(size=(11, 3, 8)).astype(np.float32)
    mask = np.ones((11, 3), bool)
    mask[2, 1:] = False                                                   # a 1-frame video
    full = np.asarray(_run(model, jnp.asarray(text), jnp.asarray(frames), frame_mask=jnp.asarray(mask)))
    chunked = similarity_matrix(model, text, frames, frame_mask=mask, text_chunk=3, video_chunk=4)
    np.testing.assert_allclose(chunked, full, atol=1e-6)
    # pooling a masked video equals pooling its real frames only
    one = np.asarray(_run(model, jnp.asarray(text), jnp.asarray(frames[2:3, :1])))
    np.testing.assert_allclose(full[:, 2:3], one, atol=1e-5)
    # per-text candidate scoring (re-ranking) agrees with the full matrix
    cand = np.array([[3, 0], [10, 4]])
    got = np.asarray(_run(model, jnp.asarray(text[:2]), jnp.asarray(frames[cand]), method="pool_pairs"))
    np.testing.assert_allclose(got, full[np.arange(2)[:, None], cand], atol=1e-5)


def test_pair_cosine_is_per_pair():
    text = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    pooled = jnp.array([[[3.0, 0.0], [1.0, 1.0]]])                        # one video, two texts
    s = np.asarray(jax.jit(pair_cosine)(text, pooled))
    np.testing.assert_allclose(s, [[1.0], [1 / math.sqrt(2)]], atol=1e-6)
