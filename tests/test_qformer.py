"""Image Q-Former: parity with HF InstructBLIP / BLIP-2 Q-Formers, HF key routing, loader errors."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from ivcr_jax import sharding  # noqa: E402
from ivcr_jax.convert import common  # noqa: E402
from ivcr_jax.models import params as params_lib  # noqa: E402
from ivcr_jax.models.params import CheckpointError, CheckpointMismatch
from ivcr_jax.convert import qformer as qf_conv  # noqa: E402
from ivcr_jax.convert.qformer import convert_hf_qformer  # noqa: E402
from ivcr_jax.models.qformer import QFormer, QFormerConfig  # noqa: E402
from reference import noisy as _noisy, rel_err as _rel  # noqa: E402

# Tiny: 2 layers so that layer 0 has cross-attention and layer 1 has none (frequency 2).
QCFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            vocab_size=100, max_position_embeddings=32, encoder_hidden_size=48, cross_attention_frequency=2)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
              image_size=28, patch_size=14)
B, Q, T, S = 2, 4, 6, 10




@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, (B, T)).astype(np.int64)
    text_mask = np.ones((B, T), np.int64)
    text_mask[1, 4:] = 0                      # padded timestamp text
    enc_mask = np.ones((B, S), np.int64)
    enc_mask[1, 7:] = 0                       # padded image keys
    return dict(ids=ids, text_mask=text_mask, enc_mask=enc_mask,
                query=rng.normal(size=(B, Q, 64)).astype(np.float32),
                enc=rng.normal(size=(B, S, 48)).astype(np.float32))


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel
    model = _noisy(InstructBlipQFormerModel(InstructBlipQFormerConfig(**QCFG)), 0)
    d = tmp_path_factory.mktemp("instructblip_qformer")
    model.save_pretrained(d)
    return d, model


@nnx.jit
def _image_pass(m, ids, mask, enc, query, enc_mask):
    return m(ids, mask, enc, query_embeds=query, encoder_attention_mask=enc_mask)


@nnx.jit
def _own_queries_pass(m, ids, text_mask, enc):
    return m(ids, text_mask, enc)   # no query_embeds: the module's own query tokens


@nnx.jit
def _text_pass(m, ids, text_mask):
    return m(ids, text_mask)


def _hf_image(model, x):
    full = torch.cat([torch.ones(B, Q, dtype=torch.long), torch.from_numpy(x["text_mask"])], 1)
    with torch.no_grad():
        return model(torch.from_numpy(x["ids"]), attention_mask=full, query_embeds=torch.from_numpy(x["query"]),
                     encoder_hidden_states=torch.from_numpy(x["enc"]),
                     encoder_attention_mask=torch.from_numpy(x["enc_mask"])).last_hidden_state.numpy()


def _ours_image(m, x, hf_mask=False):
    mask = x["text_mask"]
    if hf_mask:   # HF convention: the mask covers queries + text
        mask = np.concatenate([np.ones((B, Q), np.int64), mask], 1)
    return _image_pass(m, x["ids"], mask, x["enc"], x["query"], x["enc_mask"])


def test_image_qformer_matches_instructblip_with_text_and_masks(bare, inputs):
    d, model = bare
    ours = qf_conv.from_hf(d)
    assert ours.config.num_query_tokens == 0 and ours.config.has_text and ours.config.vocab_size == 100
    out = _ours_image(ours, inputs, hf_mask=True)
    assert out.shape == (B, Q + T, 64)          # text positions kept (TimeChat)
    assert _rel(out, _hf_image(model, inputs)) <= 1e-4


def test_text_only_pass_matches_instructblip(bare, inputs):
    d, model = bare
    ours = qf_conv.from_hf(d)
    with torch.no_grad():
        ref = model(torch.from_numpy(inputs["ids"]),
                    attention_mask=torch.from_numpy(inputs["text_mask"])).last_hidden_state.numpy()
    out = _text_pass(ours, inputs["ids"], inputs["text_mask"])
    assert out.shape == (B, T, 64)
    assert _rel(out, ref) <= 1e-4


def test_bf16_within_tolerance(bare, inputs):
    d, model = bare
    ours = qf_conv.from_hf(d, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert params_lib.flat_state(ours)["layers/0/self_attn/query/kernel"][...].dtype == jnp.bfloat16
    out = _ours_image(ours, inputs)   # (and the text-only mask convention)
    assert out.dtype == jnp.bfloat16
    # measured 1.4e-2 (bf16 weights and matmuls; LayerNorm, softmax and residual sums in fp32)
    assert _rel(out, _hf_image(model, inputs)) <= 3e-2


def test_full_instructblip_dir_uses_its_query_tokens(tmp_path, inputs):
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, LlamaConfig
    text = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4)
    full = _noisy(InstructBlipForConditionalGeneration(InstructBlipConfig(
        vision_config=VISION, qformer_config=QCFG, text_config=text.to_dict(), num_query_tokens=Q)), 1)
    full.save_pretrained(tmp_path)
    ours = qf_conv.from_hf(tmp_path)
    assert ours.config.num_query_tokens == Q
    np.testing.assert_array_equal(np.asarray(ours.query_tokens[...]), full.query_tokens.detach().numpy())
    x = dict(inputs, query=full.query_tokens.detach().numpy().repeat(B, 0))
    out = _own_queries_pass(ours, inputs["ids"], inputs["text_mask"], inputs["enc"])
    # the same as the bare (HF) Q-Former fed the model's query tokens explicitly
    assert _rel(out, _hf_image(full.qformer, dict(x, enc_mask=np.ones((B, S), np.int64)))) <= 1e-4
    # the keys of the other towers were routed, not rejected
    parts = convert_hf_qformer(common.read_hf_dir(tmp_path), prefix="qformer.")
    assert set(parts.other) == {"vision", "llm"}
    assert "query_tokens" in parts.qformer


def test_blip2_retrieval_dir_text_and_query_passes(tmp_path, inputs):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval
    full = _noisy(Blip2ForImageTextRetrieval(Blip2Config(
        vision_config=VISION, qformer_config=dict(QCFG, use_qformer_text_input=True), num_query_tokens=Q)), 2)
    full.save_pretrained(tmp_path)
    ours = qf_conv.from_hf(tmp_path)
    assert ours.config.num_query_tokens == Q and ours.config.has_text
    ids, mask = torch.from_numpy(inputs["ids"]), torch.from_numpy(inputs["text_mask"])
    enc = torch.from_numpy(inputs["enc"])
    with torch.no_grad():   # the ITC text pass and image-query pass of Blip2ForImageTextRetrieval
        ref_text = full.qformer(query_embeds=full.embeddings(input_ids=ids), query_length=0,
                                attention_mask=mask).last_hidden_state.numpy()
        ref_img = full.qformer(query_embeds=full.query_tokens.expand(B, -1, -1),
                               encoder_hidden_states=enc).last_hidden_state.numpy()
    assert _rel(_text_pass(ours, inputs["ids"], inputs["text_mask"]), ref_text) <= 1e-4
    img = nnx.jit(lambda m, e: m(encoder_hidden_states=e))(ours, inputs["enc"])
    assert _rel(img, ref_img) <= 1e-4
    parts = convert_hf_qformer(common.read_hf_dir(tmp_path), prefix="qformer.")
    assert set(parts.other) == {"vision", "retrieval"}


def test_every_parameter_has_logical_axes():
    cfg = QFormerConfig(vocab_size=50, hidden=32, layers=2, heads=4, mlp_dim=64, max_positions=16,
                        encoder_width=24, num_query_tokens=4)
    model = nnx.eval_shape(lambda: QFormer(cfg, rngs=nnx.Rngs(0)))
    flat = params_lib.flat_state(model)
    assert "layers/0/cross_attn/key/kernel" in flat and "layers/1/cross_attn/key/kernel" not in flat
    rules = dict(sharding.RULES)
    for path, var in flat.items():
        names = sharding.variable_names(var)
        assert names is not None and len(names) == var.get_value().ndim, path
        assert all(n is None or n in rules for n in names), (path, names)


def test_config_from_hf_keeps_vocab_and_reads_nested():
    from transformers import InstructBlipConfig
    cfg = InstructBlipConfig(qformer_config=dict(QCFG, vocab_size=30523), num_query_tokens=32).to_dict()
    c = QFormerConfig.from_hf_config(cfg)
    assert (c.vocab_size, c.num_query_tokens, c.encoder_width, c.layers, c.has_text) == (30523, 32, 1408, 2, True)
    assert QFormerConfig.from_hf_config(QCFG).num_query_tokens == 0
    assert not QFormerConfig.from_hf_config(dict(QCFG, model_type="blip_2_qformer")).has_text


def test_out_of_vocabulary_ids_are_rejected_not_clipped(bare, inputs):
    ours = qf_conv.from_hf(bare[0])
    ids = inputs["ids"].copy()
    ids[0, 2] = 100                            # one past the table (LLaMA ids can exceed BERT's)
    with pytest.raises(ValueError, match="vocabulary"):
        ours(ids, None)
    # under jit the row comes out NaN instead of silently reading another token's embedding
    out = np.asarray(_text_pass(ours, ids, inputs["text_mask"]))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


# ----------------------------------------------------------------------------- loader errors

def _rewrite(src, dst, edit):
    """Copy an HF dir, editing its safetensors dict."""
    import shutil

    import safetensors.numpy as stn
    shutil.copytree(src, dst)
    sd = stn.load_file(str(dst / "model.safetensors"))
    edit(sd)
    stn.save_file(sd, str(dst / "model.safetensors"))
    return dst


def test_missing_key_is_reported(bare, tmp_path):
    d = _rewrite(bare[0], tmp_path / "m", lambda sd: sd.pop("encoder.layer.1.output_query.dense.weight"))
    with pytest.raises(CheckpointMismatch) as e:
        qf_conv.from_hf(d)
    assert str(d) in str(e.value) and "layers/1/ffn_query/fc2/kernel" in e.value.missing


def test_unexpected_key_is_reported(bare, tmp_path):
    def edit(sd):
        sd["encoder.layer.0.attention.attention.rotary.weight"] = np.zeros((2,), np.float32)
    d = _rewrite(bare[0], tmp_path / "u", edit)
    with pytest.raises(CheckpointMismatch) as e:
        qf_conv.from_hf(d)
    assert str(d) in str(e.value)
    assert e.value.unexpected == ["encoder.layer.0.attention.attention.rotary.weight"]


def test_wrong_shape_is_reported(bare, tmp_path):
    def edit(sd):
        sd["embeddings.word_embeddings.weight"] = np.zeros((7, 64), np.float32)
    d = _rewrite(bare[0], tmp_path / "s", edit)
    with pytest.raises(CheckpointMismatch) as e:
        qf_conv.from_hf(d)
    assert str(d) in str(e.value)
    assert e.value.mismatched == [("embeddings/word_embeddings/embedding", (7, 64), (100, 64))]


def test_non_checkpoint_files_are_rejected(bare, tmp_path):
    import shutil
    d = tmp_path / "junk"
    shutil.copytree(bare[0], d)
    (d / "model.safetensors").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        qf_conv.from_hf(d)
    with pytest.raises(CheckpointError, match="config.json"):
        qf_conv.from_hf(tmp_path)
    pth = tmp_path / "junk.pth"
    pth.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="junk.pth"):
        qf_conv.from_lavis(pth)
