"""The blockwise LM loss (``train.lm_loss_chunk > 0``, issue 15 item 3): the CE, its gradients, the
faithful argmax and the differentiable aux terms from the hidden states and the lm_head kernel,
equal to the full-logits path, without a ``[B, K, V]`` array."""
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ivcr_jax.cli import UsageError, load_config
from ivcr_jax.experiment import Experiment
from ivcr_jax.models.llama import Llama, LlamaConfig
from ivcr_jax.models.lora import LoRAConfig
from ivcr_jax.tokenizer import bundled_test_tokenizer, load_tokenizer
from ivcr_jax.train import aux_losses, losses, step as step_lib
from ivcr_jax.train.aux import make_aux_mode
from ivcr_jax.train.loop import train

V, D = 97, 16   # a prime vocabulary: no block size below it divides it


def _batch(seed=0, B=4, S=14):
    """Hidden states, kernel, labels (answers of 2, 7, 4 tokens, −100 elsewhere) and weights (the
    last row is padding: weight 0 with its labels left in)."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, S, D)).astype(np.float32)
    kernel = (rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32) * 3
    labels = np.full((B, S), -100, np.int32)
    for b, (lo, hi) in enumerate([(11, 13), (5, 12), (9, 13), (3, 14)]):
        labels[b, lo:hi] = rng.integers(0, V, hi - lo)
    weight = np.array([1.0, 1.0, 1.0, 0.0], np.float32)
    return hidden, kernel, labels, weight


def _plain(hidden, kernel, labels, weight, index, reduction):
    """The full-logits loss as the step computes it (``Llama``'s head, then ``lm_loss``)."""
    if index is not None:
        hidden = jnp.take_along_axis(hidden, jnp.maximum(index, 0)[..., None], axis=1)
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
    return losses.lm_loss(logits, labels, weight, index, reduction), logits


def _chunked(hidden, kernel, labels, weight, index, reduction, chunk, argmax=False):
    if index is not None:
        hidden = jnp.take_along_axis(hidden, jnp.maximum(index, 0)[..., None], axis=1)
    return losses.chunked_lm_loss(hidden, kernel, labels, weight, index, reduction, chunk=chunk, argmax=argmax)


CHUNKS = [7, 32, 96, V, 4 * V]    # uneven last block, V - 1, one exact block, one block >= V


@pytest.mark.parametrize("supervised_index", [False, True], ids=["all_positions", "loss_index"])
@pytest.mark.parametrize("reduction", losses.LM_REDUCTIONS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_loss_equals_lm_loss(chunk, reduction, supervised_index):
    h, w, labels, weight = map(jnp.asarray, _batch())
    index = jnp.asarray(losses.loss_index(np.asarray(labels), np.asarray(weight), multiple=4)) if supervised_index else None
    (want, n_want), _ = _plain(h, w, labels, weight, index, reduction)
    got, n_got, pred = _chunked(h, w, labels, weight, index, reduction, chunk)
    assert pred is None and int(n_got) == int(n_want) == 2 + 7 + 4
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    # No weights: the padding row's labels count.
    (want, n_want), _ = _plain(h, w, labels, None, index, reduction)
    got, n_got, _ = _chunked(h, w, labels, None, index, reduction, chunk)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    assert int(n_got) == int(n_want)


def test_an_all_padding_batch_gives_zero_not_nan():
    h, w, labels, _ = map(jnp.asarray, _batch())
    for red in losses.LM_REDUCTIONS:
        got, n, _ = losses.chunked_lm_loss(h, w, labels, jnp.zeros(4), reduction=red, chunk=10)
        assert float(got) == 0.0 and int(n) == 0


@pytest.mark.parametrize("reduction", losses.LM_REDUCTIONS)
@pytest.mark.parametrize("chunk", [7, 96, 4 * V])
def test_gradients_equal_the_full_logits_ones(chunk, reduction):
    """d loss / d hidden and d loss / d kernel (a trainable or tied LM head) as with full logits."""
    h, w, labels, weight = map(jnp.asarray, _batch(1))
    index = jnp.asarray(losses.loss_index(np.asarray(labels), np.asarray(weight), multiple=4))
    for idx in (None, index):
        plain = jax.grad(lambda h, w: _plain(h, w, labels, weight, idx, reduction)[0][0], argnums=(0, 1))
        chunked = jax.grad(lambda h, w: _chunked(h, w, labels, weight, idx, reduction, chunk)[0], argnums=(0, 1))
        (gh_want, gw_want), (gh, gw) = plain(h, w), chunked(h, w)
        assert float(jnp.abs(gh_want).max()) > 1e-3 and float(jnp.abs(gw_want).max()) > 1e-3
        np.testing.assert_allclose(np.asarray(gh), np.asarray(gh_want), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(gw), np.asarray(gw_want), rtol=1e-5, atol=1e-7)
        # The kernel frozen (closed over, as the step's frozen LLaMA): the same hidden gradient.
        gh_only = jax.grad(lambda h: _chunked(h, w, labels, weight, idx, reduction, chunk)[0])(h)
        np.testing.assert_allclose(np.asarray(gh_only), np.asarray(gh_want), rtol=1e-5, atol=1e-7)


def test_a_frozen_kernel_gets_no_kernel_gradient_pass():
    """The backward accumulates a kernel gradient only when the kernel is differentiated."""
    h, w, labels, weight = map(jnp.asarray, _batch())
    loss = lambda h, w: losses.chunked_lm_loss(h, w, labels, weight, chunk=10)[0]   # noqa: E731
    frozen = str(jax.make_jaxpr(jax.grad(lambda h: loss(h, w)))(h))
    trained = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, w))
    assert "dynamic_update_slice" not in frozen and "dynamic_update_slice" in trained


