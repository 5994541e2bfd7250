"""Differentiable video-index (L_V) and moment (L_C) losses (``train.aux_loss_mode="differentiable"``).

The reference computes both from argmax-decoded text, so they carry no gradient
(reference-architecture §8.6; ``faithful`` mode in ``losses.py`` reproduces that). Here:

* **L_V** — cross-entropy over the 10 candidates, each scored by the log-probability of the
  answer naming it: the prefix up to the index is shared, then candidate k contributes its digit
  tokens (LLaMA splits numbers into digits, so "video 10" is the two tokens "1","0") followed by
  the token that follows the number in the ground-truth answer (so "1" is told apart from "10").
  The first digit is scored from the main sequence's logits; the remaining tokens of every
  candidate are scored exactly in the same forward pass, appended to the sequence as a tree (each
  continuation attends to the real prefix and to its own earlier tokens, at the positions it
  would occupy; ``Llama`` takes the full ``[B, S, S]`` mask). Only the answer's continuation up
  to one token past the number is scored: the rest of the answer is the same text for every k.
* **L_C** — 1 − IoU of an expected span: each number of "a - b seconds" is Σ place × E[digit],
  where E[digit] is the mean digit under the model's distribution over the ten digit tokens at
  that position (teacher-forced on the ground-truth digits before it). Differentiable in the
  logits; like IoU itself it has no gradient when the spans do not overlap.

Host side (:func:`add_targets`) locates these tokens in each sample's supervised answer and
adds the fixed-shape target arrays of ``data/batch.py``'s ``AUX`` layout to the batch; the jitted
side (:func:`differentiable_aux`) uses them. ``train/aux.py`` wires both into the step.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ivcr_jax.data.batch import MAX_DIGITS, NUM_CANDIDATES, empty_aux
from ivcr_jax.train import losses


def _digit_map(tok) -> dict[int, int]:
    ids = tok.convert_tokens_to_ids(list("0123456789"))
    return {int(i): d for d, i in enumerate(ids)}


def add_targets(batch: dict, tok) -> dict:
    """Add ``cand_*`` and ``num_*`` arrays (numpy, fixed shapes) for :func:`differentiable_aux`."""
    digits = _digit_map(tok)
    dot = tok.convert_tokens_to_ids(["."])[0]
    digit_ids = tok.convert_tokens_to_ids(list("0123456789"))
    B = batch["input_ids"].shape[0]
    aux = empty_aux(B)
    cand_pos = aux["cand_pos"]        # [B] position of the first digit
    cand_cont = aux["cand_cont"]      # [B, K, C]
    cand_len = aux["cand_len"]        # [B, K] tokens after the first digit
    cand_first = aux["cand_first"]    # [B, K] first digit token of each candidate
    num_pos = aux["num_pos"]          # [B, 2, D]
    num_place = aux["num_place"]      # [B, 2, D]
    for b in range(B):
        labels = batch["labels"][b]
        ids = batch["input_ids"][b]
        sup = np.nonzero(labels != -100)[0]
        if len(sup) == 0 or batch.get("weight", np.ones(B))[b] <= 0:
            continue
        kind = int(batch["kind"][b])
        runs = _digit_runs(ids, sup, digits, dot)
        if kind == 1 and runs:
            start, toks = runs[0]
            end = start + len(toks)
            term = int(ids[end]) if end < len(ids) and labels[end] != -100 else int(tok.eos_token_id)
            cand_pos[b] = start
            for k in range(1, NUM_CANDIDATES + 1):
                dk = [int(digit_ids[int(c)]) for c in str(k)]
                cont = dk[1:] + [term]
                cand_first[b, k - 1] = dk[0]
                cand_cont[b, k - 1, :len(cont)] = cont
                cand_len[b, k - 1] = len(cont)
        elif kind == 2 and len(runs) >= 2:
            for j, (start, toks) in enumerate(runs[:2]):
                vals = [digits.get(int(t)) for t in toks]
                point = vals.index(None) if None in vals else len(vals)   # the "." token
                n = 0
                for i, v in enumerate(vals):
                    if v is None or n >= MAX_DIGITS:
                        continue
                    exp = (point - 1 - i) if i < point else -(i - point)
                    num_pos[b, j, n] = start + i
                    num_place[b, j, n] = 10.0 ** exp
                    n += 1
    return {**batch, **aux}


def _digit_runs(ids, sup, digits: Mapping[int, int], dot: int):
    """Runs of consecutive supervised digit tokens, a single inner "." allowed ("12.5")."""
    runs, cur, has_dot = [], [], False
    sup_set = set(int(i) for i in sup)
    for i in sorted(sup_set):
        t = int(ids[i])
        inner_dot = (t == dot and cur and not has_dot and cur[-1] == i - 1
                     and (i + 1) in sup_set and int(ids[i + 1]) in digits)
        if (t in digits or inner_dot) and (not cur or cur[-1] == i - 1):
            cur.append(i)
            has_dot = has_dot or inner_dot
            continue
        if cur:
            runs.append(cur)
        cur, has_dot = ([i], False) if t in digits else ([], False)
    if cur:
        runs.append(cur)
    return [(r[0], [ids[i] for i in r]) for r in runs]


def tree_inputs(batch: Mapping[str, Any]):
    """Input ids and RoPE positions of the candidates' continuation slots ``[B, K*C]``.

    Slot j of candidate k takes ``[first digit, cont_0, cont_1, ...][j]`` at position
    ``cand_pos + j`` and its output predicts ``cont_j``.
    """
    cont = batch["cand_cont"]                                  # [B, K, C]
    B, K, C = cont.shape
    inputs = jnp.concatenate([batch["cand_first"][:, :, None], cont[:, :, :-1]], axis=-1)
    pos = jnp.maximum(batch["cand_pos"], 0)[:, None, None] + jnp.arange(C)[None, None, :]
    return inputs.reshape(B, K * C), jnp.broadcast_to(pos, (B, K, C)).reshape(B, K * C)


def forward_with_candidates(model, batch: Mapping[str, Any], rng=None):
    """One LLaMA pass over the sequence plus every candidate continuation → (main, ext) logits."""
    out, S = _candidates_pass(model, batch, rng, compute_logits=True)
    return out.logits[:, :S], out.logits[:, S:]


def forward_hidden_with_candidates(model, batch: Mapping[str, Any], rng=None):
    """The same pass without the LM head (``train.lm_loss_chunk > 0``) → ``(hidden_main [B, S, D],
    hidden_ext [B, K*C, D], lm_head kernel [D, V])``: the losses take logits at the few positions
    they read (:func:`differentiable_aux_hidden`), the LM loss blockwise."""
    out, S = _candidates_pass(model, batch, rng, compute_logits=False)
    return out.hidden[:, :S], out.hidden[:, S:], model.llama.lm_head_weight()


def _candidates_pass(model, batch, rng, *, compute_logits: bool):
    emb = model.input_embeddings(batch, None if rng is None else jax.random.fold_in(rng, 0))
    ids, ext_pos = tree_inputs(batch)
    B, S = batch["input_ids"].shape
    K, C = batch["cand_cont"].shape[1:]
    x = jnp.concatenate([emb, model.llama.embed(ids).astype(emb.dtype)], axis=1)
    real = batch["attention_mask"].astype(bool)
    pos = jnp.concatenate([jnp.maximum(jnp.cumsum(real, -1, dtype=jnp.int32) - 1, 0), ext_pos], axis=1)
    mask = full_mask(batch["attention_mask"], batch["cand_pos"], K, C)
    out = model.llama(inputs_embeds=x, attention_mask=mask, positions=pos,
                      rng=None if rng is None else jax.random.fold_in(rng, 1), compute_logits=compute_logits)
    return out, S


def differentiable_aux(logits_main, logits_ext, batch, digit_ids):
    """(L_V, L_C) for a batch carrying :func:`add_targets` arrays."""
    return video_loss(logits_main, logits_ext, batch), moment_loss(logits_main, batch, digit_ids)


def differentiable_aux_hidden(hidden_main, hidden_ext, kernel, batch, digit_ids, chunk: int):
    """:func:`differentiable_aux` from :func:`forward_hidden_with_candidates`' hidden states: the
    logits only where the losses read them (the candidates' rows, the span's digit columns)."""
    return (video_loss_hidden(hidden_main, hidden_ext, kernel, batch, chunk),
            moment_loss_hidden(hidden_main, kernel, batch, digit_ids))


def full_mask(attention_mask: jax.Array, cand_pos: jax.Array, K: int, C: int) -> jax.Array:
    """``[B, S + K*C, S + K*C]``: causal over the real sequence; continuation slots see the real
    tokens before the number and their own candidate's earlier slots."""
    B, S = attention_mask.shape
    real = attention_mask.astype(bool)
    causal = jnp.tril(jnp.ones((S, S), bool))[None] & real[:, None, :]
    n = K * C
    slot = jnp.arange(n)
    cand, j = slot // C, slot % C
    prefix = (jnp.arange(S)[None, None, :] < jnp.maximum(cand_pos, 0)[:, None, None]) & real[:, None, :]   # [B, n, S]
    own = (cand[:, None] == cand[None, :]) & (j[None, :] <= j[:, None])                                   # [n, n]
    top = jnp.concatenate([causal, jnp.zeros((B, S, n), bool)], axis=-1)
    bottom = jnp.concatenate([jnp.broadcast_to(prefix, (B, n, S)), jnp.broadcast_to(own[None], (B, n, n))], axis=-1)
    return jnp.concatenate([top, bottom], axis=1)


