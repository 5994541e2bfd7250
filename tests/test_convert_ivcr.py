"""The IVCR init recipe on synthetic files written by torch in the reference key layouts."""
import numpy as np
import pytest
import torch

from ivcr_jax.cli import load_config
from ivcr_jax.models import params as params_lib
from ivcr_jax.convert.__main__ import main as convert_main
from ivcr_jax.convert.store import load_into
from ivcr_jax.models import build

CFG = build.model_config(load_config("configs/paper.py:tiny").model)
D = 64


def _noisy(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def _qformer_lavis(hf_sd, prefix):
    out = {}
    for k, v in hf_sd.items():
        k = k.replace(".attention.attention.", ".attention.self.").replace(
            ".crossattention.attention.", ".crossattention.self.").replace(
            "embeddings.layernorm.", "embeddings.LayerNorm.")
        if k.startswith("layernorm."):
            k = "embeddings.LayerNorm." + k[len("layernorm."):]
        out[prefix + k] = v.detach().clone()
    return out


def _eva_lavis(hf_sd, depth):
    sd = {"cls_token": hf_sd["embeddings.class_embedding"], "pos_embed": hf_sd["embeddings.position_embedding"],
          "patch_embed.proj.weight": hf_sd["embeddings.patch_embedding.weight"],
          "patch_embed.proj.bias": hf_sd["embeddings.patch_embedding.bias"]}
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.projection",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(depth + 1):                       # one extra stored block, as in eva_vit_g.pth
        j = min(i, depth - 1)
        h, b = f"encoder.layers.{j}.", f"blocks.{i}."
        for ours, theirs in names.items():
            sd[b + ours + ".weight"] = hf_sd[h + theirs + ".weight"]
            sd[b + ours + ".bias"] = hf_sd[h + theirs + ".bias"]
        sd[b + "attn.qkv.weight"] = hf_sd[h + "self_attn.qkv.weight"]
        qkv_b = hf_sd[h + "self_attn.qkv.bias"]
        sd[b + "attn.q_bias"], sd[b + "attn.v_bias"] = qkv_b[:D].clone(), qkv_b[2 * D:].clone()
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from transformers import (Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel,
                              InstructBlipQFormerConfig, InstructBlipQFormerModel, LlamaConfig,
                              LlamaForCausalLM)
    d = tmp_path_factory.mktemp("ivcr_sources")
    torch.manual_seed(0)
    llama = _noisy(LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=D, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4)), 1)
    llama.save_pretrained(d / "llama")
    vit = _noisy(Blip2VisionModel(Blip2VisionConfig(hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=28, patch_size=14)), 2)
    vsd = vit.state_dict()
    vsd["encoder.layers.0.self_attn.qkv.bias"][D:2 * D] = 0
    vsd["encoder.layers.1.self_attn.qkv.bias"][D:2 * D] = 0
    torch.save(_eva_lavis(vsd, 2), d / "eva_vit_g.pth")

    qcfg = dict(vocab_size=32005, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=64, cross_attention_frequency=2, encoder_hidden_size=D)
    ib_q = _noisy(InstructBlipQFormerModel(InstructBlipQFormerConfig(**qcfg)), 3)
    ln = {"ln_vision.weight": torch.rand(D) + 0.5, "ln_vision.bias": torch.randn(D)}
    ib = {**_qformer_lavis(ib_q.state_dict(), "Qformer.bert."), "query_tokens": torch.randn(1, 8, D), **ln,
          "Qformer.cls.predictions.bias": torch.zeros(32005), "llm_proj.weight": torch.zeros(32, D)}
    torch.save({"model": ib}, d / "instructblip.pth")

    tc_q = _noisy(InstructBlipQFormerModel(InstructBlipQFormerConfig(**qcfg)), 4)
    vcfg = dict(hidden_size=D, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                cross_attention_frequency=1, encoder_hidden_size=D)
    tc_v = _noisy(Blip2QFormerModel(Blip2QFormerConfig(**vcfg)), 5)
    tc = {**_qformer_lavis(tc_q.state_dict(), "Qformer.bert."), "query_tokens": torch.randn(1, 8, D),
          **_qformer_lavis(tc_v.state_dict(), "video_Qformer.bert."),
          "video_query_tokens": torch.randn(1, 8, D), "video_frame_position_embedding.weight": torch.randn(96, D),
          "llama_proj.weight": torch.randn(D, D), "llama_proj.bias": torch.randn(D)}
    pre = "llama_model.base_model.model.model.layers"
    for i in range(2):
        for p in ("q", "k", "v", "o"):
            tc[f"{pre}.{i}.self_attn.{p}_proj.lora_A.default.weight"] = torch.randn(8, D)
            tc[f"{pre}.{i}.self_attn.{p}_proj.lora_B.default.weight"] = torch.randn(D, 8)
    torch.save({"model": tc, "optimizer": {}, "epoch": 2}, d / "timechat_7b.pth")

    vl_v = _noisy(Blip2QFormerModel(Blip2QFormerConfig(**vcfg)), 6)
    vl = {**_qformer_lavis(vl_v.state_dict(), "video_Qformer.bert."), "video_query_tokens": torch.randn(1, 8, D),
          "video_frame_position_embedding.weight": torch.randn(32, D), "llama_proj.weight": torch.randn(D, D),
          "llama_proj.bias": torch.randn(D)}
    torch.save({"model": vl}, d / "VL_LLaMA_2_7B_Finetuned.pth")
    return dict(dir=d, llama=llama, ln=ln, tc=tc, vl=vl, vsd=vsd)


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    d = sources["dir"]
    out = tmp_path_factory.mktemp("conv") / "ivcr_init"
    rc = convert_main(["ivcr", "--config", "configs/paper.py:tiny", "--llama", str(d / "llama"),
                       "--eva-vit", str(d / "eva_vit_g.pth"), "--instructblip", str(d / "instructblip.pth"),
                       "--timechat", str(d / "timechat_7b.pth"),
                       "--videollama", str(d / "VL_LLaMA_2_7B_Finetuned.pth"), "--out", str(out)])
    assert rc == 0
    model = build.build_model(CFG, seed=1)
    load_into(model, out)
    return out, params_lib.flat_state(model)


