"""BLIP-2 ITC features: parity with transformers' ``Blip2ForImageTextRetrieval`` (HF and LAVIS layouts)."""
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from ivcr_jax.models.params import CheckpointError, CheckpointMismatch
from ivcr_jax.data.frames import normalize  # noqa: E402
from reference import rel_err as _rel

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=28, patch_size=14, layer_norm_eps=1e-5)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               vocab_size=40, max_position_embeddings=16, encoder_hidden_size=32,
               cross_attention_frequency=2, use_qformer_text_input=True)
WORDS = ["a", "red", "circle", "on", "black", "background", "blue", "square", "video", "of", "the",
         "white", "shows", "up", "find", "##s", "green", "triangle"]
TEXTS = ["a red circle on a black background", "find the blue square", "green triangle shows up"]


def _noisy(model, seed=0):
    """HF's std-0.02 init hides errors under tiny activations: perturb every weight."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
            if name.endswith("self_attn.qkv.bias"):     # EVA has no key bias: cat(q_bias, 0, v_bias)
                d = p.shape[0] // 3
                p[d:2 * d] = 0
    return model.eval()



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random HF Blip2ForImageTextRetrieval (+ a BERT tokenizer) saved with save_pretrained."""
    from transformers import BertTokenizerFast, Blip2Config, Blip2ForImageTextRetrieval
    d = tmp_path_factory.mktemp("blip2_itm")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    tok.save_pretrained(d)
    cfg = Blip2Config(vision_config=VISION, qformer_config=QFORMER, num_query_tokens=6,
                      image_text_hidden_size=16)
    model = _noisy(Blip2ForImageTextRetrieval(cfg))
    model.save_pretrained(d)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    enc = tok(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    pixels = torch.from_numpy(normalize(frames).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    use_image_text_matching_head=False)
    ref = dict(image=out.image_embeds.numpy(), text=out.text_embeds.numpy(), sim=out.logits_per_image.numpy())
    return d, model, frames, enc, ref


def test_itc_features_match_transformers_fp32(checkpoint):
    from ivcr_jax.models.blip2_itc import itc_similarity
    from ivcr_jax.retrieval.features import Blip2Extractor
    d, _, frames, enc, ref = checkpoint
    # default batch sizes and text length (16 = the tiny max_positions): the index CLI test below
    # then reuses these compilations
    ext = Blip2Extractor.from_pretrained(d, num_frames=4, query_pool="none")
    assert (ext.frame_size, ext.dim, ext.tokens_per_frame) == (28, 16, 6)
    img = ext.encode_frames(frames)                                      # [4, 6 queries, 16]
    txt = ext.encode_text(TEXTS)                                         # [3, 16]
    ids = enc["input_ids"].numpy()
    np.testing.assert_array_equal(ext.tokenize(TEXTS)[0], ids)           # the checkpoint's tokenizer
    assert _rel(img, ref["image"]) <= 1e-4
    assert _rel(txt, ref["text"]) <= 1e-4
    sim = itc_similarity(img, txt)                                       # BLIP-2: max over queries
    assert _rel(sim, ref["sim"]) <= 1e-4
    # query_pool="mean": the 32 (here 6) normalised query vectors averaged and re-normalised
    mean = Blip2Extractor(ext.model, ext.tokenizer, num_frames=4, query_pool="mean")
    pooled = mean.encode_frames(frames)
    want = ref["image"].mean(1, keepdims=True)
    assert pooled.shape == (4, 1, 16)
    assert _rel(pooled, want / np.linalg.norm(want, axis=-1, keepdims=True)) <= 1e-4
    assert mean.spec()["query_pool"] == "mean" and mean.spec()["kind"] == "blip2"


def test_itc_features_bf16_within_measured_tolerance(checkpoint):
    from ivcr_jax.retrieval.features import Blip2Extractor
    d, _, frames, _, ref = checkpoint
    ext = Blip2Extractor.from_pretrained(d, num_frames=4, query_pool="none", frame_batch=4,
                                         text_batch=4, dtype="bfloat16")
    assert ext.model.vision.patch_embed.kernel[...].dtype == jnp.bfloat16
    # measured: image 7.7e-3, text 3.7e-3, ITC similarity 3.9e-3 (bf16 params and compute;
    # LayerNorms and softmax in fp32)
    assert _rel(ext.encode_frames(frames), ref["image"]) <= 2e-2
    assert _rel(ext.encode_text(TEXTS), ref["text"]) <= 2e-2


def _to_lavis(sd: dict) -> dict:
    """Rename an HF Blip2ForImageTextRetrieval state dict to LAVIS ``Blip2Qformer`` names."""
    out = {}
    for k, v in sd.items():
        v = v.clone()
        m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", k)
        if m:
            d = v.shape[0] // 3
            out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = v[:d]
            out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = v[2 * d:]
            continue
        for pat, rep in [
            (r"vision_model\.embeddings\.class_embedding", "visual_encoder.cls_token"),
            (r"vision_model\.embeddings\.position_embedding", "visual_encoder.pos_embed"),
            (r"vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
            (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual_encoder.blocks.\1.norm\2."),
            (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
            (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
            (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
            (r"vision_model\.post_layernorm\.", "ln_vision."),
            (r"qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
            (r"embeddings\.(word|position)_embeddings\.", r"Qformer.bert.embeddings.\1_embeddings."),
            (r"qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.", r"Qformer.bert.encoder.layer.\1.\2.self."),
            (r"qformer\.encoder\.", "Qformer.bert.encoder."),
            (r"vision_projection\.", "vision_proj."),
            (r"text_projection\.", "text_proj."),
        ]:
            if re.match(pat, k):
                k = re.sub(pat, rep, k, count=1)
                break
        out[k] = v
    out["temp"] = torch.tensor(0.07)
    out["Qformer.cls.predictions.bias"] = torch.zeros(40)
    return {"model": out}


def test_lavis_stage1_layout_gives_the_same_features(checkpoint, tmp_path):
    from ivcr_jax.convert.blip2_retrieval import convert_hf, load_lavis_stage1
    from ivcr_jax.retrieval.features import Blip2Extractor
    d, model, frames, _, ref = checkpoint
    path = tmp_path / "blip2_pretrained.pth"
    torch.save(_to_lavis(model.state_dict()), path)
    _, cfg = convert_hf(d)                      # same tiny shapes; LAVIS ln_vision eps = 1e-5 = VISION's
    lavis = load_lavis_stage1(path, cfg)
    ext = Blip2Extractor(lavis, None, num_frames=4, query_pool="none")
    assert _rel(ext.encode_frames(frames), ref["image"]) <= 1e-4
    # a stray key is reported with the file name
    bad = _to_lavis(model.state_dict())
    bad["model"]["Qformer.bert.encoder.layer.0.surprise.weight"] = torch.zeros(2)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatch, match=r"bad\.pth[\s\S]*surprise"):
        load_lavis_stage1(tmp_path / "bad.pth", cfg)


def test_wrong_checkpoints_are_rejected(checkpoint, tmp_path):
    from ivcr_jax.convert.blip2_retrieval import load_hf
    d, *_ = checkpoint
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["Blip2ForConditionalGeneration"], '
                                          '"vision_config": {}, "qformer_config": {}}')
    with pytest.raises(CheckpointError, match="Blip2ForImageTextRetrieval"):
        load_hf(tmp_path)


def test_index_cli_builds_blip2_features(checkpoint, tmp_path, sample_videos):
    """``python -m ivcr_jax.retrieval.index --blip2 DIR``: frames decoded at the ViT's size."""
    import shutil
    from ivcr_jax.retrieval.index import VideoIndex, main
    from ivcr_jax.retrieval.search import Retriever
    d, *_ = checkpoint
    videos = tmp_path / "corpus" / "videos" / "sk"
    videos.mkdir(parents=True)
    for stem in ("bikes", "carphone_pristine"):
        shutil.copy(sample_videos[stem], videos / f"{stem}.mp4")
    assert main(["--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "idx"),
                 "--blip2", str(d), "--config.index.shard_size=1"]) == 0
    idx = VideoIndex.load(tmp_path / "idx")
    assert idx.manifest["extractor"]["kind"] == "blip2" and idx.dim == 16 and idx.tokens == 12
    ext = idx.extractor()                                   # rebuilt from the manifest's spec
    assert ext.frame_size == 28 and ext.query_pool == "mean"
    ids, scores = Retriever(idx, None).search(TEXTS[:2], k=2)
    assert sorted(ids[0]) == ["sk/bikes.mp4", "sk/carphone_pristine.mp4"] and scores.shape == (2, 2)
