"""Named losses of the multi-loss step (paper §4: L = L_LM + α·L_V + β·L_C).

* ``lm``: token cross-entropy of the supervised answer (labels −100 elsewhere), next-token
  shifted, reduced over the (global) batch by ``train.lm_loss_reduction``:
  - ``token_mean`` (default): the mean over every supervised token of the batch;
  - ``sample_mean`` (the reference): each sample's mean over its own supervised tokens, then the
    mean over the batch's real samples (weight > 0 and at least one supervised token). The
    reference trains with batch 1 × gradient accumulation 4 (``train_configs/
    stage2_finetune_IVCR.yaml``: ``batch_size_train: 1``, ``accum_grad_iters: 4``) and takes HF's
    causal-LM loss (``ivcr/models/modeling_llama.py : LlamaForCausalLM.forward``: shifted
    ``CrossEntropyLoss()``, a mean over the sample's non −100 labels), so each sample weighs the
    same whatever its answer length.
  With ``train.lm_loss_chunk > 0`` the same loss comes from the final hidden states and the
  ``lm_head`` kernel over vocabulary blocks (:func:`chunked_lm_loss`): no ``[B, K, V]`` fp32 logits
  in the forward or the backward pass.
* ``video`` (L_V) and ``moment`` (L_C) in two modes (config ``train.aux_loss_mode``):
  - ``faithful``: as the reference computes them (``ivcr/models/ivcr.py : IVCR.forward``, the
    ``flag == 1`` block; reference-architecture §8.6): from the argmax of the teacher-forced
    logits, decoded to text and parsed. They are constants with respect to the parameters: they
    are logged, and add nothing to gradients. They are computed on the host after the step (see
    :func:`faithful_aux`, which says how a sample's term is chosen and scored).
  - ``differentiable``: see ``ivcr_jax/train/aux_losses.py``.

``train/aux.py`` turns the mode into one object that the step and the loop call.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.experimental import multihost_utils

from ivcr_jax.data.answers import iou, parse_moment, parse_video_index


LM_REDUCTIONS = ("token_mean", "sample_mean")


def lm_loss(logits: jax.Array, labels: jax.Array, weight: jax.Array | None = None,
            index: jax.Array | None = None, reduction: str = "token_mean"):
    """Next-token CE over supervised positions → ``(loss, n_tokens)``.

    ``logits [B, S, V]`` fp32 predict token ``t+1`` at position ``t``; ``labels [B, S]`` hold
    the target id at each position or −100. With ``index [B, K]`` (``loss_index``: positions,
    −1 = none) the logits are ``[B, K, V]`` at those positions only. Rows of weight 0 (padding,
    skipped samples) count nowhere. ``reduction``: ``"token_mean"``, the mean over all supervised
    tokens of the batch; ``"sample_mean"``, the mean over the rows that have supervised tokens of
    each row's own token mean (the reference's batch-1 loss, averaged over samples). Both are sums
    over the batch axis inside the jitted step, so a data-sharded global batch (one or several
    processes) gives the global value. :func:`chunked_lm_loss` is the same loss from the hidden
    states, without these logits.
    """
    _check_reduction(reduction)
    # Without an index, position t predicts labels[:, t+1]: the targets are shifted and padded
    # with one masked column, rather than the logits sliced to S - 1 positions (a [B, S - 1, V]
    # copy forward and a pad of its gradient backward).
    targets, mask = _targets(labels, weight, index, shifted_len=logits.shape[1] if index is None else None)
    logz = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    tgt = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, logz - tgt.astype(jnp.float32), 0.0)
    return _reduce(nll, mask, reduction)


def _check_reduction(reduction: str) -> None:
    if reduction not in LM_REDUCTIONS:
        raise ValueError(f"lm_loss reduction must be one of {LM_REDUCTIONS}, got {reduction!r}")


def _targets(labels, weight, index, shifted_len):
    """``(targets, mask)``: the id each row of the logits predicts (−100 none) and whether it
    counts. ``index is None``: position t predicts ``labels[:, t+1]``, over ``S - 1`` positions,
    or over ``shifted_len = S`` positions with the last one masked (no next token)."""
    if index is None:
        targets = labels[:, 1:]
        if shifted_len is not None:
            targets = jnp.pad(targets, ((0, 0), (0, shifted_len - targets.shape[1])), constant_values=-100)
    else:
        nxt = jnp.clip(index + 1, 0, labels.shape[1] - 1)
        targets = jnp.where(index >= 0, jnp.take_along_axis(labels, nxt, axis=1), -100)
    mask = targets != -100
    if weight is not None:
        mask = mask & (weight[:, None] > 0)
    return targets, mask


def _reduce(nll, mask, reduction):
    n = mask.sum()
    if reduction == "sample_mean":
        n_row = mask.sum(axis=1)
        real = n_row > 0
        per_row = nll.sum(axis=1) / jnp.maximum(n_row, 1).astype(jnp.float32)
        return jnp.where(real, per_row, 0.0).sum() / jnp.maximum(real.sum(), 1).astype(jnp.float32), n
    return nll.sum() / jnp.maximum(n, 1), n


# ------------------------------------------------------------------ the blockwise LM head
# ``train.lm_loss_chunk > 0``: the same losses from the final hidden states and the lm_head kernel,
# one vocabulary block at a time (an online logsumexp, the argmax tracked across blocks), the
# backward recomputing each block's logits: no ``[B, K, V]`` array in the forward or the backward.


@dataclasses.dataclass(frozen=True)
class HiddenHead:
    """What the forward hands to the losses instead of logits (``train.lm_loss_chunk > 0``).

    ``hidden [B, K, D]`` the final-norm states at the ``loss_index`` positions (or ``[B, S, D]``,
    all positions); ``kernel [D, V]`` the ``lm_head`` kernel in the compute dtype
    (``Llama.lm_head_weight``, the embedding's transpose when tied); ``chunk`` the vocabulary block.
    """

    hidden: jax.Array
    kernel: jax.Array
    chunk: int


def lm_head_loss(out, labels: jax.Array, weight: jax.Array | None = None, index: jax.Array | None = None,
                 reduction: str = "token_mean", *, argmax: bool = False):
    """The step's LM loss of either forward output → ``(loss, n_tokens, argmax ids or None)``.

    ``out`` is the logits (:func:`lm_loss`; the argmax over them) or a :class:`HiddenHead`
    (:func:`chunked_lm_loss`). The argmax ``[B, K]`` (``[B, S]`` without ``index``) is the
    teacher-forced prediction the faithful aux mode decodes.
    """
    if isinstance(out, HiddenHead):
        return chunked_lm_loss(out.hidden, out.kernel, labels, weight, index, reduction, chunk=out.chunk,
                               argmax=argmax)
    loss, n = lm_loss(out, labels, weight, index, reduction)
    return loss, n, (jnp.argmax(out, axis=-1).astype(jnp.int32) if argmax else None)


def chunked_lm_loss(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, weight: jax.Array | None = None,
                    index: jax.Array | None = None, reduction: str = "token_mean", *, chunk: int = 2048,
                    argmax: bool = False):
    """:func:`lm_loss` (same targets, −100 masking, weights and reductions) of the logits
    ``hidden @ kernel`` without forming them → ``(loss, n_tokens, argmax ids [B, K] or None)``.

    ``hidden [B, K, D]`` at the ``index`` positions, or ``[B, S, D]`` without ``index`` (position
    t predicts ``labels[:, t+1]``; the argmax is then ``[B, S]``, as over full logits). Per row,
    the logsumexp and the target's logit come from one sweep over vocabulary blocks of ``chunk``
    columns (:func:`blockwise_logits`).
    """
    _check_reduction(reduction)
    B, K, D = hidden.shape
    targets, mask = _targets(labels, weight, index, shifted_len=K if index is None else None)
    logz, tgt, pred = blockwise_logits(hidden.reshape(B * K, D), kernel, jnp.maximum(targets, 0).reshape(B * K, 1),
                                       chunk, argmax=argmax)
    nll = jnp.where(mask, logz.reshape(B, K) - tgt.reshape(B, K), 0.0)
    loss, n = _reduce(nll, mask, reduction)
    return loss, n, None if pred is None else pred.reshape(B, K)


def blockwise_logits(hidden: jax.Array, kernel: jax.Array, ids: jax.Array, chunk: int, *, argmax: bool = False):
    """What a loss reads of the fp32 logits ``hidden [N, D] @ kernel [D, V]``, in vocabulary blocks
    of ``chunk`` columns → ``(logsumexp [N], the logits of ids [N, T], argmax [N] int32 or None)``.

    A custom VJP: the backward recomputes each block's logits and accumulates ``d hidden`` in fp32
    (and ``d kernel``, only when the kernel is being differentiated: a trainable or tied LM head),
    so neither pass holds more than one ``[N, chunk]`` block. ``chunk >= V`` is one block. The
    argmax takes the first maximum, as ``jnp.argmax``.
    """
    if chunk <= 0:
        raise ValueError(f"blockwise_logits chunk must be > 0, got {chunk}")
    return _blockwise(hidden, kernel, ids.astype(jnp.int32), int(chunk), bool(argmax))


def _n_blocks(V: int, chunk: int) -> tuple[int, int]:
    c = min(chunk, V)
    return -(-V // c), c


def _block(hidden, kernel, ids, i, c):
    """Block ``i`` of ``c`` columns → ``(logits [N, c] fp32, start, kernel block, ids' column in it
    [N, T], whether each id is there [N, T])``. Blocks start at ``i * c``; the last one is moved
    back to end at V (no padded copy of the kernel), its columns that the previous block covered
    set to −inf."""
    V = kernel.shape[1]
    start = jnp.minimum(i * c, V - c)
    w = jax.lax.dynamic_slice_in_dim(kernel, start, c, axis=1)               # [D, c]
    logits = jnp.dot(hidden, w, preferred_element_type=jnp.float32)          # as Llama's head
    logits = jnp.where((start + jnp.arange(c) >= i * c)[None, :], logits, -jnp.inf)
    here = (ids >= i * c) & (ids < start + c)
    return logits, start, w, jnp.clip(ids - start, 0, c - 1), here


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blockwise(hidden, kernel, ids, chunk, with_argmax):
    n, c = _n_blocks(kernel.shape[1], chunk)
    N = hidden.shape[0]

    def body(i, carry):
        m, s, picked, arg = carry
        logits, start, _, col, here = _block(hidden, kernel, ids, i, c)
        picked = jnp.where(here, jnp.take_along_axis(logits, col, axis=1), picked)
        bm = logits.max(-1)
        if with_argmax:   # strictly greater: an earlier block's equal maximum wins
            arg = jnp.where(bm > m, jnp.argmax(logits, -1).astype(jnp.int32) + start, arg)
        m_new = jnp.maximum(m, bm)
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
        return m_new, s, picked, arg

    init = (jnp.full((N,), -jnp.inf, jnp.float32), jnp.zeros((N,), jnp.float32),
            jnp.zeros(ids.shape, jnp.float32), jnp.zeros((N,), jnp.int32))
    m, s, picked, arg = jax.lax.fori_loop(0, n, body, init)
    return m + jnp.log(s), picked, (arg if with_argmax else None)


def _blockwise_fwd(hidden, kernel, ids, chunk, with_argmax):
    # symbolic_zeros: the primals come with a ``perturbed`` bit, so a frozen kernel (the paper's
    # LoRA over a frozen LLaMA) costs no kernel-gradient work. The bit travels in the residuals'
    # structure (None / ()), as residuals hold arrays only.
    out = _blockwise(hidden.value, kernel.value, ids.value, chunk, with_argmax)
    return out, (hidden.value, kernel.value, ids.value, out[0], () if kernel.perturbed else None)


def _blockwise_bwd(chunk, with_argmax, res, ct):
    hidden, kernel, ids, logz, kernel_grad = res
    g_logz, g_pick = ct[0], ct[1]
    if isinstance(g_logz, SymbolicZero) and isinstance(g_pick, SymbolicZero):
        return jnp.zeros_like(hidden), jnp.zeros_like(kernel), None
    g_logz = jnp.zeros(logz.shape, jnp.float32) if isinstance(g_logz, SymbolicZero) else g_logz
    g_pick = jnp.zeros(ids.shape, jnp.float32) if isinstance(g_pick, SymbolicZero) else g_pick
    n, c = _n_blocks(kernel.shape[1], chunk)
    rows = jnp.arange(hidden.shape[0])[:, None]
    with_kernel = kernel_grad is not None
    contract = lambda a, b, dims: jax.lax.dot_general(a, b, (dims, ((), ())),    # noqa: E731
                                                      preferred_element_type=jnp.float32)

    def body(i, carry):
        dh, dw = carry
        logits, start, w, col, here = _block(hidden, kernel, ids, i, c)
        # d logits of the block, fp32 (as the full-logits backward): softmax · g_logz, plus g_pick
        # at the ids (0 where −inf)
        gl = g_logz[:, None] * jnp.exp(logits - logz[:, None])
        gl = gl.at[rows, col].add(jnp.where(here, g_pick, 0.0))
        dh = dh + contract(gl, w, ((1,), (1,)))                                 # [N, D]
        if with_kernel:
            # The last block's repeated columns get gl = 0: adding leaves them as written.
            dwc = contract(hidden, gl, ((0,), (0,))).astype(dw.dtype)          # [D, c]
            dw = jax.lax.dynamic_update_slice_in_dim(
                dw, jax.lax.dynamic_slice_in_dim(dw, start, c, axis=1) + dwc, start, axis=1)
        return dh, dw

    dw0 = jnp.zeros_like(kernel) if with_kernel else jnp.zeros((), kernel.dtype)
    dh, dw = jax.lax.fori_loop(0, n, body, (jnp.zeros(hidden.shape, jnp.float32), dw0))
    return dh.astype(hidden.dtype), (dw if with_kernel else jnp.zeros_like(kernel)), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd, symbolic_zeros=True)


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

FAITHFUL_SELECTS = ("videotokens", "kind")
_FIRST_NUMBER = re.compile(r"\d+")


def reference_video_index(text: str) -> int | None:
    """The reference's reading of a predicted retrieval answer: the first integer of the text's
    second ``.``-separated piece (``IVCR.forward``: ``find_number(pre_text.split('.')[1]) - 1``,
    ``find_number`` from ``metrics/tvg/eval_video.py``, 0 when there is none), kept when it is
    1..10 (the reference's ``0 <= index <= 9``), else None. Text without a ``.`` is None (the
    reference raises ``IndexError`` there)."""
    parts = text.split(".")
    if len(parts) < 2:
        return None
    m = _FIRST_NUMBER.search(parts[1])
    n = int(m.group()) if m else 0
    return n if 1 <= n <= 10 else None


def video_counts(batch: Mapping[str, Any]) -> np.ndarray:
    """int [B]: the videos each row shows, i.e. its ``<VIDEOTOKEN>`` placeholders before expansion
    (each video of a sample has its own slot, ``data/samples.py`` ``Sample.videos``): the sum of
    ``videos[group]["video_mask"]`` over the groups, or ``batch["num_videos"]`` when given."""
    if "num_videos" in batch:
        return np.asarray(batch["num_videos"]).astype(np.int64)
    groups = batch.get("videos") or {}
    B = len(np.asarray(batch["labels"]))
    n = np.zeros(B, np.int64)
    for grp in groups.values():
        n += np.asarray(grp["video_mask"]).reshape(B, -1).sum(axis=1)
    return n


def faithful_aux(pred_ids: np.ndarray, batch: Mapping[str, Any], tokenizer,
                 select: str = "videotokens") -> dict[str, float]:
    """The reference's L_V and L_C for one batch, from argmax ids (host side, no gradient).

    ``select="videotokens"`` (default, the reference): ``ivcr/models/ivcr.py : IVCR.forward``,
    ``flag == 1`` block, chooses per sample by ``len(token_pos_list)``, the number of
    ``<VIDEOTOKEN>`` ids in the sample's whole ``input_ids`` (every turn of the prefix, history
    included), with ``iou_loss = 0`` and ``index_loss = 0`` beforehand and
    ``loss = outputs.loss + 0.01 * ((1 - iou_loss) + index_loss)`` after. Per real sample:

    * 1 video → L_C = 1 − IoU(``extract_time(pred)``, gt); a prediction without a span sets
      ``iou_loss = 1.`` (L_C = 0, the reference's no-penalty bug); L_V = 0. A sample with no
      ground-truth span scores IoU 0 (the reference's ``iou`` returns 0 for an empty gt).
    * 10 videos → ``iou_loss = 1.`` (L_C = 0); L_V = ``CrossEntropyLoss`` of the constant logits
      (0.01 everywhere, 10 at the parsed index) against the gt index, where the index is read by
      :func:`reference_video_index`; an unparseable answer (or one outside 1..10, or no gt)
      scores **0** (``index_loss = 0.``).
    * any other count (a retrieval turn followed by a moment turn has 11, chat-only 0) →
      neither branch runs: L_V = 0 and L_C = 1 − 0 = **1**, a constant the reference adds
      (0.01 × 1) to every such sample's loss.

    Both losses are then means over the batch's real samples (the reference's per-sample total,
    ``LM + 0.01·(L_C + L_V)``, averaged over samples, is ``LM + α·L_V + β·L_C`` of these means).
    The span is read by :func:`ivcr_jax.data.answers.parse_moment` (TimeChat's ``extract_time``,
    ``utils/format_tvg.py``, with more formats); the decoded text is the argmax at the positions
    that predict the supervised tokens (the reference decodes from one position earlier to the
    end, ``pre_logits[:, end_index-1:]`` — the same ids plus the argmax after the final ``</s>``).

    ``select="kind"`` (this port's earlier variant): by the supervised (last) turn's ``kind``
    (1 retrieval → L_V, 2 moment → L_C, chat → neither), the index read by
    :func:`ivcr_jax.data.answers.parse_video_index` with an unparseable answer scored ln 10 (a
    uniform guess), and each loss the mean over the samples of its kind.
    """
    if select not in FAITHFUL_SELECTS:
        raise ValueError(f"faithful_aux select must be one of {FAITHFUL_SELECTS}, got {select!r}")
    kinds = np.asarray(batch["kind"])
    weight = np.asarray(batch.get("weight", np.ones(len(kinds))))
    answers = predicted_answer_ids(np.asarray(pred_ids), np.asarray(batch["labels"]), batch.get("loss_index"))
    counts = video_counts(batch) if select == "videotokens" else None
    video, moment = [], []
    for i, ids in enumerate(answers):
        if weight[i] <= 0:
            continue
        text = tokenizer.decode(ids, skip_special_tokens=True)
        gt_index = int(batch["target_index"][i]) + 1           # 1-based; 0 = none
        gt_span = tuple(np.asarray(batch["gt_span"][i]).tolist())
        if select == "videotokens":
            v = m = 0.0
            if counts[i] == 1:
                span = parse_moment(text)
                if span is not None:
                    m = 1.0 - (iou(span, gt_span) if min(gt_span) >= 0 else 0.0)
            elif counts[i] == 10:
                n = reference_video_index(text)
                if n is not None and gt_index >= 1:
                    v = _CONST_RIGHT if n == gt_index else _CONST_WRONG
            else:
                m = 1.0
            video.append(v)
            moment.append(m)
        elif kinds[i] == 1:
            n = parse_video_index(text)
            video.append(_CONST_NONE if n is None else (_CONST_RIGHT if n == gt_index else _CONST_WRONG))
        elif kinds[i] == 2:
            span = parse_moment(text)
            # Reproduced reference bug: a parse failure sets IoU to 1.0, i.e. no penalty.
            v = 1.0 if span is None else iou(span, gt_span)
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