@pytest.mark.parametrize("chunk", [5, 32, 4 * V])
def test_the_blockwise_argmax_is_the_argmax_of_the_logits(chunk):
    """Ties included (duplicate kernel columns inside and across blocks): the first maximum wins."""
    h, w, labels, weight = _batch(2)
    w = w.copy()
    w[:, 40:45] = w[:, 60:65] = w[:, 3:8]      # columns 3..7 repeat at 40..44 and 60..64
    w[:, 96] = w[:, 95] = w[:, 31]             # column 31 repeats in the (overlapping) last block
    h[0, :7] = 4 * w[:, 5]                     # rows whose maximum is tied: 5 = 42 = 62
    h[1, :7] = 4 * w[:, 31]                    # 31 = 95 = 96
    h, w = jnp.asarray(h), jnp.asarray(w)
    (_, _), logits = _plain(h, w, labels, weight, None, "token_mean")
    _, _, pred = _chunked(h, w, labels, weight, None, "token_mean", chunk, argmax=True)
    want = jnp.argmax(logits, axis=-1)
    assert pred.shape == want.shape == labels.shape and pred.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(pred), np.asarray(want))
    assert (np.asarray(pred[0, :7]) == 5).all() and (np.asarray(pred[1, :7]) == 31).all()
    # As the step calls it: the same (loss, n) and the argmax the faithful mode decodes.
    head = losses.HiddenHead(h, w, chunk)
    a = losses.lm_head_loss(head, labels, weight, argmax=True)
    b = losses.lm_head_loss(logits, labels, weight, argmax=True)
    np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(b[2]))


def test_bf16_hidden_states_match_the_full_logits_path():
    """The paper's compute dtype: bf16 hidden states and kernel, fp32 logits in both paths; the
    hidden gradient (bf16) is as close to the exact one as the full-logits path's."""
    h, w, labels, weight = _batch(3)
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    index = losses.loss_index(labels, weight, multiple=4)
    (want, _), _ = _plain(hb, wb, labels, weight, index, "token_mean")
    got, _, _ = _chunked(hb, wb, labels, weight, index, "token_mean", 10)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    gh_plain = jax.grad(lambda h: _plain(h, wb, labels, weight, index, "token_mean")[0][0])(hb)
    gh = jax.grad(lambda h: _chunked(h, wb, labels, weight, index, "token_mean", 10)[0])(hb)
    assert gh.dtype == jnp.bfloat16
    # The exact gradient (float64, of the bf16 inputs): (softmax - onehot) / n @ kernel.T per row.
    h64, w64 = np.asarray(hb, np.float64), np.asarray(wb, np.float64)
    rows = np.take_along_axis(h64, np.maximum(index, 0)[..., None], axis=1)             # [B, K, D]
    targets, mask = (np.asarray(a) for a in losses._targets(jnp.asarray(labels), jnp.asarray(weight),
                                                             jnp.asarray(index), None))
    lg = rows @ w64
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(p.shape[0])[:, None], np.arange(p.shape[1])[None, :], np.maximum(targets, 0)] -= 1
    d_rows = np.where(mask[..., None], p, 0.0) / mask.sum() @ w64.T
    exact = np.zeros_like(h64)
    for b in range(h64.shape[0]):
        for k, t in enumerate(index[b]):
            if t >= 0:
                exact[b, t] += d_rows[b, k]
    scale = np.abs(exact).max()
    err = lambda g: np.abs(np.asarray(g, np.float64) - exact).max() / scale   # noqa: E731
    assert err(gh_plain) < 2 ** -7
    assert err(gh) < 2 * err(gh_plain) + 2 ** -9, (err(gh), err(gh_plain))