def video_loss(logits_main: jax.Array, logits_ext: jax.Array, batch: Mapping[str, Any]) -> jax.Array:
    """CE over the 10 candidate answers, scored by their sequence log-probabilities."""
    pos = batch["cand_pos"]                                            # [B]
    B, K, C = batch["cand_cont"].shape
    lp_main = jax.nn.log_softmax(logits_main.astype(jnp.float32), -1)  # [B, S, V]
    at = jnp.take_along_axis(lp_main, jnp.maximum(pos - 1, 0)[:, None, None], axis=1)[:, 0]   # [B, V]
    first = jnp.take_along_axis(at, batch["cand_first"], axis=-1)      # [B, K]
    lp_ext = jax.nn.log_softmax(logits_ext.astype(jnp.float32), -1).reshape(B, K, C, -1)
    tok = jnp.take_along_axis(lp_ext, batch["cand_cont"][..., None], axis=-1)[..., 0]         # [B, K, C]
    return _candidate_ce(first, tok, batch)


def video_loss_hidden(hidden_main: jax.Array, hidden_ext: jax.Array, kernel: jax.Array,
                      batch: Mapping[str, Any], chunk: int) -> jax.Array:
    """:func:`video_loss` from hidden states: log-probabilities at the ``1 + K*C`` rows it reads
    only, each a target logit minus the row's logsumexp (``losses.blockwise_logits``)."""
    pos = batch["cand_pos"]                                            # [B]
    B, K, C = batch["cand_cont"].shape
    D = hidden_main.shape[-1]
    h_at = jnp.take_along_axis(hidden_main, jnp.maximum(pos - 1, 0)[:, None, None], axis=1)[:, 0]   # [B, D]
    logz, first, _ = losses.blockwise_logits(h_at, kernel, batch["cand_first"], chunk)              # [B], [B, K]
    logz_ext, tok, _ = losses.blockwise_logits(hidden_ext.reshape(B * K * C, D), kernel,
                                               batch["cand_cont"].reshape(B * K * C, 1), chunk)
    first = first - logz[:, None]
    tok = (tok[:, 0] - logz_ext).reshape(B, K, C)                     # [B, K, C]
    return _candidate_ce(first, tok, batch)


