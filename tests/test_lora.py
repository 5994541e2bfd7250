"""LoRA: peft parity (unmerged and merged), init, dropout, key conversion and errors."""
import copy
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ivcr_jax.convert import llama as convert  # noqa: E402
from ivcr_jax.models.params import CheckpointError, CheckpointMismatch
from ivcr_jax.models.llama import Llama  # noqa: E402
from ivcr_jax.models.lora import (LoRAConfig, LoRADense, lora_param_count, lora_state,  # noqa: E402
                                  merge_lora)

VOCAB = 512
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL = ATTN + ("gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 4, 8.0  # scale 2, so a missing alpha/r shows up


def make_hf(kv_heads, seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if "norm" in n else p.normal_(0, 0.15)
    return hf


@pytest.fixture(scope="module", params=[("attn", 4, ATTN), ("all", 2, ALL)], ids=["qkvo", "all7_gqa"])
def peft_setup(request, tmp_path_factory):
    """(base dir, peft model with random non-zero A/B, its state dict as numpy, targets)."""
    name, kv_heads, targets = request.param
    hf = make_hf(kv_heads, seed=len(name))
    base_dir = tmp_path_factory.mktemp(f"base_{name}")
    hf.save_pretrained(base_dir)  # before peft wraps the modules in place
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets),
                                                 lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    pm.eval()
    sd = {k: v.detach().numpy().copy() for k, v in pm.state_dict().items()}
    return base_dir, pm, sd, targets


def inputs():
    ids = np.random.RandomState(0).randint(3, VOCAB, (2, 8))
    mask = np.ones((2, 8), np.int64)
    mask[1, :3] = 0
    return ids, mask


def torch_logits(model, ids, mask):
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.float().numpy()


@nnx.jit
def forward(model, ids, mask):
    return model(ids, attention_mask=mask).logits


def rel_err(ours, ref, mask):
    diff = np.abs(np.asarray(ours) - ref)[mask.astype(bool)]
    return diff.max() / np.abs(ref).max()


def test_lora_matches_peft_unmerged_and_merged(peft_setup):
    base_dir, pm, sd, targets = peft_setup
    lora = LoRAConfig(rank=RANK, alpha=ALPHA, dropout=0.0, targets=targets)
    model = convert.from_hf(base_dir, lora=lora, dtype=jnp.float32, param_dtype=jnp.float32)
    convert.load_lora(model, sd.items())  # the full peft state dict (base weights are skipped)
    ids, mask = inputs()
    ref = torch_logits(pm, ids, mask)
    assert rel_err(forward(model, ids, mask), ref, mask) <= 1e-4

    merge_lora(model)
    assert all(float(jnp.abs(v[...]).max()) == 0 for k, v in _flat(lora_state(model)).items()
               if k.endswith("lora_b"))
    assert rel_err(forward(model, ids, mask), ref, mask) <= 1e-4
    merged = copy.deepcopy(pm).merge_and_unload()  # the fixture's model stays unmerged
    assert rel_err(forward(model, ids, mask), torch_logits(merged, ids, mask), mask) <= 1e-4
    # merged kernels equal peft's merged weights
    np.testing.assert_allclose(model.layers[1].self_attn.q_proj.kernel[...],
                               merged.model.layers[1].self_attn.q_proj.weight.detach().numpy().T,
                               rtol=1e-5, atol=1e-6)


def _flat(state):
    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def test_lora_key_formats_give_the_same_weights(peft_setup, tmp_path):
    base_dir, pm, sd, targets = peft_setup
    ref = convert.lora_flat(sd.items())
    assert len(ref) == 2 * 2 * len(targets)
    np.testing.assert_array_equal(ref["layers/0/self_attn/q_proj/lora_a"],
                                  sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].T)
    # TimeChat/IVCR checkpoints: prefix llama_model., other trainable parts beside it
    timechat = {"llama_model." + k: v for k, v in sd.items() if "lora_" in k}
    timechat.update({"Qformer.bert.embeddings.LayerNorm.weight": np.ones(8, np.float32),
                     "video_query_tokens": np.zeros((1, 32, 8), np.float32)})
    got = convert.lora_flat(timechat.items(), convert.TIMECHAT_PREFIX)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    # peft save_pretrained: adapter files without the ".default" segment
    pm.save_pretrained(tmp_path / "adapter")
    lcfg = LoRAConfig.from_peft_config(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()))
    assert (lcfg.rank, lcfg.alpha, lcfg.dropout, set(lcfg.targets)) == (RANK, ALPHA, 0.0, set(targets))
    model = convert.from_hf(base_dir, lora=lcfg, dtype=jnp.float32, param_dtype=jnp.float32)
    convert.load_lora(model, tmp_path / "adapter")
    for k, v in _flat(lora_state(model)).items():
        np.testing.assert_allclose(v[...], ref[k], err_msg=k)


