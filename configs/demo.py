"""The tiny InterLLaVA trained on the embedded demo corpus (``python -m ivcr_jax.data.demo``).

    python -m ivcr_jax --workdir runs/demo        # builds the corpus, trains, evaluates
    python -m ivcr_jax.data.demo --out runs/demo_corpus
    python -m ivcr_jax.train --config configs/demo.py --workdir runs/demo/train \
        --config.data.annotations=runs/demo_corpus/ivcr.json

The shapes of ``configs/paper.py:tiny`` (2-layer, 64-wide towers and LLM) with what a 2-core CPU
needs to learn the task in minutes:

* **The LLM is trained too.** The real system starts from a pretrained LLaMA-2 and trains only
  LoRA; a random tiny LLM cannot emit the answer templates through LoRA alone (its frozen random
  ``lm_head`` behind a frozen RMSNorm bounds the logits: the LM loss stalls near ln |vocab|). The
  demo's stand-in for pretraining is to train the tiny LLM's own weights along with the LoRA,
  Q-Formers and projection. ``configs/paper.py`` keeps the base frozen.
* Random weights drawn with unit gain (``init.random_init="fan_in"``): at width 64 HF's N(0, 0.02²)
  leaves the video tokens almost independent of the frames, and the text embeddings 50x smaller
  than the projected video tokens.
* 56-px frames (4x4 ViT patches), 4 frames per retrieval candidate, 16 for a moment video.
* The video Q-Former's window (and stride) is 4 frames, so a moment video is 4 windows of 8 tokens
  in time order: the paper's 96 frames are 3 windows of 32.
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
    c.data.frame_size = 56
    c.model.vit.image_size = 56
    c.data.retrieval_frames = 4
    c.data.moment_frames = 16
    c.model.video_qformer.update(window=4, stride=4)
    c.data.max_retrieval_videos = 10
    c.data.max_moment_videos = 1
    c.data.frame_pool = (16, 28, 40, 56)   # frames per row: a moment video 16, a candidate list 40, both 56
    c.data.max_turns = 3
    c.data.max_len = 1024
    c.data.text_buckets = (512, 1024)   # every demo sample fits 512: one compiled shape
    c.data.timestamp_len = 12
    c.model.llm.update(hidden=128, intermediate=256, layers=4, heads=4, kv_heads=4)
    c.init.random_init = "fan_in"      # unit-gain random layers at width 64 (see models/build.py)
    c.data.cache_videos = 256           # the whole corpus stays decoded in memory (~120 MB)
    c.data.vit_features = ""            # a ViT feature cache (python -m ivcr_jax.train.vit_cache); "" = online ViT
    c.trainable = tuple(c.trainable) + (r"llama/.*",)
    c.train.update(batch_size=2, steps=800, warmup_steps=10, lr=3e-3, min_lr=3e-4, warmup_init_lr=1e-5,
                   ckpt_every=200, keep_checkpoints=2, log_every=10,
                   eval_every=200, eval_samples=24, eval_split="test")
    if arg:
        raise ValueError(f"configs/demo.py takes no variant (got {arg!r}); override keys with --config.KEY=VALUE")
    return c
