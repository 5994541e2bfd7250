"""Text-to-video retrieval metrics as X-Pool reports them (reference-architecture.md §5, "Eval").

``layer6ai-labs/xpool : modules/metrics.py``: the rank of the ground-truth video comes from a
double argsort of each text's similarity row (0 = best), and

* ``R@k = 100 * fraction of texts with rank < k`` (k = 1, 5, 10, 50, 100),
* ``MedR = median(rank) + 1``, ``MeanR = mean(rank) + 1`` (1-based).

Rows whose ground-truth similarity is ±inf or NaN (X-Pool's padding of texts per video) are
dropped, as upstream does. Ties are broken by column order (a stable sort), which makes the
metrics deterministic; upstream's ``torch.argsort`` leaves tie order unspecified.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

RECALL_KS = (1, 5, 10, 50, 100)


def gt_ranks(sims: np.ndarray, gt: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """0-based rank of each text's ground-truth column in ``sims`` ``[T, V]`` (double argsort).

    ``gt`` ``[T]`` holds the ground-truth column per text; ``None`` means the diagonal
    (text ``i`` belongs to video ``i``, which needs ``T == V``). Rows whose ground-truth score is
    not finite are dropped.
    """
    sims = np.asarray(sims, np.float64)
    n_t, n_v = sims.shape
    if gt is None:
        if n_t != n_v:
            raise ValueError(f"gt=None needs a square similarity matrix, got {sims.shape}")
        gt = np.arange(n_t)
    gt = np.asarray(gt, np.int64)
    if gt.shape != (n_t,):
        raise ValueError(f"gt must have shape ({n_t},), got {gt.shape}")
    order = np.argsort(-sims, axis=1, kind="stable")          # best first
    rank_of = np.argsort(order, axis=1, kind="stable")        # column -> rank
    ranks = rank_of[np.arange(n_t), gt]
    valid = np.isfinite(sims[np.arange(n_t), gt])
    return ranks[valid]


def compute_metrics(ranks: Iterable[int], ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """X-Pool's ``compute_metrics`` on 0-based ranks."""
    r = np.asarray(list(ranks) if not isinstance(ranks, np.ndarray) else ranks, np.float64)
    if r.size == 0:
        raise ValueError("no valid ranks to score")
    out = {f"R{k}": 100.0 * float(np.sum(r < k)) / r.size for k in ks}
    out["MedR"] = float(np.median(r)) + 1.0
    out["MeanR"] = float(np.mean(r)) + 1.0
    return out


def t2v_metrics(sims: np.ndarray, gt: Sequence[int] | np.ndarray | None = None,
                ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """R@k / MedR / MeanR for text->video similarities ``sims`` ``[T, V]``."""
    return compute_metrics(gt_ranks(sims, gt), ks)


def ranks_from_lists(ranked_ids: Sequence[Sequence[str]], gt_ids: Sequence[str]) -> np.ndarray:
    """0-based rank of each ground truth inside a (truncated) ranked id list.

    A ground truth missing from its list gets rank ``len(list)``, so ``R@k`` stays exact for
    every ``k <= len(list)`` while MedR/MeanR become lower bounds.
    """
    if len(ranked_ids) != len(gt_ids):
        raise ValueError(f"{len(ranked_ids)} ranked lists for {len(gt_ids)} ground truths")
    out = []
    for ids, g in zip(ranked_ids, gt_ids):
        ids = list(ids)
        out.append(ids.index(g) if g in ids else len(ids))
    return np.asarray(out, np.int64)