def _np(v):
    return np.asarray(v.get_value(), np.float32)


def test_recipe_takes_each_part_from_the_right_file(sources, converted):
    _, flat = converted
    tc, vl = sources["tc"], sources["vl"]
    # LLaMA base from the HF dir, 5 deterministic (mean) rows appended.
    lm = sources["llama"].state_dict()["lm_head.weight"].numpy()
    np.testing.assert_allclose(_np(flat["llama/lm_head/kernel"])[:, :32000], lm.T, rtol=1e-6)
    emb = sources["llama"].state_dict()["model.embed_tokens.weight"].numpy()
    np.testing.assert_allclose(_np(flat["llama/embed_tokens/embedding"])[32000:],
                               np.repeat(emb.mean(0, keepdims=True), 5, 0), rtol=1e-5, atol=1e-6)
    # ln_vision from the InstructBLIP file.
    np.testing.assert_allclose(_np(flat["vit/post_norm/scale"]), sources["ln"]["ln_vision.weight"].numpy())
    # Query tokens: TimeChat overrides InstructBLIP.
    np.testing.assert_allclose(_np(flat["qformer/query_tokens"]), tc["query_tokens"].numpy(), rtol=1e-6)
    # Video Q-Former weights from Video-LLaMA; its queries, frame table and projection from TimeChat.
    key = "video_Qformer.bert.encoder.layer.0.crossattention.self.query.weight"
    np.testing.assert_allclose(_np(flat["video_qformer/bert/layers/0/cross_attn/query/kernel"]),
                               vl[key].numpy().T, rtol=1e-6)
    np.testing.assert_allclose(_np(flat["video_qformer/video_query_tokens"]), tc["video_query_tokens"].numpy())
    np.testing.assert_allclose(_np(flat["video_qformer/frame_position_embedding"]),
                               tc["video_frame_position_embedding.weight"].numpy())
    np.testing.assert_allclose(_np(flat["llama_proj/kernel"]), tc["llama_proj.weight"].numpy().T, rtol=1e-6)
    a = tc["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight"].numpy()
    np.testing.assert_allclose(_np(flat["llama/layers/1/self_attn/v_proj/lora_a"]), a.T, rtol=1e-6)


def test_converted_model_runs(converted):
    import jax
    out, flat = converted
    model = build.build_model(CFG, seed=0)
    load_into(model, out)
    logits = jax.jit(lambda m, ids: m.llama(ids).logits)(model, np.ones((1, 8), np.int32))
    assert logits.shape == (1, 8, 32005) and np.isfinite(np.asarray(logits)).all()


def test_missing_timechat_part_is_reported(sources, tmp_path):
    d = sources["dir"]
    tc = torch.load(d / "timechat_7b.pth", weights_only=True)
    del tc["model"]["llama_proj.weight"]
    torch.save(tc, tmp_path / "broken.pth")
    rc = convert_main(["ivcr", "--config", "configs/paper.py:tiny", "--llama", str(d / "llama"),
                       "--eva-vit", str(d / "eva_vit_g.pth"), "--instructblip", str(d / "instructblip.pth"),
                       "--timechat", str(tmp_path / "broken.pth"), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert not (tmp_path / "out" / "params").exists()


def test_inspect_lists_tensors(sources, capsys):
    assert convert_main(["inspect", str(sources["dir"] / "timechat_7b.pth"), "--limit", "3"]) == 0
    assert "tensors" in capsys.readouterr().out
