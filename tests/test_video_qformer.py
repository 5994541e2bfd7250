"""Video Q-Former: one window = HF Blip2QFormerModel, sliding windows = TimeChat's loop, LAVIS keys."""
import dataclasses
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from ivcr_jax.convert import common, qformer as qf_conv  # noqa: E402
from ivcr_jax.models import params as params_lib  # noqa: E402
from ivcr_jax.models.params import CheckpointError, CheckpointMismatch
from ivcr_jax.convert.qformer import (LAVIS_IGNORED, convert_hf_qformer, convert_lavis, empty_model,  # noqa: E402
                                      video_qformer_flat)
from ivcr_jax.models.qformer import QFormerConfig  # noqa: E402
from ivcr_jax.models.video_qformer import (VideoQFormer, VideoQFormerConfig, interpolate_frame_pos,  # noqa: E402
                                           num_video_tokens)
from reference import noisy as _noisy, rel_err as _rel  # noqa: E402

D, L, NQ = 64, 3, 4          # width, tokens per frame (queries + kept text), video queries
VCFG = VideoQFormerConfig(hidden=D, layers=2, heads=4, mlp_dim=128, encoder_width=D, num_query_tokens=NQ,
                          max_frame_pos=96, window=4, stride=4)
BLIP2 = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             cross_attention_frequency=1, encoder_hidden_size=D)




