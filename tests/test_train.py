"""The training job on the demo corpus: learning, determinism, exact resume, checkpoint safety,
frozen/trainable split, and the auxiliary losses' gradients."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ivcr_jax.checkpoints import Checkpointer
from ivcr_jax.cli import load_config
from ivcr_jax.data.batch import take_rows
from ivcr_jax.experiment import Experiment
from ivcr_jax.models import build
from ivcr_jax.models.params import trainable_filter
from ivcr_jax.tokenizer import digit_ids as token_digit_ids
from ivcr_jax.train import aux_losses, losses, optim, step as step_lib
from ivcr_jax.train import data as data_lib
from ivcr_jax.train.aux import make_aux_mode
from ivcr_jax.train.loop import NonFiniteLoss, train


def _config(corpus, **train) -> Experiment:
    c = load_config("configs/demo.py")
    c.data.annotations = str(Path(corpus) / "ivcr.json")
    c.train.update(dict(steps=8, ckpt_every=4, warmup_steps=2, log_every=1, eval_every=0), **train)
    # The paper's trainable set (LoRA over a frozen LLM), not the demo's (which trains the tiny LLM).
    c.trainable = load_config("configs/paper.py:tiny").trainable
    c.mesh.update(data=2, num_devices=2)     # data-parallel over 2 of the 8 fake CPU devices
    return Experiment.resolve(c)


def _losses(history):
    return [h["loss/lm"] for h in history]


@pytest.fixture(scope="module")
def straight(demo_corpus, tmp_path_factory):
    """An uninterrupted 8-step run."""
    return train(_config(demo_corpus), tmp_path_factory.mktemp("straight"), progress=False)


def test_same_seed_gives_identical_losses(demo_corpus, straight, tmp_path):
    again = train(_config(demo_corpus), tmp_path, progress=False)
    assert _losses(again["history"]) == _losses(straight["history"])
    assert all(np.isfinite(_losses(again["history"])))


def test_resume_after_stop_gives_identical_losses(demo_corpus, straight, tmp_path):
    first = train(_config(demo_corpus), tmp_path, max_steps=3, progress=False)   # saves at step 3
    assert first["final_step"] == 3
    second = train(_config(demo_corpus), tmp_path, progress=False)               # resumes from 3
    assert [h["step"] for h in second["history"]] == [4, 5, 6, 7, 8]
    assert _losses(first["history"]) + _losses(second["history"]) == _losses(straight["history"])


def test_an_interrupted_save_is_never_restored(demo_corpus, straight, tmp_path):
    import shutil
    src = Path(straight["workdir"]) / "checkpoints"
    dst = tmp_path / "checkpoints"
    shutil.copytree(src, dst)
    # A save killed half-way leaves Orbax's temporary directory, never a finalised step.
    partial = dst / "12.orbax-checkpoint-tmp-1700000000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    assert Checkpointer(tmp_path).latest_step() == 8


def test_frozen_parameters_bit_identical_and_trainable_changed(demo_corpus, straight):
    cfg = _config(demo_corpus)
    fresh = build.build_model(cfg.model, seed=cfg.seed, random_init=cfg.init.random_init)
    _, p0, f0 = nnx.split(fresh, trainable_filter(cfg.trainable), ...)
    p1, f1 = straight["state"]["params"], straight["frozen"]
    frozen_same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), f0, f1)
    assert all(jax.tree.leaves(frozen_same))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), p0, p1))
    assert sum(changed) > 0.5 * len(changed)
    names = [k for k, _ in nnx.to_flat_state(p1)]
    assert any("lora_a" in str(k) for k in names) and any(k[0] == "llama_proj" for k in names)
    assert not any(k[0] in ("vit",) for k in names)
    assert not any(k[0] == "llama" and "lora" not in str(k[-1]) for k in names)


def test_loss_decreases_on_demo_corpus(demo_corpus, tmp_path):
    cfg = _config(demo_corpus, steps=30, ckpt_every=100, lr=1e-2, min_lr=1e-3)
    h = _losses(train(cfg, tmp_path, progress=False)["history"])
    assert np.mean(h[-5:]) < np.mean(h[:5]) - 0.05, h
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "metrics.jsonl").is_file()
    assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())


def test_non_finite_loss_stops_with_last_checkpoint_intact(demo_corpus, tmp_path):
    cfg = _config(demo_corpus, steps=6, ckpt_every=1, lr=1e30, min_lr=1e29, warmup_init_lr=1e30,
                  clip_norm=0.0)
    with pytest.raises(NonFiniteLoss, match="last good checkpoint"):
        train(cfg, tmp_path, progress=False)
    ck = Checkpointer(tmp_path)
    last = ck.latest_step()
    assert last is not None and last >= 1
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["step"] == last


@pytest.fixture(scope="module")
def aux_setup(demo_corpus):
    cfg = _config(demo_corpus)
    tok = cfg.tokenizer
    data = data_lib.train_data(cfg)
    batches = []
    while len(batches) < 40:
        b = next(data.iterator)
        batches.append(b)
    kinds = np.concatenate([b["kind"] for b in batches])
    assert (kinds == 1).any() and (kinds == 2).any()
    host = {k: np.concatenate([b[k] for b in batches]) for k in ("kind",)}
    del host
    model = build.build_model(cfg.model, seed=0)
    g, p, f = nnx.split(model, trainable_filter(cfg.trainable), ...)
    return cfg, tok, batches, g, p, f


def _grads(cfg, tok, batch, g, p, f, mode):
    tx, sched = optim.make_optimizer(cfg.train, p)
    digit_ids = token_digit_ids(tok)

    def aux_only(params):
        model = nnx.merge(g, params, f)
        if mode == "differentiable":
            main, ext = aux_losses.forward_with_candidates(model, batch)
            v, c = aux_losses.differentiable_aux(main, ext, batch, digit_ids)
            return cfg.train.alpha * v + cfg.train.beta * c
        return jnp.zeros(())
    return jax.jit(jax.grad(aux_only))(p)


def test_differentiable_aux_losses_have_gradients_faithful_ones_do_not(aux_setup):
    cfg, tok, batches, g, p, f = aux_setup
    ret = next(b for b in batches if (b["kind"] == 1).any())
    mom = next(b for b in batches if (b["kind"] == 2).any())
    for b in (ret, mom):
        batch = jax.tree.map(jnp.asarray, aux_losses.add_targets(b, tok))
        gn = float(optax_norm(_grads(cfg, tok, batch, g, p, f, "differentiable")))
        assert gn > 0 and np.isfinite(gn)
    # Faithful L_V / L_C are computed from argmax-decoded text: the step's gradient is that of
    # the LM loss alone, identical to a run without auxiliary losses.
    tx, sched = optim.make_optimizer(cfg.train, p)
    batch = jax.tree.map(jnp.asarray, ret)
    outs = {}
    for mode in ("faithful", "off"):
        st = step_lib.init_state(p, tx, 0, cfg.rng_impl)
        aux = make_aux_mode(mode, tok, alpha=cfg.train.alpha, beta=cfg.train.beta)
        fn = jax.jit(step_lib.make_train_step(g, tx, sched, aux, rng_impl=cfg.rng_impl))
        _, m, _ = fn(st, f, batch)
        outs[mode] = float(m["grad_norm"])
    assert outs["faithful"] == outs["off"]


def optax_norm(tree):
    import optax
    return optax.global_norm(tree)


def test_candidate_scoring_is_exact_for_two_token_indices(aux_setup):
    """The tree-attention continuation equals scoring the substituted sequence directly."""
    cfg, tok, batches, g, p, f = aux_setup
    b = next(b for b in batches if (b["kind"] == 1).any())
    i = int(np.nonzero(b["kind"] == 1)[0][0])
    batch = aux_losses.add_targets(b, tok)
    model = nnx.merge(g, p, f)
    jb = jax.tree.map(jnp.asarray, batch)
    main, ext = jax.jit(lambda m, x: aux_losses.forward_with_candidates(m, x))(model, jb)
    K, C = batch["cand_cont"].shape[1:]
    lp_ext = jax.nn.log_softmax(ext, -1).reshape(ext.shape[0], K, C, -1)
    # candidate 10 ("1","0", terminator) by direct substitution into the input ids
    pos = int(batch["cand_pos"][i])
    ids = np.array(batch["input_ids"][i])
    seq = np.concatenate([ids[:pos], [batch["cand_first"][i, 9]], batch["cand_cont"][i, 9, :2]])
    one = take_rows(batch, [i])   # row i alone, its frames pooled again (data/batch.py)
    one["input_ids"] = seq[None].astype(np.int32)
    one["attention_mask"] = np.ones_like(one["input_ids"])
    one["video_token_index"] = one["video_token_index"][:, :len(seq)]
    direct = jax.jit(lambda m, x: m(x).logits)(model, jax.tree.map(jnp.asarray, one))
    lp_direct = jax.nn.log_softmax(direct[0], -1)
    want = [float(lp_direct[pos, seq[pos + 1]]), float(lp_direct[pos + 1, seq[pos + 2]])]
    got = [float(lp_ext[i, 9, 0, batch["cand_cont"][i, 9, 0]]), float(lp_ext[i, 9, 1, batch["cand_cont"][i, 9, 1]])]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_supervised_lm_head_gives_the_full_heads_loss_and_gradient():
    """train.lm_head="supervised": logits only where the next token is a label, same CE and grads."""
    from ivcr_jax.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=97, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=4)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 97, (3, 20)).astype(np.int32)
    labels = np.full((3, 20), -100, np.int32)
    labels[0, 12:18], labels[1, 5:20], labels[2, 19] = ids[0, 12:18], ids[1, 5:20], ids[2, 19]
    mask = np.ones((3, 20), np.int32)
    mask[2, :4] = 0
    weight = np.array([1.0, 1.0, 0.0], np.float32)
    idx = losses.loss_index(labels, weight, multiple=8)
    assert idx.shape == (3, 16) and (idx[2] == -1).all()
    assert idx[0, :6].tolist() == list(range(11, 17)) and (idx[0, 6:] == -1).all()
    g, st = nnx.split(model)

    def loss(st, at):
        m = nnx.merge(g, st)
        out = m(jnp.asarray(ids), attention_mask=jnp.asarray(mask), logits_at=None if at is None else jnp.asarray(at))
        return losses.lm_loss(out.logits, jnp.asarray(labels), jnp.asarray(weight), None if at is None else jnp.asarray(at))

    (full, n_full), g_full = jax.value_and_grad(lambda s: loss(s, None), has_aux=True)(st)
    (sup, n_sup), g_sup = jax.value_and_grad(lambda s: loss(s, idx), has_aux=True)(st)
    assert int(n_full) == int(n_sup) == 21
    np.testing.assert_allclose(float(sup), float(full), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_sup)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
    pred = np.arange(48).reshape(3, 16).astype(np.int32)
    assert [p for p in losses.predicted_answer_ids(pred, labels, idx)[0]] == pred[0, :6].tolist()
