"""The benchmarks' PyTorch reference (benchmarks/torch_interllava.py: HF Blip2VisionModel +
InstructBlipQFormerModel ×2 + LlamaForCausalLM + peft LoRA) computes our InterLLaVA's logits."""
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import torch_interllava as ti  # noqa: E402
from ivcr_jax.models import build  # noqa: E402
from ivcr_jax.models.interllava import InterLLaVAConfig  # noqa: E402
from ivcr_jax.models.params import count, trainable_filter  # noqa: E402
from reference import rel_err  # noqa: E402

# one retrieval group (10 candidates x 12 frames: one window each) and one moment group (40 frames:
# a full 32-frame window and TimeChat's shorter last one); ragged text rows and timestamp sentences
GROUPS = {"f12": (10, 12), "f40": (1, 40)}


def _pair(keep_timestamp_text: bool, seed: int):
    m = ti.without_dropout(ti.model_dict("tiny"))
    m["keep_timestamp_text"] = keep_timestamp_text
    torch.manual_seed(seed)
    ref = ti.noisy_(ti.TorchInterLLaVA(m), seed).eval()
    ours = build.build_model(InterLLaVAConfig.from_dict(m), seed=seed + 1)   # other weights ...
    ti.copy_into_ours(ref, ours)                                             # ... replaced by the reference's
    return m, ref, ours


def _logits(m, ref, ours, batch):
    with torch.no_grad():
        theirs = ref(ti.to_torch(batch, "cpu")).logits.numpy()
    mine = np.asarray(jax.jit(lambda model, b: model(b).logits)(ours, ti.for_ours(batch)))
    real = batch["attention_mask"].astype(bool)          # padded positions are garbage in both
    return mine[real], theirs[real]


@pytest.fixture(scope="module")
def pair():
    return _pair(True, 0)


def test_teacher_forced_logits_equal_the_torch_reference(pair):
    m, ref, ours = pair
    batch = ti.synthetic_batch(m, batch=2, groups=GROUPS, text_len=40, answer_len=6, ragged=True, seed=3)
    # the timestamp quirk is exercised: sentences of a video differ in length
    lens = batch["videos"]["f12"]["timestamp_mask"].sum(-1)
    assert lens.min() < lens.max()
    mine, theirs = _logits(m, ref, ours, batch)
    assert mine.shape == theirs.shape == (2 * 136 - 3, 32005)
    assert rel_err(mine, theirs) < 1e-4


def test_reference_trains_the_same_parameters(pair):
    m, ref, ours = pair
    _, trainable, frozen = nnx.split(ours, trainable_filter(ti.TRAINABLE), ...)
    n_ref = sum(p.numel() for _, p in ref.trainable_parameters())
    assert n_ref == count(trainable) > 0
    # frozen: the same towers, plus HF's key segment of the fused ViT qkv bias (kept at zero)
    n_frozen_ref = sum(p.numel() for p in ref.parameters() if not p.requires_grad)
    assert n_frozen_ref - count(frozen) == m["vit"]["depth"] * m["vit"]["width"]


def test_without_timestamp_text_the_logits_still_agree():
    m, ref, ours = _pair(False, 5)
    batch = ti.synthetic_batch(m, batch=1, groups={"f12": (2, 12), "f40": (1, 40)}, text_len=24,
                               answer_len=4, ragged=True, seed=4)
    mine, theirs = _logits(m, ref, ours, batch)
    assert rel_err(mine, theirs) < 1e-4


def test_benchmark_sizes_are_the_paper_configs():
    """benchmarks/ keep a copy of configs/paper.py's model section (the GPU machine has no
    ml_collections): it must not drift."""
    pytest.importorskip("ml_collections")
    from ivcr_jax.cli import load_config
    for arg, size in (("configs/paper.py:tiny", "tiny"), ("configs/paper.py", "paper")):
        cfg = load_config(arg)
        assert InterLLaVAConfig.from_dict(cfg.model.to_dict()) == InterLLaVAConfig.from_dict(ti.model_dict(size))
        assert tuple(cfg.trainable) == ti.TRAINABLE
    train = load_config("configs/paper.py").train
    assert {k: train[k] for k in ti.TRAIN if k != "lr_mults"} == {k: v for k, v in ti.TRAIN.items() if k != "lr_mults"}