@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """HF Blip2QFormerModel (cross-attention in every layer) + video queries + a 32-row frame table."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    hf = _noisy(Blip2QFormerModel(Blip2QFormerConfig(**BLIP2)), 0)
    d = tmp_path_factory.mktemp("blip2_qformer")
    hf.save_pretrained(d)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(1, NQ, D, generator=g)
    table32 = torch.randn(32, D, generator=g)          # Video-LLaMA's table size
    return dict(hf=hf, dir=d, tokens=tokens, table32=table32,
                table=torch.from_numpy(np.asarray(interpolate_frame_pos(table32.numpy(), 96))))


def _model(ref, cfg=VCFG):
    bert = convert_hf_qformer(common.read_hf_dir(ref["dir"]), source=str(ref["dir"])).qformer
    m = empty_model(lambda: VideoQFormer(cfg, rngs=nnx.Rngs(0)))
    params_lib.load_flat(m, video_qformer_flat(bert, ref["tokens"].numpy(), ref["table32"].numpy(),
                                           max_frame_pos=cfg.max_frame_pos))
    return m


def _timechat_loop(ref, frames, window, stride):
    """TimeChat ``encode_videoQformer_visual`` (window branch) over the HF module, in torch."""
    b, t, l, d = frames.shape
    x = frames + ref["table"][torch.arange(t)][None, :, None, :]
    outs = []
    for i in range(0, t, stride):
        clip = x[:, i:i + window].reshape(b, -1, d)
        atts = torch.ones(clip.shape[:-1], dtype=torch.long)
        with torch.no_grad():
            outs.append(ref["hf"](query_embeds=ref["tokens"].expand(b, -1, -1), encoder_hidden_states=clip,
                                  encoder_attention_mask=atts).last_hidden_state)
    return torch.cat(outs, 1).numpy()


def _frames(b, t, l=L, seed=0):
    return np.random.default_rng(seed).normal(size=(b, t, l, D)).astype(np.float32)


@nnx.jit
def _run(m, x):
    return m(x)


@nnx.jit
def _run_masked(m, x, frame_mask, token_mask):
    return m(x, frame_mask=frame_mask, token_mask=token_mask)


def test_one_window_equals_blip2_qformer(ref):
    m = _model(ref)
    x = _frames(2, 4)
    with torch.no_grad():
        enc = torch.from_numpy(x) + ref["table"][:4][None, :, None, :]
        want = ref["hf"](query_embeds=ref["tokens"].expand(2, -1, -1),
                         encoder_hidden_states=enc.reshape(2, 4 * L, D)).last_hidden_state.numpy()
    out = _run(m, x)
    assert out.shape == (2, NQ, D)
    assert _rel(out, want) <= 1e-4


def test_windows_match_timechat_loop_with_partial_last_window(ref):
    m = _model(ref)
    x = _frames(2, 10, seed=1)                  # windows [0,4) [4,8) [8,10)
    out = _run(m, x)
    assert out.shape == (2, 3 * NQ, D)
    assert _rel(out, _timechat_loop(ref, torch.from_numpy(x), 4, 4)) <= 1e-4


def test_general_stride_and_padding_masks_match_timechat_loop(ref):
    cfg = dataclasses.replace(VCFG, window=4, stride=3)
    m = _model(ref, cfg)
    x = _frames(2, 10, seed=2)                  # windows at 0, 3, 6, 9 (overlapping, last of 1 frame)
    frame_mask = np.ones((2, 10), bool)
    frame_mask[1, 7:] = False                   # video 1 has 7 frames
    token_mask = np.ones((2, 10, L), bool)
    token_mask[1, :, L - 1] = False             # and its per-video longest timestamp text is 1 shorter
    out = np.asarray(_run_masked(m, x, frame_mask, token_mask))
    assert out.shape == (2, 4 * NQ, D) and num_video_tokens(10, cfg) == 4 * NQ
    assert _rel(out[:1], _timechat_loop(ref, torch.from_numpy(x[:1]), 4, 3)) <= 1e-4
    short = _timechat_loop(ref, torch.from_numpy(x[1:, :7, :L - 1]), 4, 3)   # 3 windows
    assert _rel(out[1:, :num_video_tokens(7, cfg)], short) <= 1e-4


def test_dropout_only_with_a_key(ref):
    m = _model(ref)
    x = _frames(2, 4)
    f = nnx.jit(lambda m, x, r: m(x, rng=r))
    key = lambda i: jax.random.key(i, impl="rbg")   # noqa: E731  (cheaper to compile than threefry on CPU)
    a, b = f(m, x, key(0)), f(m, x, key(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = np.asarray(f(m, x, key(1)))
    det = np.asarray(_run(m, x))
    assert np.isfinite(c).all() and not np.allclose(c, np.asarray(a)) and not np.allclose(c, det)


def test_token_counts_and_shapes():
    paper = VideoQFormerConfig()
    assert [num_video_tokens(t, paper) for t in (96, 12, 40)] == [96, 32, 64]
    cfg = VideoQFormerConfig(hidden=32, layers=1, heads=4, mlp_dim=64, encoder_width=32, num_query_tokens=32,
                             max_frame_pos=96, window=32, stride=32)
    m = nnx.eval_shape(lambda: VideoQFormer(cfg, rngs=nnx.Rngs(0)))
    for t, n in ((96, 96), (12, 32), (40, 64)):
        out = nnx.eval_shape(lambda m, x: m(x), m, jax.ShapeDtypeStruct((2, t, 5, 32), jnp.float32))
        assert out.shape == (2, n, 32) and num_video_tokens(t, cfg) == n
    # window <= 0: Video-LLaMA's single pass over all frames
    single = dataclasses.replace(cfg, window=0)
    ms = nnx.eval_shape(lambda: VideoQFormer(single, rngs=nnx.Rngs(0)))
    assert nnx.eval_shape(lambda m, x: m(x), ms, jax.ShapeDtypeStruct((1, 40, 5, 32), jnp.float32)).shape == (1, 32, 32)
    assert num_video_tokens(40, single) == 32


def test_too_many_frames_is_an_error(ref):
    m = nnx.eval_shape(lambda: VideoQFormer(VCFG, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="max_frame_pos=96"):
        nnx.eval_shape(lambda m, x: m(x), m, jax.ShapeDtypeStruct((1, 97, L, D), jnp.float32))


@pytest.mark.parametrize("old,new", [(32, 96), (96, 64), (96, 96), (32, 64), (7, 3), (5, 13), (96, 95)])
def test_interpolate_frame_pos_equals_torch_nearest(old, new):
    table = torch.randn(old, 8)
    want = torch.nn.functional.interpolate(table.T[None], size=new, mode="nearest")[0].T.numpy()
    np.testing.assert_array_equal(interpolate_frame_pos(table.numpy(), new), want)
    if (old, new) == (32, 96):   # jax arrays index the same way
        np.testing.assert_array_equal(np.asarray(interpolate_frame_pos(jnp.asarray(table.numpy()), new)), want)


# ----------------------------------------------------------------------------- LAVIS / TimeChat layout

QCFG = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
            max_position_embeddings=32, encoder_hidden_size=48, cross_attention_frequency=2)
IMAGE = QFormerConfig(vocab_size=100, hidden=D, layers=2, heads=4, mlp_dim=128, max_positions=32,
                      cross_attention_freq=2, encoder_width=48, num_query_tokens=4)


def _lavis_name(hf_key: str, prefix: str) -> str:
    """HF Q-Former key -> the LAVIS/TimeChat spelling."""
    k = hf_key.replace(".attention.attention.", ".attention.self.").replace(
        ".crossattention.attention.", ".crossattention.self.")
    k = k.replace("embeddings.layernorm.", "embeddings.LayerNorm.")
    if k.startswith("layernorm."):                           # Blip2QFormerModel
        k = "embeddings.LayerNorm." + k[len("layernorm."):]
    return prefix + k


@pytest.fixture(scope="module")
def lavis(ref, tmp_path_factory):
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel
    image = _noisy(InstructBlipQFormerModel(InstructBlipQFormerConfig(**QCFG)), 3)
    d = tmp_path_factory.mktemp("lavis")
    image.save_pretrained(d / "image")
    sd = {_lavis_name(k, "Qformer.bert."): v.clone() for k, v in image.state_dict().items()}
    sd["query_tokens"] = torch.randn(1, 4, D)
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(32)[None]
    sd["Qformer.cls.predictions.bias"] = torch.zeros(100)
    sd["Qformer.cls.predictions.transform.dense.weight"] = torch.zeros(D, D)
    sd.update({_lavis_name(k, "video_Qformer.bert."): v.clone() for k, v in ref["hf"].state_dict().items()})
    sd["video_Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    sd["video_query_tokens"] = ref["tokens"].clone()
    sd["video_frame_position_embedding.weight"] = ref["table32"].clone()
    sd["ln_vision.weight"], sd["ln_vision.bias"] = torch.ones(48), torch.zeros(48)
    sd["llama_proj.weight"], sd["llama_proj.bias"] = torch.zeros(32, D), torch.zeros(32)
    sd["llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(2, 32)
    sd["llm_proj.weight"] = torch.zeros(32, D)
    assert any(k.endswith("attention.self.query.weight") for k in sd)
    assert "Qformer.bert.embeddings.LayerNorm.weight" in sd and "video_Qformer.bert.embeddings.LayerNorm.weight" in sd
    path = d / "timechat_like.pth"
    torch.save({"model": sd, "epoch": 1}, path)
    return dict(path=path, sd=sd, image_dir=d / "image", dir=d)


def test_lavis_file_loads_and_matches_hf_route(ref, lavis):
    # image Q-Former: exactly the HF route's parameters, plus the query tokens
    ours = qf_conv.from_lavis(lavis["path"], IMAGE)
    hf_route = qf_conv.from_hf(lavis["image_dir"])
    got, want = params_lib.flat_state(ours), params_lib.flat_state(hf_route)
    assert set(got) == set(want) | {"query_tokens"}
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k][...]), np.asarray(want[k][...]), err_msg=k)
    np.testing.assert_array_equal(np.asarray(ours.query_tokens[...]), lavis["sd"]["query_tokens"].numpy())
    # video Q-Former: the 32-row table is resized to 96 like TimeChat, and the outputs match
    video = qf_conv.video_from_lavis(lavis["path"], VCFG)
    np.testing.assert_array_equal(np.asarray(video.frame_position_embedding[...]), ref["table"].numpy())
    x = _frames(2, 4)
    np.testing.assert_array_equal(np.asarray(_run(video, x)), np.asarray(_run(_model(ref), x)))


def test_lavis_routing_lists_every_key(lavis):
    sd = {k: v.numpy() for k, v in lavis["sd"].items()}
    parts = convert_lavis(sd.items(), source="x.pth", max_frame_pos=96)
    assert set(parts.other) == {"vision", "llama_proj", "llm"}
    assert sorted(parts.ignored) == sorted(k for k in sd if any(re.fullmatch(p, k) for p in LAVIS_IGNORED))
    assert {"Qformer.cls.predictions.bias", "Qformer.bert.embeddings.position_ids", "llm_proj.weight",
            "video_Qformer.bert.embeddings.position_ids"} <= set(parts.ignored)
    n_routed = len(parts.qformer) + len(parts.video_qformer) + sum(map(len, parts.other.values())) + len(parts.ignored)
    assert n_routed == len(sd)
    # TimeChat without qformer_text_input drops the image Q-Former's text branch on purpose
    no_text = convert_lavis(sd.items(), image_text=False)
    assert not any("word_embeddings" in k or "ffn_text" in k for k in no_text.qformer)


def _save(lavis, name, edit):
    sd = dict(lavis["sd"])
    edit(sd)
    path = lavis["dir"] / name
    torch.save({"model": sd}, path)
    return path


def test_lavis_errors_name_file_and_keys(lavis):
    p = _save(lavis, "unknown.pth", lambda sd: sd.update({"video_Qformer.bert.pooler.dense.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointMismatch) as e:
        qf_conv.video_from_lavis(p, VCFG)
    assert "unknown.pth" in str(e.value) and e.value.unexpected == ["video_Qformer.bert.pooler.dense.weight"]

    p = _save(lavis, "missing.pth", lambda sd: sd.pop("video_Qformer.bert.encoder.layer.1.crossattention.self.key.bias"))
    with pytest.raises(CheckpointMismatch) as e:
        qf_conv.video_from_lavis(p, VCFG)
    assert "missing.pth" in str(e.value) and e.value.missing == ["bert/layers/1/cross_attn/key/bias"]

    p = _save(lavis, "shape.pth", lambda sd: sd.update({"query_tokens": torch.zeros(1, 5, D)}))
    with pytest.raises(CheckpointMismatch) as e:
        qf_conv.from_lavis(p, IMAGE)
    assert "shape.pth" in str(e.value) and e.value.mismatched == [("query_tokens", (1, 5, D), (1, 4, D))]

    p = _save(lavis, "no_video.pth", lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("video")])
    with pytest.raises(CheckpointError, match="no_video.pth.*video_Qformer"):
        qf_conv.video_from_lavis(p, VCFG)

    p = lavis["dir"] / "notes.pth"
    p.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth"):
        qf_conv.video_from_lavis(p, VCFG)
