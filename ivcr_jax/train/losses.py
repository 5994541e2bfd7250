"""Named losses of the multi-loss step (paper §4: L = L_LM + α·L_V + β·L_C).

* ``lm``: token cross-entropy of the supervised answer (labels −100 elsewhere), next-token
  shifted, averaged over supervised tokens of the (global) batch.
* ``video`` (L_V) and ``moment`` (L_C) in two modes (config ``train.aux_loss_mode``):
  - ``faithful``: as the reference computes them (reference-architecture §8.6): from the argmax of
    the teacher-forced logits, decoded to text and parsed; L_V = CE of a *constant* logit vector
    (0.01 everywhere, 10 at the parsed index) against the GT index, L_C = 1 − IoU of the parsed
    span, with the reference's parse-failure value (IoU := 1, i.e. no penalty) reproduced. They
    are constants with respect to the parameters: they are logged, and add nothing to gradients.
    They are computed on the host after the step (see :func:`faithful_aux`).
  - ``differentiable``: see ``ivcr_jax/train/aux_losses.py``.

``train/aux.py`` turns the mode into one object that the step and the loop call.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ivcr_jax.data.answers import iou, parse_moment, parse_video_index


def lm_loss(logits: jax.Array, labels: jax.Array, weight: jax.Array | None = None,
            index: jax.Array | None = None):
    """Mean next-token CE over supervised positions → ``(loss, n_tokens)``.

    ``logits [B, S, V]`` fp32 predict token ``t+1`` at position ``t``; ``labels [B, S]`` hold
    the target id at each position or −100. With ``index [B, K]`` (``loss_index``: positions,
    −1 = none) the logits are ``[B, K, V]`` at those positions only.
    """
    if index is None:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        nxt = jnp.clip(index + 1, 0, labels.shape[1] - 1)
        targets = jnp.where(index >= 0, jnp.take_along_axis(labels, nxt, axis=1), -100)
    mask = targets != -100
    if weight is not None:
        mask = mask & (weight[:, None] > 0)
    logz = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    tgt = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, logz - tgt.astype(jnp.float32), 0.0)
    n = mask.sum()
    return nll.sum() / jnp.maximum(n, 1), n


def loss_index(labels: np.ndarray, weight: np.ndarray | None = None, multiple: int = 64, at_least: int = 0) -> np.ndarray:
    """``[B, K]`` positions whose next token is supervised (−1 padding); ``K`` is the longest row's
    count rounded up to ``multiple`` (a few compiled shapes) and at least ``at_least``."""
    labels = np.asarray(labels)
    sup = labels[:, 1:] != -100
    if weight is not None:
        sup &= np.asarray(weight)[:, None] > 0
    need = max(int(sup.sum(axis=1).max(initial=0)), int(at_least), 1)
    K = min(-(-need // multiple) * multiple, labels.shape[1])
    out = np.full((labels.shape[0], K), -1, np.int32)
    for b, row in enumerate(sup):
        pos = np.nonzero(row)[0]
        out[b, :len(pos)] = pos
    return out


def predicted_answer_ids(pred: np.ndarray, labels: np.ndarray, index: np.ndarray | None = None) -> list[list[int]]:
    """Argmax ids that predict each sample's supervised tokens (teacher forcing). ``pred`` is
    ``[B, S]``, or ``[B, K]`` at the ``index`` (``loss_index``) positions."""
    if index is not None:
        return [[int(x) for x in p[i >= 0]] for p, i in zip(np.asarray(pred), np.asarray(index))]
    out = []
    for p, lab in zip(pred, labels):
        pos = np.nonzero(lab[1:] != -100)[0]   # target index t+1 is predicted at t
        out.append([int(x) for x in p[pos]])
    return out


_CONST_RIGHT = -math.log(math.exp(10.0) / (math.exp(10.0) + 9 * math.exp(0.01)))
_CONST_WRONG = -math.log(math.exp(0.01) / (math.exp(10.0) + 9 * math.exp(0.01)))
_CONST_NONE = math.log(10.0)


def faithful_aux(pred_ids: np.ndarray, batch: Mapping[str, Any], tokenizer) -> dict[str, float]:
    """The reference's L_V and L_C for one batch, from argmax ids (host side, no gradient)."""
    kinds = np.asarray(batch["kind"])
    weight = np.asarray(batch.get("weight", np.ones(len(kinds))))
    answers = predicted_answer_ids(np.asarray(pred_ids), np.asarray(batch["labels"]), batch.get("loss_index"))
    video, moment = [], []
    for i, ids in enumerate(answers):
        if weight[i] <= 0:
            continue
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if kinds[i] == 1:
            n = parse_video_index(text)
            gt = int(batch["target_index"][i]) + 1
            video.append(_CONST_NONE if n is None else (_CONST_RIGHT if n == gt else _CONST_WRONG))
        elif kinds[i] == 2:
            span = parse_moment(text)
            # Reproduced reference bug: a parse failure sets IoU to 1.0, i.e. no penalty.
            v = 1.0 if span is None else iou(span, tuple(np.asarray(batch["gt_span"][i]).tolist()))
            moment.append(1.0 - v)
    return {"video": float(np.mean(video)) if video else 0.0,
            "moment": float(np.mean(moment)) if moment else 0.0,
            "video_sum": float(np.sum(video)), "video_n": len(video),
            "moment_sum": float(np.sum(moment)), "moment_n": len(moment)}


def combine_across_processes(aux: dict[str, float]) -> dict[str, float]:
    """Global means of the per-process faithful losses (every process gets the same numbers)."""
    if jax.process_count() == 1:
        return aux
    v = np.array([aux["video_sum"], aux["video_n"], aux["moment_sum"], aux["moment_n"]], np.float64)
    # Sent as raw 32-bit words: JAX (x64 off) would round float64 to float32 on the way.
    words = np.asarray(multihost_utils.process_allgather(v.view(np.uint32)))
    t = np.ascontiguousarray(words.reshape(-1, 8)).view(np.float64).sum(0)
    return {"video": t[0] / t[1] if t[1] else 0.0, "moment": t[2] / t[3] if t[3] else 0.0}
