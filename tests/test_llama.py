"""LLaMA decoder: parity with HF ``LlamaForCausalLM``, converters, KV-cache decoding, errors."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ivcr_jax.convert import llama as convert  # noqa: E402
from ivcr_jax.models.params import CheckpointError, CheckpointMismatch, flat_state
from ivcr_jax.models.llama import KVCache, LlamaConfig, LlamaOutput  # noqa: E402
from ivcr_jax.models.lora import LoRAConfig  # noqa: E402

VOCAB = 512
# bf16 weights and compute against the fp32 HF reference: measured 1.7e-2 (MHA) / 1.3e-2 (GQA)
# max|diff| / max|ref| over real tokens; the bound leaves ~2x headroom.
BF16_TOL = 3e-2


def make_hf(kv_heads=4, tie=False, seed=0):
    """A tiny HF LLaMA whose weights are noised well past HF's std-0.02 init."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                                   attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return hf


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{name: (hf_model, save_pretrained dir)} for an MHA, a GQA and a tied-embedding model."""
    out = {}
    for name, kw in {"mha": dict(kv_heads=4), "gqa": dict(kv_heads=2),
                     "tied": dict(kv_heads=4, tie=True, seed=1)}.items():
        hf = make_hf(**kw)
        d = tmp_path_factory.mktemp(name)
        hf.save_pretrained(d)
        out[name] = (hf, d)
    return out


def batch(seed=0, B=2, S=9, pad=(0, 3)):
    ids = np.random.RandomState(seed).randint(3, VOCAB, (B, S))
    mask = np.ones((B, S), np.int64)
    for b, p in enumerate(pad):
        mask[b, :p] = 0
    return ids, mask


def hf_logits(hf, ids, mask=None):
    with torch.no_grad():
        if mask is None:
            return hf(input_ids=torch.tensor(ids)).logits.float().numpy()
        pos = np.maximum(mask.cumsum(-1) - 1, 0)  # what HF generate passes for left padding
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos)).logits.float().numpy()


@nnx.jit
def forward(model, ids, mask=None):
    return model(ids, attention_mask=mask).logits


def rel_err(ours, ref, mask=None):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    diff = np.abs(ours - ref)
    if mask is not None:  # padded query rows are garbage in both implementations
        diff = diff[mask.astype(bool)]
    return diff.max() / np.abs(ref).max()


@pytest.mark.parametrize("name", ["mha", "gqa", "tied"])
def test_logits_match_hf_fp32(hf_dirs, name):
    hf, d = hf_dirs[name]
    model = convert.from_hf(d, dtype=jnp.float32, param_dtype=jnp.float32)
    assert model.config.kv_heads == hf.config.num_key_value_heads
    assert (model.lm_head is None) == (name == "tied")
    ids, mask = batch()
    out = nnx.jit(lambda m, ids: m(ids))(model, ids)  # input_ids alone -> fp32 logits [B, T, V]
    assert isinstance(out, LlamaOutput) and out.hidden is None and out.cache is None
    logits = out.logits
    assert logits.shape == (2, 9, VOCAB) and logits.dtype == jnp.float32
    assert rel_err(logits, hf_logits(hf, ids)) <= 1e-4
    assert rel_err(forward(model, ids, mask), hf_logits(hf, ids, mask), mask) <= 1e-4


@pytest.mark.parametrize("name", ["gqa"])
def test_logits_match_hf_bf16(hf_dirs, name):
    hf, d = hf_dirs[name]
    model = convert.from_hf(d)  # bf16 weights and compute (the defaults for the frozen 7B)
    assert model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    ids, mask = batch()
    logits = forward(model, ids, mask)
    assert logits.dtype == jnp.float32
    assert rel_err(logits, hf_logits(hf, ids, mask), mask) <= BF16_TOL


def test_inputs_embeds_and_hidden(hf_dirs):
    _, d = hf_dirs["mha"]
    model = convert.from_hf(d, dtype=jnp.float32, param_dtype=jnp.float32)
    ids, mask = batch()

    @nnx.jit
    def via_embeds(model, ids, mask):
        return model(inputs_embeds=model.embed(ids), attention_mask=mask, return_hidden=True)

    ref = forward(model, ids, mask)
    out = via_embeds(model, ids, mask)
    assert isinstance(out, LlamaOutput) and out.cache is None
    np.testing.assert_allclose(out.logits, ref, rtol=1e-6, atol=1e-6)
    assert out.hidden.shape == (2, 9, 64)
    # the hidden states are the lm_head input
    np.testing.assert_allclose(out.hidden @ model.lm_head.kernel[...], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_bin_and_sharded_safetensors_load_the_same(hf_dirs, tmp_path):
    hf, d = hf_dirs["gqa"]
    bin_dir, shard_dir = tmp_path / "bin", tmp_path / "sharded"
    bin_dir.mkdir()
    shutil.copy(d / "config.json", bin_dir / "config.json")
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old buffers are skipped
    torch.save(sd, bin_dir / "pytorch_model.bin")
    hf.save_pretrained(shard_dir, max_shard_size="100KB")
    index = json.loads((shard_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1

    ref = flat_state(convert.from_hf(d, dtype=jnp.float32, param_dtype=jnp.float32))
    for src in (bin_dir, shard_dir):
        got = flat_state(convert.from_hf(src, dtype=jnp.float32, param_dtype=jnp.float32))
        assert got.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(got[k][...], ref[k][...], err_msg=f"{src.name}: {k}")
    # the host-side flat dict matches too, already cast to bf16
    flat, cfg = convert.convert_hf(shard_dir)
    assert cfg.kv_heads == 2 and flat.keys() == ref.keys()
    assert all(v.dtype == jnp.bfloat16 for v in flat.values())
    np.testing.assert_allclose(flat["layers/1/mlp/down_proj/kernel"].astype(np.float32),
                               ref["layers/1/mlp/down_proj/kernel"][...], rtol=1e-2, atol=1e-2)


def test_extend_vocab_adds_deterministic_mean_rows(hf_dirs):
    hf, d = hf_dirs["mha"]
    base = convert.from_hf(d, dtype=jnp.float32, param_dtype=jnp.float32)
    ext = convert.from_hf(d, dtype=jnp.float32, param_dtype=jnp.float32, extra_vocab=5)
    assert ext.config.vocab_size == VOCAB + 5
    emb, head = ext.embed_tokens.embedding[...], ext.lm_head.kernel[...]
    assert emb.shape == (VOCAB + 5, 64) and head.shape == (64, VOCAB + 5)
    mean_row = base.embed_tokens.embedding[...].mean(0)
    for r in range(VOCAB, VOCAB + 5):
        np.testing.assert_allclose(emb[r], mean_row, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(head[:, r], base.lm_head.kernel[...].mean(1), rtol=1e-6, atol=1e-6)
    # the same rows on every build (the reference draws fresh random rows each time)
    again = convert.from_hf(d, dtype=jnp.float32, param_dtype=jnp.float32, extra_vocab=5)
    np.testing.assert_array_equal(again.embed_tokens.embedding[...], emb)
    # old tokens' logits are untouched; the new tokens can be fed in
    ids, mask = batch()
    np.testing.assert_allclose(forward(ext, ids, mask)[..., :VOCAB], forward(base, ids, mask),
                               rtol=1e-6, atol=1e-6)
    new_ids = np.array(ids)
    new_ids[:, -3:] = [VOCAB, VOCAB + 2, VOCAB + 4]
    assert np.isfinite(np.asarray(forward(ext, new_ids, mask))).all()
    flat = convert.extend_vocab({"embed_tokens/embedding": np.eye(3, dtype=np.float32)}, 2)
    np.testing.assert_allclose(flat["embed_tokens/embedding"][3:], np.full((2, 3), 1 / 3), rtol=1e-6)


def greedy_full(model, ids, mask, n):
    """Greedy decoding by recomputing the whole sequence at every step.

    The sequence lives in a fixed ``[B, S + n]`` buffer (one compilation); causality makes the
    not-yet-generated tail irrelevant to the logits read at the current position.
    """
    B, S = ids.shape
    buf = jnp.concatenate([ids, jnp.zeros((B, n), ids.dtype)], 1)
    full_mask = jnp.concatenate([mask, jnp.ones((B, n), mask.dtype)], 1)
    toks, logits = [], []
    for t in range(n):
        last = forward(model, buf, full_mask)[:, S - 1 + t]
        tok = jnp.argmax(last, -1)
        toks.append(tok)
        logits.append(last)
        buf = buf.at[:, S + t].set(tok)
    return np.stack(toks, 1), np.stack(logits, 1)


@nnx.jit
def cached_step(model, ids, mask, cache):
    return model(ids, attention_mask=mask, cache=cache)


def greedy_cached(model, ids, mask, n):
    cache = model.init_cache(ids.shape[0], ids.shape[1] + n)
    out = cached_step(model, ids, mask, cache)  # prefill
    toks, logits = [], []
    for _ in range(n):
        last = out.logits[:, -1]
        tok = jnp.argmax(last, -1)
        toks.append(tok)
        logits.append(last)
        out = cached_step(model, tok[:, None], jnp.ones((ids.shape[0], 1), jnp.int32), out.cache)
    assert isinstance(out.cache, KVCache) and int(out.cache.index) == ids.shape[1] + n
    return np.stack(toks, 1), np.stack(logits, 1)


@pytest.mark.parametrize("name", ["gqa"])
def test_kv_cache_greedy_equals_full_recompute_and_hf(hf_dirs, name):
    hf, d = hf_dirs[name]
    model = convert.from_hf(d, dtype=jnp.float32, param_dtype=jnp.float32)
    ids, mask = batch(seed=3, S=6, pad=(0, 3))  # two left-padded prompts of lengths 6 and 3
    ids, mask, n = jnp.asarray(ids), jnp.asarray(mask, jnp.int32), 6
    toks_full, logits_full = greedy_full(model, ids, mask, n)
    toks_cache, logits_cache = greedy_cached(model, ids, mask, n)
    np.testing.assert_array_equal(toks_cache, toks_full)
    np.testing.assert_allclose(logits_cache, logits_full, rtol=0, atol=1e-5 * np.abs(logits_full).max())
    # and HF generate with the same left-padded batch picks the same tokens
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        gen = hf.generate(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask)),
                          max_new_tokens=n, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(gen[:, ids.shape[1]:].numpy(), toks_full)


def test_cache_overflow_is_an_error(hf_dirs):
    model = convert.from_hf(hf_dirs["mha"][1], dtype=jnp.float32, param_dtype=jnp.float32)
    cache = model.init_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        nnx.eval_shape(lambda m: m(jnp.ones((1, 5), jnp.int32), cache=cache), model)


def test_remat_gives_the_same_gradients(hf_dirs):
    """Per-block rematerialisation changes memory, not gradients — also in the trainer's tree mode
    (``jax.grad`` over the LoRA state of a model rebuilt with ``nnx.merge``)."""
    ids, mask = batch()
    grads = {}
    for remat in ("none", "dots", "full"):
        model = convert.from_hf(hf_dirs["gqa"][1], lora=LoRAConfig(rank=2, dropout=0.1), dtype=jnp.float32,
                              param_dtype=jnp.float32, remat=remat)
        assert model.config.remat == remat
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
        lora = jax.tree.map(lambda a: a + 0.05, lora)  # B != 0, so A gets a gradient too

        def loss(lora):
            m = nnx.merge(graphdef, lora, rest)
            return jnp.mean(m(ids, attention_mask=mask, rng=jax.random.key(1)).logits ** 2)

        if remat == "full":  # compiling a third gradient is slow on CPU; check the remat is there
            assert "remat" in str(jax.make_jaxpr(jax.grad(loss))(lora))
            continue
        grads[remat] = jax.tree.leaves(jax.jit(jax.grad(loss))(lora))
    scale = max(float(jnp.abs(g).max()) for g in grads["none"])
    assert scale > 1e-4
    for a, b in zip(grads["none"], grads["dots"]):  # equal up to fp32 reassociation
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)
    with pytest.raises(ValueError, match="remat"):
        LlamaConfig(remat="some")


def test_config_from_hf_dict():
    d = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
         "hidden_act": "silu"}
    assert LlamaConfig.from_hf_config(d) == LlamaConfig()  # the defaults are LLaMA-2-7B
    cfg = LlamaConfig.from_hf_config({**d, "rope_scaling": {"type": "linear", "factor": 2.0}}, remat="full")
    assert cfg.rope_scaling == 2.0 and cfg.remat == "full" and cfg.head_dim == 128
    v5 = {**d, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    del v5["rope_theta"]
    assert LlamaConfig.from_hf_config(v5).rope_theta == 5e5
    with pytest.raises(NotImplementedError):
        LlamaConfig.from_hf_config({**d, "rope_scaling": {"type": "dynamic", "factor": 2.0}})


# ----------------------------------------------------------------------------- errors

def _write_st(d, sd, cfg_dir):
    from safetensors.numpy import save_file

    d.mkdir()
    shutil.copy(cfg_dir / "config.json", d / "config.json")
    save_file(sd, str(d / "model.safetensors"))
    return d


def test_checkpoint_errors_name_file_and_keys(hf_dirs, tmp_path):
    hf, d = hf_dirs["mha"]
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}

    missing = dict(sd)
    del missing["model.layers.1.mlp.up_proj.weight"]
    src = _write_st(tmp_path / "missing", missing, d)
    with pytest.raises(CheckpointMismatch, match="model.layers.1.mlp.up_proj.weight") as e:
        convert.from_hf(src)
    assert str(src) in str(e.value) and e.value.missing == ["model.layers.1.mlp.up_proj.weight"]

    wrong = {**sd, "model.layers.0.self_attn.k_proj.weight": np.zeros((64, 32), np.float32)}
    src = _write_st(tmp_path / "wrong", wrong, d)
    with pytest.raises(CheckpointMismatch, match="k_proj") as e:
        convert.from_hf(src)
    assert e.value.mismatched == [("model.layers.0.self_attn.k_proj.weight", (64, 32), (64, 64))]

    extra = {**sd, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32),
             "model.layers.7.mlp.up_proj.weight": sd["model.layers.0.mlp.up_proj.weight"]}
    src = _write_st(tmp_path / "extra", extra, d)
    with pytest.raises(CheckpointMismatch) as e:
        convert.from_hf(src)
    assert sorted(e.value.unexpected) == ["model.layers.0.self_attn.q_proj.bias",
                                          "model.layers.7.mlp.up_proj.weight"]

    for fname in ("model.safetensors", "pytorch_model.bin"):
        bad = tmp_path / f"bad_{fname}"
        bad.mkdir()
        shutil.copy(d / "config.json", bad / "config.json")
        (bad / fname).write_text("this is not a checkpoint\n" * 10)
        with pytest.raises(CheckpointError, match=fname):
            convert.from_hf(bad)

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(d / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        convert.from_hf(empty)
    with pytest.raises(CheckpointError, match="no such"):
        convert.from_hf(tmp_path / "nowhere")
