"""The ViT feature cache: features written once give the eval batch the loss of the online ViT, and a
cache of another ViT is refused with one line."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_generate import random_model

from ivcr_jax import cli
from ivcr_jax.data import features as F
from ivcr_jax.data.pipeline import make_pipeline
from ivcr_jax.data.samples import enumerate_samples
from ivcr_jax.experiment import Experiment
from ivcr_jax.train import losses as L
from ivcr_jax.train.vit_cache import feature_encoder

TINY = "configs/paper.py:tiny"   # fp32 frozen and compute dtypes


@pytest.fixture(scope="module")
def setup(demo_corpus, tmp_path_factory):
    """A 3-dialogue (with retrieval turns) test split of the demo corpus, the tiny model, and its fp32 feature cache."""
    tmp = tmp_path_factory.mktemp("vit_features")
    raw = json.loads((demo_corpus / "ivcr.json").read_text(encoding="utf-8"))
    test = [r for r in raw if r.get("split") == "test" and 1 in r.get("type", [])][:3]   # retrieval turns
    (tmp / "ivcr.json").write_text(json.dumps(test, ensure_ascii=False), encoding="utf-8")
    videos = str(demo_corpus / "videos")
    exp = Experiment.resolve(cli.resolve(TINY, (f"data.annotations={tmp}/ivcr.json", f"data.video_root={videos}")))
    model = random_model(exp)
    encode, shape = feature_encoder(model, 16)
    tokens, width = shape(int(exp.data.frame_size))
    d = exp.data
    path = F.write_features(tmp / "ivcr.json", tmp / "cache", encode=encode, signature=F.vit_signature(model),
                            tokens=tokens, width=width, split="test", retrieval_frames=int(d.retrieval_frames),
                            moment_frames=int(d.moment_frames), size=int(d.frame_size), dtype="float32",
                            videos=videos)
    return exp, model, path


def _first_batch(exp, path=None):
    dialogues, _ = exp.dialogues("test")
    pc = exp.pipeline(2, video_root=exp.video_root(dialogues))
    if path is not None:
        import dataclasses

        pc = dataclasses.replace(pc, vit_features=str(path))
    refs = enumerate_samples(dialogues, pc.sample)
    kw = dict(train=False, seed=0, tokenizer=exp.tokenizer, process_index=0, process_count=1)
    return next(iter(make_pipeline(pc, refs, **kw)))


def _loss(model, batch):
    g, state = nnx.split(model)

    @jax.jit
    def f(state, batch):
        out = nnx.merge(g, state)(batch)
        return L.lm_loss(out.logits, batch["labels"], batch["weight"])[0]
    return float(f(state, jax.tree.map(jnp.asarray, batch)))


def test_cached_features_give_the_online_loss(setup):
    exp, model, path = setup
    online, cached = _first_batch(exp), _first_batch(exp, path)
    assert "frames" in online["pool"] and "vit_features" not in online["pool"]
    assert "frames" not in cached["pool"] and cached["pool"]["vit_features"].dtype == np.float32
    P, Fr = online["pool"]["frames"].shape[:2]
    assert cached["pool"]["vit_features"].shape[:2] == (P, Fr)
    for k in ("input_ids", "labels", "weight"):
        np.testing.assert_array_equal(online[k], cached[k])
    for g in online["videos"]:
        np.testing.assert_array_equal(online["videos"][g]["pool_index"], cached["videos"][g]["pool_index"])
    lo, lc = _loss(model, online), _loss(model, cached)
    assert np.isfinite(lo) and float(online["weight"].sum()) > 0
    np.testing.assert_allclose(lc, lo, rtol=1e-5)
    assert F.vision_line(str(path), model) == f"vision: cached ViT features from {path}"
    assert F.vision_line("", model) == "vision: online ViT"


def test_a_cache_of_another_vit_is_refused_with_one_line(setup):
    exp, _, path = setup
    other = random_model(exp, seed=1)
    with pytest.raises(F.FeatureCacheMismatch) as e:
        F.vision_line(str(path), other)
    msg = str(e.value)
    assert "\n" not in msg and "other ViT weights" in msg and str(path) in msg
    assert isinstance(e.value, cli.UsageError)   # a program prints it as one line and exits 2


def test_command_line_writes_a_bf16_cache_with_a_training_grid(setup, capsys):
    """``python -m ivcr_jax.train.vit_cache``: bfloat16 features (stored as uint16 bits), a 2x grid
    from which training draws one frame per segment; evaluation reads the uniform frames."""
    from ivcr_jax.data.samples import VideoRequest
    from ivcr_jax.train.vit_cache import main

    exp, _, fp32 = setup
    corpus, out = fp32.parents[3] / "ivcr.json", fp32.parents[3] / "cli"
    assert main(["--config", TINY, "--corpus", str(corpus), "--out", str(out), "--split", "test", "--grid", "2",
                 "--batch", "32", f"--config.data.video_root={exp.data.video_root}"]) == 0
    printed = capsys.readouterr().out
    assert "bfloat16, training grid 2x" in printed and "use it with --config.data.vit_features=" in printed
    v, ref = F.VitFeatures(out), F.VitFeatures(fp32)
    assert v.grid == 2 and v.dtype == "bfloat16" and ref.grid == 1
    assert {k for k in v.index if "#" not in k} == set(ref.index)
    # a candidate (12 frames of a longer video: the grid's segments nest in the T's)
    k = next(k for k in ref.index if k.endswith(f"@{exp.data.retrieval_frames}"))
    vid, T = k.rsplit("@", 1)
    req = VideoRequest(vid, "ignored", int(T), f"f{T}", 1, "retrieval", 0)
    uni, uni_ref = v.load(req, "uniform"), ref.load(req, "uniform")
    assert uni.pixels.dtype.name == "bfloat16" and uni.pixels.shape == uni_ref.pixels.shape
    np.testing.assert_array_equal(uni.timestamps, uni_ref.timestamps)
    a = v.load(req, "random", np.random.default_rng(0))
    b = v.load(req, "random", np.random.default_rng(1))
    assert a.pixels.shape == uni.pixels.shape and not np.array_equal(a.indices, b.indices)
    # each draw lies in its segment of the T (the grid's frames 2t, 2t+1)
    seg = np.floor(np.arange(int(T) + 1) * (uni.duration * uni.fps) / int(T) + 1e-6).astype(np.int64)
    assert uni.duration * uni.fps >= 2 * int(T)
    assert np.all((a.indices >= seg[:-1]) & (a.indices < seg[1:]))


def test_the_config_key_names_a_missing_cache_in_one_line(tmp_path):
    with pytest.raises(cli.UsageError, match=r"config.data.vit_features='/nonexistent/cache': no such directory"):
        Experiment.resolve(cli.resolve(TINY, ("data.vit_features=/nonexistent/cache",)))
    exp = Experiment.resolve(cli.resolve(TINY, (f"data.vit_features={tmp_path}",)))
    assert exp.pipeline(2).vit_features == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="expected one prepared dataset"):   # one line (cli.run)
        F.VitFeatures(tmp_path)


def test_training_batches_read_the_grid(setup):
    """A training pipeline over a bf16 grid cache: the pool holds bfloat16 features, and the loss is finite."""
    import dataclasses

    exp, model, fp32 = setup
    out = fp32.parents[3] / "cli"   # written by the command-line test above
    if not out.exists():
        pytest.skip("needs the command-line test's cache")
    dialogues, _ = exp.dialogues("test")
    pc = dataclasses.replace(exp.pipeline(2, video_root=exp.video_root(dialogues)), vit_features=str(out))
    refs = enumerate_samples(dialogues, pc.sample)
    batch = next(iter(make_pipeline(pc, refs, train=True, seed=0, tokenizer=exp.tokenizer, process_index=0,
                                    process_count=1)))
    assert batch["pool"]["vit_features"].dtype.name == "bfloat16" and "frames" not in batch["pool"]
    assert np.isfinite(_loss(model, batch))


def test_generation_from_the_cache_gives_the_online_answers(setup, tmp_path, capsys):
    """The evaluation's prompts (data/prompts.py) read the cache too: the same greedy answers."""
    from ivcr_jax.eval.__main__ import main as eval_main

    exp, model, path = setup
    ann, root = exp.data.annotations, exp.data.video_root
    answers = {}
    (tmp_path / "no_videos").mkdir()
    for name, extra, videos in (("online", [], root),   # the cached run cannot see a single video file
                                ("cached", [f"--config.data.vit_features={path}"], tmp_path / "no_videos")):
        out = tmp_path / name
        rc = eval_main(["--config", TINY, f"--config.data.annotations={ann}", f"--config.data.video_root={videos}",
                        "--config.eval.max_new_tokens=6", "--test-filter", "none", "--out", str(out), "--no-charts",
                        *extra], model=model, tokenizer=exp.tokenizer)
        assert rc == 0
        printed = capsys.readouterr().out
        assert ("vision: cached ViT features from" in printed) == (name == "cached")
        answers[name] = [json.loads(line)["answer"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert answers["cached"] == answers["online"] and answers["online"]
