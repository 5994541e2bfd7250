"""KV-cache generation (ivcr_jax.models.generate): equality with full recomputation, one compilation
per prompt bucket, reproducible sampling."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ivcr_jax.models import generate as G
from ivcr_jax.tokenizer import EOS_ID, PAD_ID

# The tiny config with 4 frames per video for both kinds (one video group) and one text bucket: every
# prompt of these tests (and of test_eval_model / test_chat, which import these) has one shape.
TINY = "configs/paper.py:tiny"
TINY_SET = ("data.retrieval_frames=4", "data.moment_frames=4", "data.text_buckets=(1024,)")


def tiny_experiment(*extra: str):
    """The tiny config with TINY_SET (and ``extra``) applied, resolved."""
    from ivcr_jax import cli
    from ivcr_jax.experiment import Experiment

    return Experiment.resolve(cli.resolve(TINY, (*TINY_SET, *extra)))


def tiny_flags(*extra: str) -> list[str]:
    """``--config TINY --config.k=v ...`` for the command-line entry points."""
    return ["--config", TINY, *(f"--config.{s}" for s in (*TINY_SET, *extra))]


def random_model(exp, seed: int = 0):
    """The tiny InterLLaVA with random weights of a useful scale, without the ~20 s jitted init.

    Kernels ~ N(0, 1/fan_in), norm scales ~ 1, LoRA B non-zero (so the adapters take part), embeddings
    ~ N(0, 1): the logits spread over the vocabulary, so greedy and sampled tokens vary.
    """
    from ivcr_jax.models.params import flat_state
    from ivcr_jax.models import build

    model = build.abstract_model(exp.model, seed)
    rng = np.random.default_rng(seed)
    for path, var in flat_state(model, nnx.Variable).items():
        x = var.get_value()
        name = path.rsplit("/", 1)[-1]
        z = rng.standard_normal(x.shape).astype(np.float32)
        if name in ("kernel", "lora_a"):
            a = z / np.sqrt(x.shape[0])
        elif name == "scale":
            a = 1.0 + 0.1 * z
        elif name in ("bias", "q_bias", "v_bias", "lora_b"):
            a = 0.05 * z
        elif name == "embedding":
            a = z
        else:
            a = 0.5 * z
        var.set_value(jnp.asarray(a, x.dtype))
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    from ivcr_jax.data.demo import build_demo_corpus
    from ivcr_jax.data.prompts import PromptLoader
    from ivcr_jax.data.schema import load_dialogues

    root = build_demo_corpus(tmp_path_factory.mktemp("demo"), num_generated=8, size=32)
    exp = tiny_experiment()
    dialogues, _ = load_dialogues(root / "ivcr.json", split="test")
    pcfg = exp.pipeline(1, video_root=str(root / "videos"))
    loader = PromptLoader(pcfg, tokenizer, video_slots="cap")
    return dict(config=exp, model=random_model(exp), loader=loader, dialogues=dialogues, pcfg=pcfg)


@functools.lru_cache(maxsize=4)
def _full_forward(graphdef):
    @jax.jit
    def last_logits(state, emb, mask, pos):
        llama = nnx.merge(graphdef, state).llama
        return llama(inputs_embeds=emb, attention_mask=mask).logits[0, pos]
    return last_logits


def _recompute(model, prompt_emb, real: int, n: int, length: int, eos: int = EOS_ID) -> list[int]:
    """Greedy tokens by re-running the whole LLaMA forward, without a cache, over the growing sequence:
    the prompt's embeddings (videos spliced in) followed by the generated tokens' embeddings,
    right-padded to a fixed length so that it compiles once. ``InterLLaVA.__call__`` on the grown
    token sequence is exactly this (generated tokens are text: ``video_token_index`` -1)."""
    graphdef, state = nnx.split(model)
    last_logits = _full_forward(graphdef)
    emb = np.zeros((1, length, prompt_emb.shape[-1]), np.float32)
    mask = np.zeros((1, length), np.int32)
    emb[0, :real], mask[0, :real] = np.asarray(prompt_emb[:real]), 1
    out = []
    for i in range(n):
        tok = int(jnp.argmax(last_logits(state, emb, mask, real + i - 1)))
        out.append(tok)
        if tok == eos:
            break
        emb[0, real + i] = np.asarray(model.llama.embed(jnp.array([tok])))[0]
        mask[0, real + i] = 1
    return out


def test_kv_cache_generation_equals_full_recompute_with_videos(setup):
    loader, model = setup["loader"], setup["model"]
    d = next(d for d in setup["dialogues"] if len(d.turns) >= 2)   # retrieval turn, then a moment turn
    prompts = [loader.prompt(d, 0), loader.prompt(d, 1)]
    assert [p.sample.kind for p in prompts] == ["retrieval", "moment"]
    assert prompts[0].sample.length != prompts[1].sample.length   # rows padded differently
    batch = loader.batch(prompts)
    n = 5
    gen = G.Generator(model, max_new_tokens=n, buckets=setup["pcfg"].buckets)
    out = gen(batch)
    assert out.tokens.shape == (2, n) and out.steps <= n
    assert out.prefill_s > 0 and out.decode_s > 0
    assert out.encode_s > 0
    emb = np.asarray(gen.encode(batch))                       # [2, bucket, D], videos spliced in
    assert emb.shape[:2] == (2, out.bucket) and np.isfinite(emb).all()
    for row in range(2):
        real = int(batch["attention_mask"][row].sum())
        ref = _recompute(model, emb[row], real, n, length=out.bucket)
        got = [int(t) for t in out.tokens[row, :len(ref)]]
        assert got == ref, f"row {row}: KV cache {got} vs recompute {ref}"
        assert len(set(ref)) > 1   # a non-degenerate model: the comparison means something

    # The same prompts left-padded give the same tokens (same shapes: no new compilation).
    left = dict(batch)
    S = batch["input_ids"].shape[1]
    for k, fill in (("input_ids", PAD_ID), ("attention_mask", 0), ("video_token_index", -1)):
        a = np.full_like(batch[k], fill)
        for r in range(2):
            m = int(batch["attention_mask"][r].sum())
            a[r, S - m:] = batch[k][r, :m]
        left[k] = a
    out_left = gen(left)
    np.testing.assert_array_equal(out_left.tokens, out.tokens)
    assert out_left.compile_s == 0.0


def _text_batch(tokenizer, texts, width):
    ids = np.full((len(texts), width), PAD_ID, np.int32)
    mask = np.zeros((len(texts), width), np.int32)
    for i, t in enumerate(texts):
        x = [1] + tokenizer(t, add_special_tokens=False)["input_ids"]
        ids[i, :len(x)], mask[i, :len(x)] = x, 1
    return {"input_ids": ids, "attention_mask": mask}


def test_compiles_once_per_prompt_bucket(setup, tokenizer, monkeypatch):
    traces = {"encode": 0, "prefill": 0, "decode": 0}

    def counting(name, fn):
        @functools.wraps(fn)
        def wrapped(*a, **k):
            traces[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(G, "_encode", counting("encode", G._encode))
    monkeypatch.setattr(G, "_prefill", counting("prefill", G._prefill))
    monkeypatch.setattr(G, "_decode", counting("decode", G._decode))
    before = G.compiled_count()
    gen = G.Generator(setup["model"], max_new_tokens=4, buckets=(16, 32))
    a = gen(_text_batch(tokenizer, ["A red ball.", "Where is the blue square now?"], 40))
    assert a.bucket == 16 and a.compile_s > 0 and traces == {"encode": 1, "prefill": 1, "decode": 1}
    # other lengths, other padding width, same bucket: nothing is traced or compiled again
    b = gen(_text_batch(tokenizer, ["Hi", "When does it happen?"], 24))
    assert b.bucket == 16 and b.compile_s == 0.0 and traces == {"encode": 1, "prefill": 1, "decode": 1}
    c = gen(_text_batch(tokenizer, ["word " * 20, "x"], 30))
    assert c.bucket == 32 and traces == {"encode": 2, "prefill": 2, "decode": 2}
    assert gen.compile_counts == {"encode": 2, "prefill": 2, "decode": 2}
    assert G.compiled_count() == before + 6
    # a second generator over an equally shaped model reuses the executables
    gen2 = G.Generator(random_model(setup["config"], seed=1), max_new_tokens=4, buckets=(16, 32))
    assert gen2(_text_batch(tokenizer, ["Hello there", "x"], 16)).compile_s == 0.0
    assert traces == {"encode": 2, "prefill": 2, "decode": 2}
    with pytest.raises(ValueError, match="exceeds the largest text bucket"):
        gen(_text_batch(tokenizer, ["word " * 40], 48))


def test_sampling_is_reproducible_with_a_fixed_key(setup, tokenizer):
    # the shapes of test_compiles_once_per_prompt_bucket: only the sampling loop is new
    gen = G.Generator(setup["model"], max_new_tokens=4, buckets=(16, 32))
    batch = _text_batch(tokenizer, ["A red ball.", "Where is the blue square now?"], 16)
    greedy = gen(batch)
    s1 = gen(batch, temperature=1.0, top_p=0.8, key=jax.random.key(7))
    s2 = gen(batch, temperature=1.0, top_p=0.8, key=jax.random.key(7))
    s3 = gen(batch, temperature=1.0, top_p=0.8, key=jax.random.key(8))
    np.testing.assert_array_equal(s1.tokens, s2.tokens)
    assert not np.array_equal(s1.tokens, s3.tokens)
    assert not np.array_equal(s1.tokens, greedy.tokens)
    # temperature and top-p are traced: new values do not recompile
    tiny_p = gen(batch, temperature=0.7, top_p=1e-6, key=jax.random.key(3))
    assert tiny_p.compile_s == 0.0
    np.testing.assert_array_equal(tiny_p.tokens, greedy.tokens)   # top-p keeps only the top token
    with pytest.raises(ValueError, match="explicit PRNG key"):
        gen(batch, temperature=1.0)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    keys = jax.random.split(jax.random.key(0), 400)

    @jax.jit
    def draws(top_p):
        return jax.vmap(lambda k: G.select_token(logits, k, 1.0, top_p, greedy=False)[0])(keys)

    # 0.5 < 0.75 needs the second token, 0.5 + 0.3 reaches it; 0.5 alone reaches 0.45
    assert set(np.asarray(draws(0.75)).tolist()) == {0, 1}
    assert set(np.asarray(draws(0.45)).tolist()) == {0}
    assert set(np.asarray(draws(1.0)).tolist()) == {0, 1, 2, 3}
    assert int(G.select_token(logits, None, 0.0, 1.0, greedy=True)[0]) == 0
