"""The held-out monitor: every ``train.eval_every`` steps the model answers a fixed slice of
held-out samples by generation (``config.eval``: greedy by default) and the answers are scored
with the project's parsers (``rollout.monitor_scores``: retrieval R@1, moment R@1 IoU≥0.5,
parse rates). It shows whether training is going somewhere; the paper's metrics come from
``python -m ivcr_jax.eval`` on the whole split.

The slice is the first ``train.eval_samples`` retrieval and moment samples of
``train.eval_split`` in file order (the same every time and in every run).
"""
from __future__ import annotations

import time

import jax
from flax import nnx

from ivcr_jax.data.prompts import PromptLoader
from ivcr_jax.data.samples import enumerate_samples
from ivcr_jax.experiment import Experiment
from ivcr_jax.models.generate import Generator
from ivcr_jax.rollout import answer_samples, monitor_scores


class HeldOut:
    def __init__(self, exp: Experiment, graphdef, frozen, mesh):
        tc, ec = exp.train, exp.eval
        dialogues, _ = exp.dialogues(tc.eval_split)
        if not dialogues:
            raise ValueError(f"config.train.eval_every={tc.eval_every} but split {tc.eval_split!r} of "
                             f"{exp.data.annotations} has no dialogues (config.train.eval_split)")
        pcfg = exp.pipeline(int(ec.batch_size), video_root=exp.video_root(dialogues))
        refs = [r for r in enumerate_samples(dialogues, pcfg.sample)
                if r.dialogue.turns[r.turn_idx].kind in ("retrieval", "moment")]
        self.refs = refs[: int(tc.eval_samples)]
        self.loader = PromptLoader(pcfg, exp.tokenizer, video_slots=ec.video_slots)
        self.exp, self.pcfg, self.graphdef, self.frozen, self.mesh = exp, pcfg, graphdef, frozen, mesh

    def __call__(self, params) -> dict[str, float]:
        """Scores of the model with trainable ``params``: ``{"heldout/retrieval/R@1": ..., ...}``."""
        t0 = time.perf_counter()
        ec = self.exp.eval
        model = nnx.merge(self.graphdef, params, self.frozen)
        gen = Generator(model, max_new_tokens=int(ec.max_new_tokens), buckets=self.pcfg.buckets, mesh=self.mesh)
        items = list(answer_samples(self.refs, self.loader, gen, self.exp.tokenizer, batch_size=int(ec.batch_size),
                                    temperature=float(ec.temperature), top_p=float(ec.top_p),
                                    key=jax.random.key(self.exp.seed)))
        out = {f"heldout/{k}": v for k, v in monitor_scores(items).items()}
        out["heldout/seconds"] = time.perf_counter() - t0
        return out