def test_blockwise_logits_refuse_a_non_positive_block():
    with pytest.raises(ValueError, match="chunk must be > 0"):
        losses.blockwise_logits(jnp.ones((2, D)), jnp.ones((D, V)), jnp.zeros((2, 1), jnp.int32), 0)


@pytest.mark.parametrize("chunk", [7, 4 * V])
def test_blockwise_logits_pick_several_ids_per_row_with_their_gradients(chunk):
    """``T`` ids per row (the differentiable L_V scores 10 candidates' first digits at one row)."""
    h, w, _, _ = _batch(4)
    h, w = jnp.asarray(h[0]), jnp.asarray(w)                           # [14, D]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, V, (14, 10)), jnp.int32).at[:, 0].set(V - 1)
    coef = jnp.asarray(np.random.default_rng(1).normal(size=(14, 10)), jnp.float32)

    def plain(h, w):
        lg = jnp.dot(h, w, preferred_element_type=jnp.float32)
        return jax.nn.logsumexp(lg, -1), jnp.take_along_axis(lg, ids, axis=1)

    def blocks(h, w):
        return losses.blockwise_logits(h, w, ids, chunk)[:2]

    for a, b in zip(plain(h, w), blocks(h, w)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
    score = lambda f: lambda h, w: (f(h, w)[1] * coef).sum() + f(h, w)[0].sum() * 0.3   # noqa: E731
    for a, b in zip(jax.grad(score(plain), (0, 1))(h, w), jax.grad(score(blocks), (0, 1))(h, w)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the train step, both paths ---

class _TextLM(nnx.Module):
    """InterLLaVA's interface (``input_embeddings``, ``llama``, ``__call__``) over a text-only LLaMA."""

    def __init__(self, cfg: LlamaConfig, lora: LoRAConfig | None, rngs: nnx.Rngs):
        self.llama = Llama(cfg, lora=lora, rngs=rngs)

    def input_embeddings(self, batch, rng=None):
        return self.llama.embed(batch["input_ids"])

    def __call__(self, batch, *, rng=None, return_hidden=False, logits_at=None, compute_logits=True):
        return self.llama(inputs_embeds=self.input_embeddings(batch), attention_mask=batch["attention_mask"],
                          rng=rng, return_hidden=return_hidden, logits_at=logits_at,
                          compute_logits=compute_logits)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled_test_tokenizer())


ANSWERS = [  # (prompt, answer, kind, target_index, gt_span)
    ("Which video shows a dog?", "Intent: retrieval. Video 3 shows it.", 1, 2, (-1.0, -1.0)),
    ("When does it jump?", "Intent: moment. It happens from 12.5 - 20 seconds.", 2, -1, (10.0, 20.0)),
    ("Which video has the cat?", "Intent: retrieval. Video 10 shows the cat.", 1, 9, (-1.0, -1.0)),
    ("Hello", "Hi, how can I help?", 0, -1, (-1.0, -1.0)),
]


def _text_batch(tok, S=40):
    """Left-padded prompt + answer rows, labels on the answers; the last row is padding (weight 0)."""
    B = len(ANSWERS)
    ids = np.zeros((B, S), np.int32)
    mask = np.zeros((B, S), np.int32)
    labels = np.full((B, S), -100, np.int32)
    for b, (q, a, *_) in enumerate(ANSWERS):
        p, t = tok(q).input_ids, tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id]
        row = p + t
        ids[b, S - len(row):], mask[b, S - len(row):] = row, 1
        labels[b, S - len(t):] = t
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "weight": np.array([1.0, 1.0, 1.0, 0.0], np.float32),
            "kind": np.array([r[2] for r in ANSWERS], np.int32),
            "target_index": np.array([r[3] for r in ANSWERS], np.int32),
            "gt_span": np.array([r[4] for r in ANSWERS], np.float32)}