def _candidate_ce(first: jax.Array, tok: jax.Array, batch: Mapping[str, Any]) -> jax.Array:
    """The CE of the ground-truth candidate: ``first [B, K]`` the first digit's log-probability,
    ``tok [B, K, C]`` the continuation's (``cand_len`` of them count)."""
    valid = batch["cand_pos"] >= 0
    B, K, C = tok.shape
    m = jnp.arange(C)[None, None, :] < batch["cand_len"][..., None]
    score = first + jnp.where(m, tok, 0.0).sum(-1)                     # [B, K]
    target = jnp.maximum(batch["target_index"], 0)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(score, -1), target[:, None], axis=-1)[:, 0]
    w = valid & (batch["target_index"] >= 0) & (batch.get("weight", jnp.ones(B)) > 0)
    return jnp.where(w, ce, 0.0).sum() / jnp.maximum(w.sum(), 1)


def expected_numbers(logits: jax.Array, batch: Mapping[str, Any], digit_ids: Sequence[int]) -> jax.Array:
    """E[start], E[end] ``[B, 2]`` from the digit distributions at the span's digit positions."""
    pos = batch["num_pos"]                                             # [B, 2, D]
    B = pos.shape[0]
    flat = jnp.maximum(pos - 1, 0).reshape(B, -1)                      # logits at t-1 predict t
    lg = jnp.take_along_axis(logits, flat[..., None], axis=1)          # [B, 2D, V]
    dl = jnp.take(lg, jnp.asarray(digit_ids), axis=-1).astype(jnp.float32)
    return _expected_from_digit_logits(dl, batch)


