"""Write the ViT feature cache (``ivcr_jax.data.features``): the frozen ViT once, not every epoch.

    python -m ivcr_jax.train.vit_cache --config configs/paper.py[:ARG] --corpus DIR --out DIR
        [--split train|test|all] [--checkpoint CONVERTED_OR_WORKDIR] [--batch 64] [--dtype bfloat16] [--grid 1]

The ViT's weights are the experiment's (``config.init.converted``, then ``--checkpoint`` as
``Experiment.load_model`` reads it); frame counts, size, language and video root are
``config.data``'s. Every distinct (video, frame count) of the split (``data/prepare.py``'s
enumeration) goes through ``InterLLaVA.image_features`` (ViT + ln_vision) in batches of ``--batch``
frames, one jitted function (the last batch padded). Frames are uniform (evaluation) frames, and with
``--grid G`` also G x T uniform frames per video, from which training draws one per segment at random
(``--grid 1``: training sees the evaluation frames every epoch). Use the result with
``--config.data.vit_features=PATH``.

This is a program module (it builds the model), beside the training program; the cache's format and
reader live in the data layer (``ivcr_jax/data/features.py``).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax import cli
from ivcr_jax.data import features as features_lib
from ivcr_jax.data.frames import VideoError
from ivcr_jax.experiment import USER_ERRORS, Experiment


def feature_encoder(model, batch: int):
    """``(encode, (1 + N, D))``: ``encode(uint8 [T, H, W, 3]) -> float32 numpy [T, 1 + N, D]``, the
    model's ``image_features`` run ``batch`` frames at a time by one jitted function."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, frames):
        return nnx.merge(graphdef, state).image_features(frames).astype(jnp.float32)

    def encode(frames: np.ndarray) -> np.ndarray:
        T = len(frames)
        out = []
        for i in range(0, T, batch):
            chunk = frames[i:i + batch]
            n = len(chunk)
            if n < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
            out.append(np.asarray(jax.device_get(run(state, jnp.asarray(chunk))))[:n])
        return np.concatenate(out)

    def shape(frame_size: int) -> tuple[int, int]:
        s = jax.eval_shape(run, state, jax.ShapeDtypeStruct((batch, frame_size, frame_size, 3), jnp.uint8))
        return int(s.shape[1]), int(s.shape[2])

    return encode, shape


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ivcr_jax.train.vit_cache",
                                description="Run the frozen ViT (+ ln_vision) once over a corpus split and store "
                                            "its features (TFDS array_record) for data.vit_features.")
    p.add_argument("--corpus", required=True, help="corpus root (ivcr.json + videos/) or the JSON file")
    p.add_argument("--out", required=True, help="output directory (TFDS data_dir)")
    p.add_argument("--split", default="train", help="train | test | all (default: train)")
    p.add_argument("--checkpoint", default=None, help="converted weights dir or training workdir (default: "
                                                      "config.init)")
    p.add_argument("--batch", type=int, default=64, help="frames per ViT call (default 64)")
    p.add_argument("--dtype", default="bfloat16", choices=features_lib.DTYPES, help="stored dtype")
    p.add_argument("--grid", type=int, default=1, help="also store G x the frame count uniform frames per video "
                                                       "for training's random per-segment draw (default 1: none)")

    def body() -> int:
        config, args = cli.parse(argv, p, default_config="configs/paper.py")
        if args.batch <= 0:
            raise cli.UsageError(f"--batch must be positive, got {args.batch}")
        exp = Experiment.resolve(config)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        d = exp.data
        model, what = exp.load_model(args.checkpoint)
        print(f"ViT weights: {what}", flush=True)
        encode, shape = feature_encoder(model, int(args.batch))
        tokens, width = shape(int(d.frame_size))
        path = features_lib.write_features(
            args.corpus, args.out, encode=encode, signature=features_lib.vit_signature(model), tokens=tokens,
            width=width, split=None if args.split == "all" else args.split, retrieval_frames=int(d.retrieval_frames),
            moment_frames=int(d.moment_frames), size=int(d.frame_size), dtype=args.dtype, grid=args.grid,
            videos=d.video_root or None, lang=d.lang)
        v = features_lib.VitFeatures(path)
        n = sum("#" not in k for k in v.index)
        print(f"ViT features of {n} videos ({len(v.failed)} failed), [T, {tokens}, {width}] {args.dtype}"
              f"{f', training grid {args.grid}x' if args.grid > 1 else ''}, in {path}")
        for k, e in list(v.failed.items())[:10]:
            print(f"  failed {k}: {e}")
        print(f"use it with --config.data.vit_features={path}")
        return 0
    return cli.run(body, known=(*USER_ERRORS, VideoError))


if __name__ == "__main__":
    sys.exit(main())