def _steps(tok, mode, chunk, trainable, tied, supervised, n=2):
    cfg = LlamaConfig(vocab_size=len(tok), hidden=32, intermediate=64, layers=2, heads=4, kv_heads=4,
                      tie_embeddings=tied)
    model = _TextLM(cfg, LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj")),
                    nnx.Rngs(0))
    aux = make_aux_mode(mode, tok, alpha=0.5, beta=0.5, lm_chunk=chunk)
    host = aux.prepare(_text_batch(tok))
    if supervised and (chunk or not aux.batch_targets):   # as the loop does
        host = {**host, "loss_index": losses.loss_index(host["labels"], host["weight"], multiple=8)}
    batch = jax.tree.map(jnp.asarray, host)
    filt = nnx.LoRAParam if trainable == "lora" else nnx.Param
    graphdef, params, frozen = nnx.split(model, filt, ...)
    tx = optax.sgd(0.5)   # linear in the gradient (Adam would blow up rounding in ~0 gradients)
    state = step_lib.init_state(params, tx, 0)
    fn = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, lambda s: 0.5, aux))
    out = []
    for _ in range(n):
        state, m, o = fn(state, frozen, batch)
        out.append(({k: float(v) for k, v in m.items()}, None if o is None else np.asarray(o)))
    return out, state, host


