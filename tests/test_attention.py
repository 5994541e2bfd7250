"""The two implementations of ``layers.attention`` give the same values and gradients.

``"einsum"`` is the CPU default (two batched matmuls, the softmax in fp32), ``"xla"`` is
``jax.nn.dot_product_attention`` (the GPU/TPU default): they must agree with and without
grouped-query heads, with a padding mask, causal or not, in fp32 and in bf16.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ivcr_jax.models.layers import _attention_einsum, _causal_block, attention


def _inputs(dtype, heads, kv_heads, *, T=7, S=7, B=2, D=8, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, heads, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, kv_heads, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, kv_heads, D), jnp.float32).astype(dtype)
    valid = jnp.arange(S)[None, :] < jnp.array([S, S - 3])[:, None]    # row 1: 3 padded keys
    return q, k, v, valid[:, None, None, :]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_einsum_attention_equals_dot_product_attention(dtype, tol, heads, kv_heads, causal, masked):
    q, k, v, mask = _inputs(dtype, heads, kv_heads)
    mask = mask if masked else None

    def run(impl):
        def f(q, k, v):
            out = attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)
            return (out.astype(jnp.float32) * jnp.cos(jnp.arange(out.size).reshape(out.shape))).sum(), out
        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    out_e, g_e = run("einsum")
    out_x, g_x = run("xla")
    assert out_e.dtype == out_x.dtype == dtype
    np.testing.assert_allclose(np.asarray(out_e, np.float32), np.asarray(out_x, np.float32), atol=tol, rtol=tol)
    for a, b in zip(g_e, g_x):
        scale = float(np.abs(np.asarray(b, np.float32)).max())
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * scale, rtol=tol)


def test_an_unknown_implementation_is_refused():
    q, k, v, _ = _inputs(jnp.float32, 2, 2)
    with pytest.raises(ValueError, match="'xla' or 'einsum'"):
        attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "empty_rows"])
@pytest.mark.parametrize("block", [32, 64, 200])
def test_blocked_causal_einsum_equals_dot_product_attention(heads, kv_heads, mask_kind, block):
    """Causal self-attention in query blocks (each against the keys up to its last row) gives the
    unblocked values and gradients, including rows whose every key is masked (uniform over all S,
    as jax.nn) and a last block shorter than the others."""
    T = 150
    q, k, v, _ = _inputs(jnp.float32, heads, kv_heads, T=T, S=T, D=8)
    valid = jnp.arange(T)[None, :] < jnp.array([T, T - 40])[:, None]
    if mask_kind == "none":
        mask = None
    elif mask_kind == "padding":
        mask = valid[:, None, None, :]
    else:  # left padding: the first 30 queries of row 1 see no real key at all
        mask = (jnp.arange(T)[None, :] >= jnp.array([0, 30])[:, None])[:, None, None, :]
    w = jnp.cos(jnp.arange(2 * T * heads * 8).reshape(2, T, heads, 8))

    def run(fn):
        def f(q, k, v):
            out = fn(q, k, v)
            return (out * w).sum(), out
        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    out_b, g_b = run(lambda q, k, v: _attention_einsum(q, k, v, mask=mask, is_causal=True,
                                                       scale=8 ** -0.5, block=block))
    out_x, g_x = run(lambda q, k, v: attention(q, k, v, mask=mask, is_causal=True, implementation="xla"))
    np.testing.assert_allclose(np.asarray(out_b), np.asarray(out_x), atol=1e-5, rtol=1e-5)
    for a, b in zip(g_b, g_x):
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=1e-5)


def test_the_causal_block_size_keeps_the_graph_small():
    assert _causal_block(128) == 128 and _causal_block(256) == 128
    assert _causal_block(2048) == 256 and -(-2048 // _causal_block(2048)) == 8
