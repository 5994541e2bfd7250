"""The tiny InterLLaVA trained on the embedded demo corpus (``python -m ivcr_jax.data.demo``).

    python -m ivcr_jax --workdir runs/demo        # builds the corpus, trains, evaluates
    python -m ivcr_jax.data.demo --out runs/demo_corpus
    python -m ivcr_jax.train --config configs/demo.py --workdir runs/demo/train \
        --config.data.annotations=runs/demo_corpus/ivcr.json

Same shapes as ``configs/paper.py:tiny`` with few frames, so a 2-core CPU trains it in minutes.
"""
import importlib.util
from pathlib import Path


def _paper():
    spec = importlib.util.spec_from_file_location("ivcr_paper_config", Path(__file__).with_name("paper.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg: str = ""):
    c = _paper().get_config("tiny")
    c.data.annotations = "runs/demo_corpus/ivcr.json"
    c.data.retrieval_frames = 4
    c.data.moment_frames = 8
    c.data.max_retrieval_videos = 10
    c.data.max_moment_videos = 1
    c.data.max_turns = 3
    c.data.max_len = 1024
    c.data.text_buckets = (512, 1024)   # every demo sample fits 512: one compiled shape
    c.data.timestamp_len = 12
    c.train.update(batch_size=2, steps=60, warmup_steps=5, lr=2e-3, min_lr=2e-4, warmup_init_lr=1e-5,
                   ckpt_every=20, keep_checkpoints=2)
    if arg:
        raise ValueError(f"configs/demo.py takes no variant (got {arg!r}); override keys with --config.KEY=VALUE")
    return c