@pytest.mark.parametrize("mode,trainable,tied,supervised", [
    ("faithful", "lora", False, True),          # the paper: LoRA over a frozen LLaMA, supervised head
    ("faithful", "all", False, False),          # the demo: the LLM trained too (kernel gradient)
    ("off", "all", True, True),                 # tied embeddings: the kernel is the embedding
    ("differentiable", "lora", False, False),   # the loop's full head for the differentiable mode
    ("differentiable", "all", True, True),      # ... and with loss_index (train.lm_loss_chunk > 0)
])
def test_the_train_step_is_the_same_with_and_without_chunks(tok, mode, trainable, tied, supervised):
    """Two steps (the second from updated parameters): loss, its parts, the gradient norm, the
    faithful argmax and the updated parameters agree between lm_loss_chunk 0 and > 0."""
    plain, s_plain, host = _steps(tok, mode, 0, trainable, tied, supervised)
    chunked, s_chunk, _ = _steps(tok, mode, 4096, trainable, tied, supervised)  # 32005 = 7 blocks + 3333
    if mode == "differentiable":
        assert (host["cand_pos"] >= 0).sum() == 2 and (host["num_pos"][:, :, 0] >= 0).all(-1).sum() == 1
    for (m0, o0), (m1, o1) in zip(plain, chunked):
        for k in ("loss", "loss/lm", "grad_norm", "param_norm", *(["loss/video", "loss/moment"]
                                                                  if mode == "differentiable" else [])):
            np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, err_msg=k)
        assert m1["tokens"] == m0["tokens"] and m1["finite"] == 1.0
        if mode == "differentiable":
            assert m0["loss/video"] > 0 and m0["loss/moment"] > 0
        if mode == "faithful":
            assert o0.shape == o1.shape
            np.testing.assert_array_equal(o1, o0)
        else:
            assert o0 is None and o1 is None
    for a, b in zip(jax.tree.leaves(s_plain["params"]), jax.tree.leaves(s_chunk["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_the_differentiable_terms_from_hidden_states_equal_the_logits_ones(tok):
    """L_V and L_C and their gradients, from the hidden states at their positions only."""
    cfg = LlamaConfig(vocab_size=len(tok), hidden=32, intermediate=64, layers=2, heads=4, kv_heads=4)
    model = _TextLM(cfg, None, nnx.Rngs(1))
    batch = jax.tree.map(jnp.asarray, aux_losses.add_targets(_text_batch(tok), tok))
    digit_ids = make_aux_mode("differentiable", tok).digit_ids
    g, st = nnx.split(model)

    def plain(st):
        main, ext = aux_losses.forward_with_candidates(nnx.merge(g, st), batch)
        return aux_losses.differentiable_aux(main, ext, batch, digit_ids)

    def hidden(st):
        main, ext, w = aux_losses.forward_hidden_with_candidates(nnx.merge(g, st), batch)
        assert main.shape[-1] == ext.shape[-1] == 32 and w.shape == (32, len(tok))
        return aux_losses.differentiable_aux_hidden(main, ext, w, batch, digit_ids, 5000)

    want, got = jax.jit(plain)(st), jax.jit(hidden)(st)
    assert float(want[0]) > 0 and float(want[1]) > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
    gw = jax.jit(jax.grad(lambda s: sum(plain(s))))(st)
    gg = jax.jit(jax.grad(lambda s: sum(hidden(s))))(st)
    for a, b in zip(jax.tree.leaves(gw), jax.tree.leaves(gg)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)


def test_llama_without_logits_returns_the_head_input():
    cfg = LlamaConfig(vocab_size=V, hidden=D, intermediate=32, layers=1, heads=2, kv_heads=2)
    for tied in (False, True):
        m = Llama(dataclasses.replace(cfg, tie_embeddings=tied), rngs=nnx.Rngs(0))
        ids = jnp.arange(12).reshape(2, 6) % V
        full = m(ids, return_hidden=True)
        out = m(ids, compute_logits=False)
        assert out.logits is None and out.hidden.shape == (2, 6, D)
        np.testing.assert_array_equal(np.asarray(out.hidden), np.asarray(full.hidden))
        np.testing.assert_allclose(np.asarray(out.hidden @ m.lm_head_weight()), np.asarray(full.logits),
                                   rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the config ---

def test_the_config_key_is_validated_and_the_paper_uses_blocks():
    tc = Experiment.resolve(load_config("configs/paper.py:tiny")).train
    assert tc.lm_loss_chunk == 2048
    assert Experiment.resolve(load_config("configs/demo.py")).train.lm_loss_chunk == 2048
    c = load_config("configs/paper.py:tiny")
    c.train.lm_loss_chunk = -1
    with pytest.raises(UsageError, match=r"config.train.lm_loss_chunk must be an integer >= 0"):
        Experiment.resolve(c)
    for bad in (1.5, "8k", True, None):   # (a ConfigDict refuses these types itself)
        with pytest.raises(UsageError, match=r"config.train.lm_loss_chunk must be an integer >= 0"):
            dataclasses.replace(tc, lm_loss_chunk=bad)
    with pytest.raises(ValueError, match="lm_loss_chunk"):
        make_aux_mode("off", lm_chunk=-3)


def test_a_demo_run_gives_the_same_losses_with_and_without_chunks(demo_corpus, tmp_path):
    """The loop end to end (the demo's InterLLaVA, faithful aux from the first step): 2 steps."""
    runs = {}
    for chunk in (0, 2048):
        c = load_config("configs/demo.py")
        c.data.annotations = str(Path(demo_corpus) / "ivcr.json")
        c.train.update(steps=2, ckpt_every=10, warmup_steps=1, log_every=1, eval_every=0, lm_loss_chunk=chunk)
        c.mesh.update(data=2, num_devices=2)
        runs[chunk] = train(Experiment.resolve(c), tmp_path / str(chunk), progress=False)["history"]
    for h0, h1 in zip(runs[0], runs[2048]):
        for k in ("loss", "loss/lm", "loss/video", "loss/moment", "grad_norm"):
            np.testing.assert_allclose(h1[k], h0[k], rtol=1e-5, err_msg=k)
        assert h1["tokens"] == h0["tokens"]


# ------------------------------------------------------------------------- the memory saving ---

def test_the_blockwise_loss_compiles_to_a_fraction_of_the_memory():
    """Loss + hidden gradient at K = 512 supervised positions, V = 32005, D = 256: the full-logits
    path's temporaries hold the [K, V] fp32 logits and their gradient; the blockwise one about 2.5
    [K, chunk] blocks. (fp32 here: XLA:CPU runs bf16 matmuls in fp32 and adds a converted fp32
    copy of a bf16 kernel to both paths.)"""
    K, Dm, Vp, chunk = 512, 256, 32005, 2048
    h = jax.ShapeDtypeStruct((1, K, Dm), jnp.float32)
    w = jax.ShapeDtypeStruct((Dm, Vp), jnp.float32)
    labels = jax.ShapeDtypeStruct((1, K + 1), jnp.int32)
    index = jax.ShapeDtypeStruct((1, K), jnp.int32)

    def temp(loss):
        step = jax.jit(jax.value_and_grad(loss))
        return step.lower(h, w, labels, index).compile().memory_analysis().temp_size_in_bytes

    plain = temp(lambda h, w, lab, idx: losses.lm_loss(
        jnp.dot(h, w, preferred_element_type=jnp.float32), lab, None, idx)[0])
    chunked = temp(lambda h, w, lab, idx: losses.chunked_lm_loss(h, w, lab, None, idx, chunk=chunk)[0])
    logits_bytes, block_bytes = K * Vp * 4, K * chunk * 4
    assert plain >= 2 * logits_bytes
    assert chunked <= 3 * block_bytes + (1 << 20) and chunked < 0.25 * logits_bytes
