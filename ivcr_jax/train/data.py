"""The training input: this process's Grain pipeline over a split, and the per-step text length.

``train_data(exp)`` reads the split's dialogues (``data/schema.py``), enumerates the samples and
builds the pipeline of this process's block of every global batch (``data/pipeline.py``). Malformed
records are skipped and counted at load time (the report is logged then, and again at the end
with the pipeline's skips); a split that leaves no sample is a one-line error naming the file.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ivcr_jax.cli import UsageError
from ivcr_jax.data.pipeline import make_pipeline, pad_text
from ivcr_jax.data.samples import enumerate_samples
from ivcr_jax.experiment import Experiment
from ivcr_jax.train.losses import loss_index

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Data:
    iterator: Any
    pipeline: Any
    num_samples: int
    load_report: str

    def report(self) -> str:
        return f"{self.load_report}\n{self.pipeline.summary()}"


def train_data(exp: Experiment, *, split: str = "train") -> Data:
    pcount = jax.process_count()
    global_batch = int(exp.train.batch_size)
    if global_batch % pcount:
        raise ValueError(f"train.batch_size {global_batch} is not divisible by {pcount} processes")
    dialogues, report = exp.dialogues(split)
    if report.num_skipped and jax.process_index() == 0:
        log.warning(report.summary())
    pc = exp.pipeline(global_batch // pcount, video_root=exp.video_root(dialogues))
    refs = enumerate_samples(dialogues, pc.sample)
    if not refs:
        hint = "".join(f"; {n} records have split {v!r}" for v, (n, _, _) in report.unknown_splits.items())
        raise UsageError(f"{report.path}: no sample of split {split!r} to train on ({report.loaded} records "
                         f"loaded, {report.num_skipped} skipped as malformed, {report.excluded_type} excluded "
                         f"by type, {report.other_split} in other splits{hint})")
    pipe = make_pipeline(pc, refs, train=True, seed=exp.seed, tokenizer=exp.tokenizer)
    return Data(iter(pipe), pipe, len(refs), report.summary())


def with_loss_index(batch: dict) -> dict:
    """Add ``loss_index`` (the positions whose next token is supervised, ``train.lm_head =
    "supervised"``); with several processes its width is agreed like the text length."""
    idx = loss_index(batch["labels"], batch.get("weight"))
    if jax.process_count() > 1:
        widest = int(np.max(multihost_utils.process_allgather(np.int32(idx.shape[1]))))
        idx = loss_index(batch["labels"], batch.get("weight"), at_least=widest)
    return {**batch, "loss_index": idx}


def agree_text_length(batch: dict) -> dict:
    """Pad this process's text to the longest bucket any process chose for this step.

    Each process pads its local batch to its own bucket; a global array needs one shape, so with
    several processes the text length is agreed (one small all-gather per step) before the put.
    """
    if jax.process_count() == 1:
        return batch
    S = int(batch["input_ids"].shape[1])
    longest = int(np.max(multihost_utils.process_allgather(np.int32(S))))
    return pad_text(batch, longest)