def _expected_from_digit_logits(dl: jax.Array, batch: Mapping[str, Any]) -> jax.Array:
    pos = batch["num_pos"]
    p = jax.nn.softmax(dl, -1)
    e_digit = (p * jnp.arange(10.0)).sum(-1).reshape(pos.shape)        # [B, 2, D]
    return jnp.where(pos >= 0, e_digit * batch["num_place"], 0.0).sum(-1)


def soft_iou(pred: jax.Array, gt: jax.Array) -> jax.Array:
    s1, e1 = jnp.minimum(pred[..., 0], pred[..., 1]), jnp.maximum(pred[..., 0], pred[..., 1])
    s2, e2 = gt[..., 0], gt[..., 1]
    inter = jnp.maximum(jnp.minimum(e1, e2) - jnp.maximum(s1, s2), 0.0)
    union = jnp.maximum(e1, e2) - jnp.minimum(s1, s2)
    return inter / jnp.maximum(union, 1e-6)


def moment_loss(logits: jax.Array, batch: Mapping[str, Any], digit_ids) -> jax.Array:
    return _moment_from_expected(expected_numbers(logits, batch, digit_ids), batch)


def moment_loss_hidden(hidden_main: jax.Array, kernel: jax.Array, batch: Mapping[str, Any], digit_ids) -> jax.Array:
    """:func:`moment_loss` from hidden states: the ten digit logits at the span's positions only
    (only the distribution over the digits is read, so no logsumexp over the vocabulary)."""
    B = hidden_main.shape[0]
    flat = jnp.maximum(batch["num_pos"] - 1, 0).reshape(B, -1)          # logits at t-1 predict t
    h = jnp.take_along_axis(hidden_main, flat[..., None], axis=1)      # [B, 2D, D_model]
    dl = jnp.dot(h, jnp.take(kernel, jnp.asarray(digit_ids), axis=1), preferred_element_type=jnp.float32)
    return _moment_from_expected(_expected_from_digit_logits(dl, batch), batch)


def _moment_from_expected(expected: jax.Array, batch: Mapping[str, Any]) -> jax.Array:
    B = expected.shape[0]
    valid = (batch["num_pos"][:, :, 0] >= 0).all(-1) & (batch.get("weight", jnp.ones(B)) > 0)
    iou = soft_iou(expected, batch["gt_span"])
    return jnp.where(valid, 1.0 - iou, 0.0).sum() / jnp.maximum(valid.sum(), 1)
