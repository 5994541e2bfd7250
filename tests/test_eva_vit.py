"""EVA ViT-g/14 tower: parity with HF Blip2/InstructBlip vision models, LAVIS .pth loading,
torch-exact bicubic position resizing, and the converters' error reports."""
import dataclasses
import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from ivcr_jax import sharding  # noqa: E402
from ivcr_jax.convert import eva_vit as conv  # noqa: E402
from ivcr_jax.models.params import CheckpointError, CheckpointMismatch
from ivcr_jax.models.eva_vit import EvaViTConfig, bicubic_matrix, resize_pos_embed  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=28, patch_size=14)
D = TINY["hidden_size"]


@nnx.jit
def run(model, px):
    """(pre-norm, post-norm) outputs in one compiled call (eager dispatch is much slower on CPU)."""
    return model(px), model(px, apply_post_norm=True)


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _noisy(model, seed):
    """HF init (std 1e-10 for BLIP-2 vision) hides errors: give every weight O(0.1-1) values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * (0.5 if "embedding" in name else 0.15)
            if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight") \
                    or name.endswith("post_layernorm.weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
            if name.endswith("self_attn.qkv.bias"):
                p[D:2 * D] = 0.0  # EVA has no key bias: HF stores cat(q_bias, 0, v_bias)
    return model.eval()


def _build(cls_name, seed, path):
    cfg_cls = getattr(transformers, cls_name.replace("Model", "Config"))
    model = _noisy(getattr(transformers, cls_name)(cfg_cls(**TINY)), seed)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)  # NHWC


def _ref(model, px, **kw):
    with torch.no_grad():
        out = model(torch.from_numpy(px).permute(0, 3, 1, 2), output_hidden_states=True, **kw)
    return out.hidden_states[-1].numpy(), out.last_hidden_state.numpy()


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    path = tmp_path_factory.mktemp("blip2_vision")
    return _build("Blip2VisionModel", 0, path), path


@pytest.mark.parametrize("cls_name", ["Blip2VisionModel", "InstructBlipVisionModel"])
def test_matches_hf_vision_model_fp32(cls_name, tmp_path, pixels):
    ref_model = _build(cls_name, 1, tmp_path)
    pre_ref, post_ref = _ref(ref_model, pixels)
    model = conv.from_hf(tmp_path)
    assert model.config.post_eps == 1e-6 and model.config.depth == 2  # HF post_layernorm eps
    pre, post = run(model, jnp.asarray(pixels))
    assert pre.shape == (2, 1 + 4, D)
    assert rel(pre, pre_ref) <= 1e-4
    assert rel(post, post_ref) <= 1e-4
    assert rel(pre, post_ref) > 1e-2  # the two outputs really differ


def test_bf16_weights_and_compute_close_to_fp32_reference(blip2, pixels):
    ref_model, path = blip2
    pre_ref, post_ref = _ref(ref_model, pixels)
    model = conv.from_hf(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert model.blocks[0].attn.qkv.kernel[...].dtype == jnp.bfloat16
    pre, post = run(model, jnp.asarray(pixels))
    assert pre.dtype == jnp.bfloat16
    # measured 5e-3..9e-3 (pre) and 9e-3..1.2e-2 (post) over 3 weight seeds; 3e-2 leaves margin
    assert rel(pre, pre_ref) <= 3e-2
    assert rel(post, post_ref) <= 3e-2


def test_remat_under_a_mesh_gives_same_output(blip2, pixels):
    _, path = blip2
    model = conv.from_hf(path)
    plain = run(model, jnp.asarray(pixels))[1]
    remat = conv.from_hf(path, config=dataclasses.replace(model.config, remat=True))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with sharding.use_mesh(mesh):  # batch 4 shards over data x fsdp
        out = run(remat, jnp.asarray(np.concatenate([pixels, pixels])))[1]
    np.testing.assert_allclose(np.asarray(out[:2]), np.asarray(plain), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[2:]), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_full_blip2_model_dir_loads_vision_keys(blip2, tmp_path, pixels):
    ref_model, _ = blip2
    qc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              encoder_hidden_size=D, vocab_size=100)
    tc = dict(model_type="opt", vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
              num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64)
    full = transformers.Blip2Model(transformers.Blip2Config(
        vision_config=TINY, qformer_config=qc, text_config=tc, num_query_tokens=4))
    full.vision_model.load_state_dict(ref_model.state_dict())
    full.save_pretrained(tmp_path)
    flat, cfg = conv.convert_hf(tmp_path)
    assert cfg.width == D and not any(k.startswith("qformer") for k in flat)
    pre_ref, post_ref = _ref(ref_model, pixels)
    post = run(conv.from_hf(tmp_path), jnp.asarray(pixels))[1]
    assert rel(post, post_ref) <= 1e-4


def _lavis_state_dict(hf_sd, depth, seed=0):
    """The HF weights in LAVIS ``eva_vit_g.pth`` layout, plus one extra trailing block."""
    sd = {"cls_token": hf_sd["embeddings.class_embedding"],
          "pos_embed": hf_sd["embeddings.position_embedding"],
          "patch_embed.proj.weight": hf_sd["embeddings.patch_embedding.weight"],
          "patch_embed.proj.bias": hf_sd["embeddings.patch_embedding.bias"]}
    for i in range(depth):
        h, b = f"encoder.layers.{i}.", f"blocks.{i}."
        qkv_b = hf_sd[h + "self_attn.qkv.bias"]
        sd.update({b + "norm1.weight": hf_sd[h + "layer_norm1.weight"],
                   b + "norm1.bias": hf_sd[h + "layer_norm1.bias"],
                   b + "attn.q_bias": qkv_b[:D].clone(), b + "attn.v_bias": qkv_b[2 * D:].clone(),
                   b + "attn.qkv.weight": hf_sd[h + "self_attn.qkv.weight"],
                   b + "attn.proj.weight": hf_sd[h + "self_attn.projection.weight"],
                   b + "attn.proj.bias": hf_sd[h + "self_attn.projection.bias"],
                   b + "norm2.weight": hf_sd[h + "layer_norm2.weight"],
                   b + "norm2.bias": hf_sd[h + "layer_norm2.bias"],
                   b + "mlp.fc1.weight": hf_sd[h + "mlp.fc1.weight"],
                   b + "mlp.fc1.bias": hf_sd[h + "mlp.fc1.bias"],
                   b + "mlp.fc2.weight": hf_sd[h + "mlp.fc2.weight"],
                   b + "mlp.fc2.bias": hf_sd[h + "mlp.fc2.bias"]})
    g = torch.Generator().manual_seed(seed)
    for k in [k for k in sd if k.startswith("blocks.0.")]:  # blocks.<depth>: stored, not used
        sd[k.replace("blocks.0.", f"blocks.{depth}.")] = torch.randn(sd[k].shape, generator=g)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def lavis_files(blip2, tmp_path_factory):
    ref_model, _ = blip2
    d = tmp_path_factory.mktemp("lavis")
    hf_sd = ref_model.state_dict()
    sd = _lavis_state_dict(hf_sd, depth=2)
    torch.save(sd, d / "eva_vit_g.pth")
    ln = {"ln_vision.weight": hf_sd["post_layernorm.weight"].clone(),
          "ln_vision.bias": hf_sd["post_layernorm.bias"].clone()}
    torch.save({"model": {**ln, "query_tokens": torch.zeros(1, 4, 32),
                          "Qformer.bert.embeddings.LayerNorm.weight": torch.ones(32)}},
               d / "instruct_blip_trimmed.pth")
    full = {"model": {**{"visual_encoder." + k: v for k, v in sd.items()}, **ln,
                      "query_tokens": torch.zeros(1, 4, 32)}}
    torch.save(full, d / "timechat_full.pth")
    return d, sd, ln


def test_lavis_pth_equals_hf_route(blip2, lavis_files, pixels, monkeypatch):
    _, path = blip2
    d, _, _ = lavis_files
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "torch", None)  # safetensors conversion must not need torch
        hf_flat, hf_cfg = conv.convert_hf(path)
    # same eps as HF's post_layernorm so both routes compute the same function
    lv_flat = conv.convert_lavis(d / "eva_vit_g.pth", d / "instruct_blip_trimmed.pth", config=hf_cfg)
    full_flat = conv.convert_lavis(d / "timechat_full.pth", config=hf_cfg)
    assert sorted(lv_flat) == sorted(hf_flat) == sorted(full_flat)
    for k in hf_flat:
        np.testing.assert_array_equal(lv_flat[k], hf_flat[k], err_msg=k)
        np.testing.assert_array_equal(full_flat[k], hf_flat[k], err_msg=k)
    model = conv.from_lavis(d / "eva_vit_g.pth", d / "instruct_blip_trimmed.pth", config=hf_cfg)
    _, post_ref = _ref(blip2[0], pixels)
    assert rel(run(model, jnp.asarray(pixels))[1], post_ref) <= 1e-4
    # default LAVIS config: ln_vision eps 1e-5 (torch default), not HF's 1e-6
    lavis_cfg = dataclasses.replace(hf_cfg, post_eps=EvaViTConfig().post_eps)
    assert lavis_cfg.post_eps == 1e-5
    m5 = conv.from_lavis(d / "eva_vit_g.pth", d / "instruct_blip_trimmed.pth", config=lavis_cfg,
                           param_dtype=jnp.bfloat16)
    assert m5.post_norm.eps == 1e-5 and m5.pos_embed[...].dtype == jnp.bfloat16


def test_lavis_needs_ln_vision(lavis_files):
    d, sd, ln = lavis_files
    cfg = EvaViTConfig(**{**dataclasses.asdict(EvaViTConfig()), "image_size": 28, "width": D,
                          "depth": 2, "heads": 4, "mlp_dim": 128})
    with pytest.raises(CheckpointError, match=r"eva_vit_g\.pth: no ln_vision.*allow_missing_post_norm"):
        conv.convert_lavis(d / "eva_vit_g.pth", config=cfg)
    m = conv.from_lavis(d / "eva_vit_g.pth", config=cfg, allow_missing_post_norm=True)
    np.testing.assert_array_equal(np.asarray(m.post_norm.scale[...]), np.ones(D, np.float32))
    tensors = {"weight": ln["ln_vision.weight"], "bias": ln["ln_vision.bias"].numpy()}
    flat = conv.convert_lavis(d / "eva_vit_g.pth", tensors, config=cfg)
    np.testing.assert_array_equal(flat["post_norm/scale"], ln["ln_vision.weight"].numpy())
    with pytest.raises(CheckpointMismatch, match=r"eva_vit_g\.pth(.|\n)*missing keys.*ln_vision\.weight"):
        conv.convert_lavis(d / "eva_vit_g.pth", d / "eva_vit_g.pth", config=cfg)


def test_lavis_pos_embed_of_another_size_is_resized_like_lavis(lavis_files, tmp_path):
    d, sd, ln = lavis_files
    sd = dict(sd)
    pe = torch.randn(1, 1 + 9, D)  # a 3x3 table for a model with a 2x2 grid
    sd["pos_embed"] = pe
    torch.save(sd, tmp_path / "vit.pth")
    cfg = EvaViTConfig(image_size=28, width=D, depth=2, heads=4, mlp_dim=128)
    flat = conv.convert_lavis(tmp_path / "vit.pth", ln, config=cfg)
    grid = pe[:, 1:].reshape(1, 3, 3, D).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False)
    ref = torch.cat([pe[:, :1], ref.permute(0, 2, 3, 1).reshape(1, 4, D)], 1).numpy()
    np.testing.assert_allclose(flat["pos_embed"], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grid,new", [(4, (6, 6)), (4, (2, 3)), (16, (20, 12)), (5, (5, 7)), (3, (1, 1))])
def test_resize_pos_embed_matches_torch_bicubic(grid, new):
    pe = np.random.default_rng(grid).normal(size=(1, 1 + grid * grid, 8)).astype(np.float32)
    t = torch.from_numpy(pe[:, 1:]).reshape(1, grid, grid, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(t, size=new, mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
    for out in (resize_pos_embed(pe, new), np.asarray(resize_pos_embed(jnp.asarray(pe), new))):
        assert out.shape == (1, 1 + new[0] * new[1], 8)
        np.testing.assert_array_equal(out[:, :1], pe[:, :1])
        np.testing.assert_allclose(out[:, 1:], ref, rtol=0, atol=1e-5)
    # jax.image.resize's cubic kernel (a=-0.5) is a different function: the reason for our own
    if new == (6, 6):
        jx = jax.image.resize(jnp.asarray(pe[:, 1:].reshape(1, grid, grid, 8)), (1, 6, 6, 8), "cubic")
        assert np.abs(np.asarray(jx).reshape(1, -1, 8) - ref).max() > 1e-3
    np.testing.assert_allclose(bicubic_matrix(7, 7), np.eye(7), atol=1e-12)


@pytest.mark.parametrize("hw", [(42, 42), (42, 28)])
def test_other_image_size_matches_hf_interpolate_pos_encoding(blip2, hw):
    ref_model, path = blip2
    px = np.random.default_rng(1).normal(size=(1, *hw, 3)).astype(np.float32)
    _, post_ref = _ref(ref_model, px, interpolate_pos_encoding=True)
    out = run(conv.from_hf(path), jnp.asarray(px))[1]
    assert out.shape == (1, 1 + (hw[0] // 14) * (hw[1] // 14), D)
    assert rel(out, post_ref) <= 1e-4


# ----------------------------------------------------------------------------- errors

def _edited_copy(src, dst, edit):
    dst.mkdir(exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    sd = load_file(str(src / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst / "model.safetensors"


def test_hf_mis_shaped_missing_and_unexpected_keys_are_listed(blip2, tmp_path):
    _, path = blip2

    def edit(sd):
        sd["encoder.layers.1.mlp.fc1.weight"] = np.zeros((127, D), np.float32)
        del sd["encoder.layers.0.layer_norm2.bias"]
        sd["encoder.layers.0.self_attn.k_bias"] = np.zeros((D,), np.float32)
        sd["encoder.layers.2.mlp.fc1.bias"] = np.zeros((128,), np.float32)  # beyond num_hidden_layers

    f = _edited_copy(path, tmp_path / "bad", edit)
    with pytest.raises(CheckpointMismatch) as e:
        conv.convert_hf(tmp_path / "bad")
    msg = str(e.value)
    assert str(f) in msg
    assert "encoder.layers.1.mlp.fc1.weight (checkpoint (127, 64), model (128, 64))" in msg
    assert "missing keys (1): encoder.layers.0.layer_norm2.bias" in msg
    assert "encoder.layers.0.self_attn.k_bias" in msg and "encoder.layers.2.mlp.fc1.bias" in msg


def test_hf_nonzero_key_bias_is_rejected(blip2, tmp_path):
    _, path = blip2

    def edit(sd):
        sd["encoder.layers.1.self_attn.qkv.bias"][D + 3] = 0.5

    f = _edited_copy(path, tmp_path / "kbias", edit)
    with pytest.raises(CheckpointError, match="non-zero key segment") as e:
        conv.from_hf(tmp_path / "kbias")
    assert str(f) in str(e.value) and "encoder.layers.1.self_attn.qkv.bias" in str(e.value)


def test_lavis_unknown_key_and_mis_shaped_tensor(lavis_files, tmp_path):
    d, sd, ln = lavis_files
    cfg = EvaViTConfig(image_size=28, width=D, depth=2, heads=4, mlp_dim=128)
    bad = dict(sd)
    bad["norm.weight"] = torch.ones(D)
    bad["blocks.1.attn.q_bias"] = torch.zeros(D + 1)
    del bad["blocks.0.mlp.fc2.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatch) as e:
        conv.convert_lavis(tmp_path / "bad.pth", ln, config=cfg)
    msg = str(e.value)
    assert str(tmp_path / "bad.pth") in msg
    assert "missing keys (1): blocks.0.mlp.fc2.bias" in msg
    assert "unexpected keys (1): norm.weight" in msg
    assert "blocks.1.attn.q_bias (checkpoint (65,), model (64,))" in msg


def test_non_checkpoint_files_are_reported(blip2, tmp_path):
    _, path = blip2
    d = tmp_path / "text"
    d.mkdir()
    shutil.copy(path / "config.json", d / "config.json")
    (d / "model.safetensors").write_text("this is not a safetensors file, just some text\n" * 3)
    with pytest.raises(CheckpointError, match=str(d / "model.safetensors")):
        conv.from_hf(d)
    rnd = tmp_path / "random.pth"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=str(rnd)):
        conv.convert_lavis(rnd, allow_missing_post_norm=True)
    with pytest.raises(CheckpointError, match="config.json"):
        conv.convert_hf(tmp_path)


def test_config_from_hf_dicts():
    full = transformers.InstructBlipConfig(vision_config=TINY).to_dict()
    cfg = EvaViTConfig.from_hf_config(full)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.grid) == (64, 2, 4, 128, 2)
    assert cfg.eps == cfg.post_eps == 1e-6
    paper = EvaViTConfig.from_hf_config({"model_type": "blip_2_vision_model"})  # defaults omitted
    assert dataclasses.replace(paper, post_eps=1e-5) == EvaViTConfig()
    assert EvaViTConfig().head_dim == 88 and EvaViTConfig().num_patches == 256
    with pytest.raises(ValueError, match="gelu"):
        EvaViTConfig.from_hf_config({"hidden_act": "quick_gelu"})
    json.dumps(dataclasses.asdict(cfg))  # plain values only
