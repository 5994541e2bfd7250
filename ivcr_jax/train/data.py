"""Glue between the config and the input pipeline for training and evaluation.

``train_data(config, tokenizer)`` reads the IVCR JSON named by ``config.data.annotations``
(relative video paths under ``config.data.video_root``), builds the sample list and the Grain
pipeline of this process's shard, and ``to_device`` turns a host batch into global arrays
sharded over the mesh's (data, fsdp) axes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from ivcr_jax.tokenizer import bundled_test_tokenizer, load_tokenizer


def tokenizer(config):
    return load_tokenizer(config.data.tokenizer or bundled_test_tokenizer())


def digit_ids(tok) -> tuple[int, ...]:
    """Token ids of the ten digits as they appear inside numbers (LLaMA splits digits)."""
    ids = []
    for d in "0123456789":
        pieces = tok.convert_tokens_to_ids([d])
        ids.append(int(pieces[0]))
    return tuple(ids)


@dataclasses.dataclass
class Data:
    iterator: Any
    pipeline: Any
    num_samples: int
    load_report: str

    def report(self) -> str:
        return f"{self.load_report}\n{self.pipeline.summary()}"


def pipeline_config(config, per_process_batch: int):
    from ivcr_jax.data.pipeline import PipelineConfig

    d = config.data
    overrides = dict(batch_size=per_process_batch)
    root = d.get("video_root") or None
    if not root and d.annotations:
        # The corpus layout (demo corpus, prepared corpora): <dir>/ivcr.json + <dir>/videos/.
        parent = Path(d.annotations).parent
        root = str(parent / "videos") if (parent / "videos").is_dir() else str(parent)
    pc = PipelineConfig.from_config(d, **overrides)
    # Token counts per video follow the model: window size and video queries per window.
    vq = config.model.video_qformer
    pc = dataclasses.replace(pc, sample=dataclasses.replace(
        pc.sample, window=int(vq.window), tokens_per_window=int(vq.num_query_tokens)))
    if root and not pc.sample.video_root:
        pc = dataclasses.replace(pc, sample=dataclasses.replace(pc.sample, video_root=root))
    return pc


def load_split(config, split: str, *, strict: bool = False):
    from ivcr_jax.data.schema import load_dialogues

    d = config.data
    if not d.annotations:
        raise ValueError("config.data.annotations is empty: give the IVCR-200K JSON path")
    exclude = tuple(tuple(t) for t in d.get("exclude_types", ((0,),)))
    return load_dialogues(d.annotations, split=split, lang=d.get("lang", "en"),
                          exclude_types=exclude, strict=strict)


def train_data(config, tok, *, split: str = "train") -> Data:
    from ivcr_jax.data.pipeline import make_pipeline
    from ivcr_jax.data.samples import enumerate_samples

    pcount = jax.process_count()
    global_batch = int(config.train.batch_size)
    if global_batch % pcount:
        raise ValueError(f"train.batch_size {global_batch} is not divisible by {pcount} processes")
    pc = pipeline_config(config, global_batch // pcount)
    dialogues, report = load_split(config, split)
    refs = enumerate_samples(dialogues, pc.sample)
    pipe = make_pipeline(pc, refs, train=True, seed=int(config.seed), tokenizer=tok)
    return Data(iter(pipe), pipe, len(refs), report.summary())


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    first = axes[0] if len(axes) == 1 else (axes or None)
    return NamedSharding(mesh, jax.sharding.PartitionSpec(first))


def agree_text_length(batch: dict) -> dict:
    """Pad this process's text to the longest bucket any process chose for this step.

    Each process pads its local batch to its own bucket; a global array needs one shape, so with
    several processes the text length is agreed (one small all-gather per step) before the put.
    """
    if jax.process_count() == 1:
        return batch
    from jax.experimental import multihost_utils

    from ivcr_jax.data.pipeline import pad_text

    S = int(batch["input_ids"].shape[1])
    longest = int(np.max(multihost_utils.process_allgather(np.int32(S))))
    return pad_text(batch, longest)


def to_device(batch: dict, mesh) -> dict:
    """Host-local numpy batch → global jax arrays, batch axis over (data, fsdp)."""
    batch = agree_text_length(batch)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    return jax.tree.map(put, {k: v for k, v in batch.items() if not isinstance(v, (str, bytes))})


def to_host_local(x, mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array (all rows on one process)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, batch_sharding(mesh, x.ndim).spec))