def test_lora_errors(peft_setup):
    base_dir, _, sd, targets = peft_setup
    lora = LoRAConfig(rank=RANK, alpha=ALPHA, dropout=0.0, targets=targets)
    model = convert.from_hf(base_dir, lora=lora, dtype=jnp.float32, param_dtype=jnp.float32)
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    with pytest.raises(CheckpointMismatch, match="layers/1/self_attn/v_proj/lora_b") as e:
        convert.load_lora(model, [(k, v) for k, v in sd.items() if k != dropped])
    assert e.value.missing == ["layers/1/self_attn/v_proj/lora_b"]
    a_key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.default.weight"
    with pytest.raises(CheckpointMismatch, match="mis-shaped") as e:
        convert.load_lora(model, {**sd, a_key: sd[a_key][:2]}.items())
    assert e.value.mismatched[0][0] == "layers/0/self_attn/k_proj/lora_a"
    extra = {**sd, "base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight": np.ones((RANK, 64)),
             "base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight": np.ones((128, RANK))}
    if "up_proj" not in targets:
        with pytest.raises(CheckpointMismatch, match="unexpected") as e:
            convert.load_lora(model, extra.items())
        assert "layers/0/mlp/up_proj/lora_a" in e.value.unexpected
    dora = {**sd, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight":
            np.ones(64, np.float32)}
    with pytest.raises(CheckpointError, match="unsupported LoRA tensor"):
        convert.lora_flat(dora.items())
    two = {**sd, **{k.replace(".default.", ".other."): v for k, v in sd.items() if ".default." in k}}
    with pytest.raises(CheckpointError, match="adapter="):
        convert.lora_flat(two.items())
    assert convert.lora_flat(two.items(), adapter="other").keys() == convert.lora_flat(sd.items()).keys()
    with pytest.raises(CheckpointError, match="no LoRA tensors"):
        convert.lora_flat(sd.items(), convert.TIMECHAT_PREFIX)
    with pytest.raises(NotImplementedError):
        LoRAConfig.from_peft_config({"r": 4, "lora_alpha": 8, "use_rslora": True})


# ----------------------------------------------------------------------------- the layer itself

def test_lora_init_matches_peft():
    din, dout, r = 256, 48, 8
    layer = LoRADense(din, dout, names=("embed", "heads"), rank=r, alpha=16.0, param_dtype=jnp.bfloat16,
                      lora_param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    assert a.shape == (din, r) and b.shape == (r, dout)
    assert a.dtype == np.float32 and layer.kernel[...].dtype == jnp.bfloat16
    assert isinstance(layer.lora_a, nnx.LoRAParam) and not isinstance(layer.kernel, nnx.LoRAParam)
    assert layer.lora_a.get_metadata()["logical_axes"] == ("embed", "lora")
    assert layer.lora_b.get_metadata()["logical_axes"] == ("lora", "heads")
    assert not b.any()  # B = 0: a fresh adapter changes nothing
    # torch kaiming_uniform_(a=sqrt(5)) on the [r, in] layout: U(-1/sqrt(in), 1/sqrt(in))
    w = torch.empty(r, din)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    bound = 1 / math.sqrt(din)
    assert abs(w.abs().max().item() - bound) < 0.02 * bound
    assert abs(np.abs(a).max() - bound) < 0.02 * bound
    np.testing.assert_allclose(a.std(), w.std().item(), rtol=0.1)
    np.testing.assert_allclose(a.std(), bound / math.sqrt(3), rtol=0.1)


def test_lora_dropout_only_with_an_rng():
    din, dout = 16, 8
    layer = LoRADense(din, dout, names=("embed", "heads"), rank=4, alpha=8.0, dropout=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, din))
    base = x @ layer.kernel[...]
    np.testing.assert_allclose(layer(x, rng=jax.random.key(2)), base, rtol=1e-6)  # B = 0
    layer.lora_b[...] = jax.random.normal(jax.random.key(3), (4, dout))
    full = base + x @ layer.lora_a[...] @ layer.lora_b[...] * 2.0
    np.testing.assert_allclose(layer(x), full, rtol=1e-5, atol=1e-6)  # rng=None: deterministic
    k = jax.random.key(4)
    dropped = layer(x, rng=k)
    keep = jax.random.bernoulli(k, 0.5, x.shape)  # layers.Dropout's mask for that key
    expect = base + (jnp.where(keep, x / 0.5, 0) @ layer.lora_a[...] @ layer.lora_b[...]) * 2.0
    np.testing.assert_allclose(dropped, expect, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(dropped - full).max()) > 1e-3
    np.testing.assert_array_equal(layer(x, rng=k), dropped)


def test_merge_lora_keeps_outputs_and_dtypes():
    cfg_layer = dict(names=("embed", "mlp"), rank=4, alpha=4.0, dropout=0.1)
    layer = LoRADense(32, 24, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **cfg_layer)
    layer.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(1), (4, 24))
    x = jax.random.normal(jax.random.key(2), (5, 32))
    before = layer(x)
    merge_lora(layer)
    assert layer.kernel[...].dtype == jnp.bfloat16 and not np.asarray(layer.lora_b[...]).any()
    assert layer.merged and "dot_general" in str(jax.make_jaxpr(layer)(x))
    assert str(jax.make_jaxpr(layer)(x)).count("dot_general") == 1  # the side path is gone
    kernel = layer.kernel[...]
    merge_lora(layer)  # idempotent
    np.testing.assert_array_equal(layer.kernel[...], kernel)
    np.testing.assert_allclose(layer(x), before, rtol=2e-2, atol=2e-2 * float(jnp.abs(before).max()))


def test_lora_param_count_and_targets():
    from ivcr_jax.models.llama import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2)
    model = nnx.eval_shape(lambda: Llama(cfg, lora=LoRAConfig(rank=4), rngs=nnx.Rngs(0)))
    # q, o: 32 -> 32; k, v: 32 -> 16 (GQA)
    per_layer = 4 * (32 + 32) * 2 + 4 * (32 + 16) * 2
    assert lora_param_count(model) == 2 * per_layer
    assert isinstance(model.layers[0].mlp.up_proj, nnx.Module) and not isinstance(model.layers[0].mlp.up_proj,
                                                                                   LoRADense)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        Llama(cfg, lora=LoRAConfig(targets=("qkv",)), rngs=nnx.Rngs(0))
