"""The InterLLaVA composition: special tokens, the <VIDEOTOKEN> splice, token counts, dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ivcr_jax.cli import load_config
from ivcr_jax.data.batch import BatchLayout, pack_videos
from ivcr_jax.models import build
from ivcr_jax.tokenizer import SPECIAL_TOKENS, VIDEO_TOKEN


def test_tokenizer_has_the_five_ivcr_tokens(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == [32000, 32001, 32002, 32003, 32004]
    enc = tokenizer("Current video : <VID> 3 </VID> <VIDEO> <VIDEOTOKEN> </VIDEO>.", add_special_tokens=False).input_ids
    assert enc.count(32004) == 1 and 32000 in enc and 32003 in enc
    assert tokenizer.pad_token_id == 2 and tokenizer.bos_token_id == 1


@pytest.fixture(scope="module")
def model():
    cfg = load_config("configs/paper.py:tiny")
    return cfg, build.build_model(build.model_config(cfg.model), seed=0)


def _group(b, v, t, size, L, seed):
    r = np.random.default_rng(seed)
    return {"frames": r.integers(0, 255, (b, v, t, size, size, 3), dtype=np.uint8),
            "timestamp_ids": r.integers(3, 1000, (b, v, t, L)).astype(np.int32),
            "timestamp_mask": np.ones((b, v, t, L), np.int32),
            "frame_mask": np.ones((b, v, t), bool), "video_mask": np.ones((b, v), bool)}


def _packed(dense):
    """Per-slot videos (the unpacked layout) → the batch's ``(videos, pool)`` (data/batch.py)."""
    g0 = next(iter(dense.values()))
    layout = BatchLayout({g: a["frame_mask"].shape[1:] for g, a in dense.items()}, g0["frames"].shape[-2],
                         g0["timestamp_ids"].shape[-1], pool_sizes=(8,))
    return pack_videos(layout, dense)


def test_video_tokens_are_spliced_at_the_placeholder_positions(model, tokenizer):
    cfg, m = model
    q = cfg.model.video_qformer.num_query_tokens
    # one retrieval-style group (2 videos of 12 frames -> q tokens each), one moment video of 40
    # frames (2 windows -> 2q tokens)
    videos = {"f12": _group(1, 2, 12, 28, 8, 0), "f40": _group(1, 1, 40, 28, 8, 1)}
    n12, n40 = 2 * q, 2 * q
    text = tokenizer("[INST] a " + VIDEO_TOKEN + " b " + VIDEO_TOKEN + " c " + VIDEO_TOKEN + " [/INST]",
                     add_special_tokens=False).input_ids
    # expand the placeholders: 2nd placeholder = the moment video (group f40), others = f12 slots
    order = [("f12", 0), ("f40", 0), ("f12", 1)]
    offset = {"f12": 0, "f40": n12}           # sorted group names: f12 first, then f40
    ids, idx = [], []
    it = iter(order)
    for t in text:
        if t == 32004:
            g, slot = next(it)
            ids += [32004] * q * (1 if g == "f12" else 2)
            base = offset[g] + slot * q
            idx += list(range(base, base + q * (1 if g == "f12" else 2)))
        else:
            ids.append(t)
            idx.append(-1)
    videos, pool = _packed(videos)
    batch = {"input_ids": np.array([ids], np.int32), "attention_mask": np.ones((1, len(ids)), np.int32),
             "video_token_index": np.array([idx], np.int32), "videos": videos, "pool": pool}
    emb = np.asarray(jax.jit(lambda m, b: m.input_embeddings(b))(m, batch))[0]
    vt = np.asarray(jax.jit(lambda m, v, p: m.video_tokens(v, p))(m, videos, pool))[0]
    assert vt.shape[0] == n12 + n40                       # 12 frames -> q tokens, 40 -> 2q
    txt = np.asarray(m.llama.embed(jnp.asarray(batch["input_ids"])))[0]
    idx = np.array(idx)
    np.testing.assert_array_equal(emb[idx < 0], txt[idx < 0])
    np.testing.assert_array_equal(emb[idx >= 0], vt[idx[idx >= 0]])
    # the moment video's block sits where the 2nd placeholder was, in window order
    second = np.nonzero(np.array(ids) == 32004)[0][q:q + 2 * q]
    np.testing.assert_array_equal(emb[second], vt[n12:n12 + n40])


def test_dtypes_per_group_and_trainable_split():
    from ivcr_jax.models.params import trainable_filter
    cfg = load_config("configs/paper.py")
    abstract = build.abstract_model(build.model_config(cfg.model))
    _, tr, fr = nnx.split(abstract, trainable_filter(cfg.trainable), ...)
    tr_dtypes = {str(v.get_value().dtype) for _, v in nnx.to_flat_state(tr)}
    fr_dtypes = {str(v.get_value().dtype) for _, v in nnx.to_flat_state(fr)}
    assert tr_dtypes == {"float32"} and fr_dtypes == {"bfloat16"}
    n_tr = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(tr))
    n_fr = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(fr))
    # reference-architecture §3: ≈ 241 M trainable (33.6 M LoRA); ViT-g 39 blocks ≈ 986 M + LLaMA-2-7B
    assert 200e6 < n_tr < 260e6, n_tr
    assert 7.5e9 < n_fr < 8.0e9, n_fr


def test_fan_in_random_init_makes_the_video_tokens_depend_on_the_frames():
    """init.random_init="fan_in" (the demo): N(0, 1/fan_in) weight matrices, LoRA untouched. With
    HF's N(0, 0.02²) at width 64 the video tokens of two different clips are nearly equal (the
    demo could not learn from them); with fan_in they differ (two noise clips: ~8 %, 2500x more)."""
    cfg = build.model_config(load_config("configs/demo.py").model)
    rel = {}
    for init in ("bert", "fan_in"):
        m = build.build_model(cfg, seed=0, random_init=init)
        lora = [np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param)) if "lora_a" in str(p)]
        a, b = (_group(1, 1, 16, 56, 12, s) for s in (1, 2))
        b["timestamp_ids"] = a["timestamp_ids"]  # the same frame times, other pixels
        va, vb = (m.video_tokens(*_packed({"f16": x})) for x in (a, b))
        rel[init] = float(jnp.abs(va - vb).mean() / jnp.abs(va).mean())
        if init == "fan_in":
            kern = np.asarray(m.llama_proj.kernel[...])
            assert kern.std() == pytest.approx(kern.shape[0] ** -0.5, rel=0.1)
        else:
            lora_bert = lora
    assert [x.tolist() for x in lora] == [x.tolist() for x in lora_bert]  # LoRA factors unchanged
    assert rel["bert"] < 1e-3 and rel["fan_in"] > max(0.03, 100 * rel["bert"]), rel
    with pytest.raises(ValueError, match="random_init"):
        build.build_model(cfg, random_init="xavier")
