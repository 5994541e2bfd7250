"""Two-stage corpus search: exact sharded top-K, then X-Pool re-ranking; candidate lists for the LLM.

performance-model.md §5: X-Pool is text-conditioned, so scoring a query against V videos costs
V poolings (not one dot product each). The recommended pattern at scale, used here:

1. **First stage** — exact maximum inner product over the mean-pooled, L2-normalised video
   embeddings of the index (``[N, D]``): one jitted matmul + ``jax.lax.top_k``. The video axis is
   sharded over the devices of a mesh (logical axis ``batch``); each device takes its local
   top-K, the ``K`` best of every device are gathered and merged (``jax.shard_map``).
2. **Second stage** — X-Pool scores each query against its own ``K`` candidates
   (``XPool.pool_pairs``) and the list is re-sorted. With ``K = N`` the result is exactly the
   X-Pool ranking of the whole corpus.

:func:`write_candidates` writes the top-10 as ``candidate_videos`` of every retrieval turn of an
IVCR-format JSON (reference-architecture.md §0 step 1, §8.2); :class:`Retriever` is what
``ivcr_jax.chat`` uses when an index is given.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ivcr_jax import cli, sharding
from ivcr_jax.data.schema import RETRIEVAL, load_dialogues
from ivcr_jax.models.xpool import XPool, load_xpool
from ivcr_jax.models.params import CheckpointError
from ivcr_jax.retrieval.index import USER_ERRORS, VideoIndex, VideoIndexError
from ivcr_jax.retrieval.metrics import compute_metrics, ranks_from_lists

_PRECISION = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


def _bucket(n: int) -> int:
    """Pad query batches to powers of two so the search compiles for few shapes."""
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _topk_fn(mesh: Mesh, axes: tuple[str, ...], shards: int, local_rows: int, block: int, k: int,
             precision, blocked: bool) -> Callable:
    """The jitted, sharded top-k (cached: indexes of equal shape on one mesh share a compilation).

    ``blocked``: each device scans its rows in blocks of ``block`` keeping a running top-k, so the
    score matrix held at once is ``[B, block]`` instead of ``[B, rows]`` (large query batches).
    Otherwise one matmul + top_k per device (a scan would re-read the rows, which costs a
    memory-bound single query several times over). Then the per-device lists are merged.
    """
    kl = min(k, local_rows)
    nb = local_rows // block if blocked else 1
    row_spec = P(None if not axes else (axes[0] if len(axes) == 1 else axes))

    def block_topk(q, emb, rows):
        s = jnp.einsum("bd,nd->bn", q.astype(emb.dtype), emb, precision=precision,
                       preferred_element_type=jnp.float32)
        s = jnp.where(rows[None, :] >= 0, s, -jnp.inf)
        v, i = jax.lax.top_k(s, min(k, emb.shape[0]))
        return v, rows[i]

    def local(q, emb, rows):
        # q [B, D] replicated; emb [local_rows, D]; rows [local_rows] global ids (-1 = padding)
        if nb <= 1:
            v, r = block_topk(q, emb, rows)
        else:
            def step(carry, blk):
                v, r = block_topk(q, *blk)
                v = jnp.concatenate([carry[0], v], axis=1)
                r = jnp.concatenate([carry[1], r], axis=1)
                v, j = jax.lax.top_k(v, kl)
                return (v, jnp.take_along_axis(r, j, axis=1)), None
            b = q.shape[0]
            init = (jnp.full((b, kl), -jnp.inf, jnp.float32), jnp.full((b, kl), -1, rows.dtype))
            blocks = (emb.reshape(nb, block, emb.shape[-1]), rows.reshape(nb, block))
            (v, r), _ = jax.lax.scan(step, init, blocks)
        if shards > 1:      # merge: gather every shard's top-k, keep the k best
            v = jax.lax.all_gather(v, axes, axis=1, tiled=True)     # [B, shards * kl]
            r = jax.lax.all_gather(r, axes, axis=1, tiled=True)
            v, j = jax.lax.top_k(v, k)
            r = jnp.take_along_axis(r, j, axis=1)
        return v, r

    # After the all_gather every device holds the same merged top-k, but the type system still
    # marks all_gather's output as varying over the axes; check_vma=False lets it out as replicated.
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(*row_spec, None), row_spec),
                                 out_specs=(P(), P()), check_vma=False))


class FirstStage:
    """Exact top-k inner product search over ``emb`` ``[N, D]``, the ``N`` axis sharded over ``mesh``.

    ``mesh=None`` uses every local device (a ``data``-only mesh from ``ivcr_jax.sharding``); pass
    ``devices=[jax.devices()[0]]`` for single-device search. Rows are padded to a multiple of the
    shard count (and into equal blocks of at most ``block_rows`` when a shard holds more); padded
    rows score ``-inf``. A query batch whose per-device score matrix would exceed ``score_budget``
    floats is scanned block by block. ``dtype`` is the storage/compute type of the embeddings
    (scores accumulate in fp32).
    """

    def __init__(self, emb: np.ndarray, *, mesh: Mesh | None = None, devices: Sequence[Any] | None = None,
                 dtype: Any = jnp.float32, precision: str = "highest", block_rows: int = 65536,
                 score_budget: int = 1 << 25):
        emb = np.asarray(emb)
        if emb.ndim != 2:
            raise ValueError(f"expected embeddings [N, D], got {emb.shape}")
        self.n, self.dim = emb.shape
        if self.n == 0:
            raise VideoIndexError("cannot search an empty index (it holds no video)")
        self.mesh = mesh if mesh is not None else sharding.make_mesh({"data": -1}, devices)
        # The mesh axes the logical 'batch' axis maps to: ask the rules with a dimension that every
        # axis product divides (the device count).
        probe = sharding.logical_to_spec(("batch", None), (self.mesh.devices.size, self.dim), self.mesh)
        axes = probe[0] if len(probe) else None
        self.axes: tuple[str, ...] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        self.shards = math.prod(self.mesh.shape[a] for a in self.axes) if self.axes else 1
        local = -(-self.n // self.shards)
        nb = -(-local // int(block_rows))
        per = -(-local // nb)
        self.block = -(-per // 8) * 8 if nb > 1 else local             # equal blocks, 8-aligned
        self.local = nb * self.block
        self.score_budget = int(score_budget)
        n_pad = self.local * self.shards
        rows = np.full((n_pad,), -1, np.int32)
        rows[: self.n] = np.arange(self.n, dtype=np.int32)
        np_dtype = np.dtype(jnp.dtype(dtype))
        if n_pad == self.n:
            emb_p = emb.astype(np_dtype, copy=False)
        else:
            emb_p = np.zeros((n_pad, self.dim), np_dtype)
            emb_p[: self.n] = emb
        row_spec = P(None if not self.axes else (self.axes[0] if len(self.axes) == 1 else self.axes))
        self.emb = jax.device_put(emb_p, NamedSharding(self.mesh, P(*row_spec, None)))
        self.rows = jax.device_put(rows, NamedSharding(self.mesh, row_spec))
        self.precision = _PRECISION[precision]
        self._q_sharding = NamedSharding(self.mesh, P())

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries ``[B, D]`` (already normalised) -> (rows int32 ``[B, k]``, scores float32 ``[B, k]``)."""
        q = np.asarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"expected queries [B, {self.dim}], got {q.shape}")
        k = min(int(k), self.n)
        b = q.shape[0]
        if _bucket(b) != b:
            qp = np.zeros((_bucket(b), self.dim), np.float32)
            qp[:b] = q
        else:
            qp = q
        blocked = self.local > self.block and qp.shape[0] * self.local > self.score_budget
        fn = _topk_fn(self.mesh, self.axes, self.shards, self.local, self.block, k, self.precision, blocked)
        v, r = fn(jax.device_put(qp, self._q_sharding), self.emb, self.rows)
        return np.asarray(r)[:b], np.asarray(v)[:b]


@nnx.jit
def _rerank(model: XPool, text: jax.Array, frames: jax.Array) -> jax.Array:
    return model.pool_pairs(text, frames)


def rerank(model: XPool, text: np.ndarray, frames: np.ndarray, *, batch: int = 16) -> np.ndarray:
    """X-Pool scores of texts ``[B, D]`` against their own candidates ``[B, K, F, D]`` -> ``[B, K]``."""
    n = text.shape[0]
    out = np.empty(frames.shape[:2], np.float32)
    bs = min(batch, _bucket(n))
    for b0 in range(0, n, bs):
        t = np.zeros((bs,) + text.shape[1:], np.float32)
        f = np.zeros((bs,) + frames.shape[1:], np.float32)
        m = min(bs, n - b0)
        t[:m], f[:m] = text[b0:b0 + m], frames[b0:b0 + m]
        out[b0:b0 + m] = np.asarray(_rerank(model, t, f))[:m]
    return out


class Retriever:
    """Text -> ranked video ids over an index: first-stage top-``rerank_k``, then X-Pool.

    ``model=None`` returns the first-stage ranking. ``encode_text`` maps strings to ``[B, D]``
    features; it defaults to the extractor the index was built with.
    """

    def __init__(self, index: VideoIndex, model: XPool | None = None, *,
                 encode_text: Callable[[Sequence[str]], np.ndarray] | None = None,
                 rerank_k: int = 100, mesh: Mesh | None = None, devices: Sequence[Any] | None = None,
                 rerank_batch: int = 16):
        self.index, self.model = index, model
        self.rerank_k, self.rerank_batch = int(rerank_k), int(rerank_batch)
        self._encode = encode_text
        self.first = FirstStage(index.mean, mesh=mesh, devices=devices)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, model_path: str | os.PathLike | None = None, *,
             rerank_k: int = 100, extractor_overrides: dict | None = None, **kw) -> "Retriever":
        """An index directory plus an exported X-Pool (``train.py`` writes ``xpool.safetensors``)."""
        index = VideoIndex.load(index_dir)
        model = load_xpool(model_path) if model_path else None
        extractor = index.extractor(**(extractor_overrides or {}))
        return cls(index, model, encode_text=extractor.encode_text, rerank_k=rerank_k, **kw)

    def encode(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
        if isinstance(texts, np.ndarray):
            return np.asarray(texts, np.float32)
        if self._encode is None:
            self._encode = self.index.extractor().encode_text
        return np.asarray(self._encode(list(texts)), np.float32)

    def search_rows(self, text: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Feature queries ``[B, D]`` -> (rows ``[B, k]``, scores ``[B, k]``), best first."""
        text = np.asarray(text, np.float32)
        qn = text / np.maximum(np.linalg.norm(text, axis=-1, keepdims=True), 1e-12)
        k = min(int(k), len(self.index))
        if self.model is None:
            return self.first.search(qn, k)
        kk = max(k, min(self.rerank_k, len(self.index)))
        rows, _ = self.first.search(qn, kk)
        frames = self.index.frames(rows)                                     # [B, K, F, D]
        s = rerank(self.model, text, frames, batch=self.rerank_batch)       # [B, K]
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(rows, order, 1), np.take_along_axis(s, order, 1)

    def search(self, texts: Sequence[str] | np.ndarray, k: int = 10) -> tuple[list[list[str]], np.ndarray]:
        """Texts (or text features ``[B, D]``) -> (ranked video ids per text, scores ``[B, k]``)."""
        rows, scores = self.search_rows(self.encode(texts), k)
        return [[self.index.ids[r] for r in row] for row in rows], scores


# ----------------------------------------------------------------------------- IVCR candidate lists

def retrieval_turns(annotations: str | os.PathLike, *, split: str | None = None,
                    exclude_types: tuple[tuple[int, ...], ...] = ()) -> list[tuple[int, int, str, str | None]]:
    """``(record, message, question, gt_video_id)`` for every retrieval turn of an IVCR JSON.

    The file is read by :func:`ivcr_jax.data.schema.load_dialogues` (the one reader of the
    format): a retrieval turn is a turn of kind ``"retrieval"`` (``gt_se == [-1, -1]``, §8.2), its
    query the human question of that turn. ``record`` is the position of the dialogue in the JSON
    list and ``message`` the position of the assistant message in its ``conversations`` (the schema
    pairs messages as human ``2 i``, assistant ``2 i + 1`` for turn ``i``). Candidate lists are not
    required (they are what :func:`write_candidates` fills in); records the schema rejects as
    malformed are skipped, as everywhere else.
    """
    dialogues, _ = load_dialogues(annotations, split=split, exclude_types=exclude_types, num_candidates=None)
    return [(d.index, 2 * t.index + 1, t.question, t.video_id)
            for d in dialogues for t in d.turns if t.kind == RETRIEVAL]


def write_candidates(annotations_in: str | os.PathLike, index: VideoIndex | str | os.PathLike,
                     model: XPool | None, out_json: str | os.PathLike, k: int = 10, *,
                     encode_text: Callable[[Sequence[str]], np.ndarray] | None = None,
                     rerank_k: int = 100, batch: int = 64, retriever: Retriever | None = None) -> dict:
    """Write the top-``k`` of every retrieval turn as its ``candidate_videos`` (ids relative to the
    video root, as in IVCR-200K). The retrieval turns are those of :func:`retrieval_turns`;
    everything else in the JSON is kept. Returns recall statistics of the ground-truth
    ``video_id`` in the written lists (X-Pool-style R@k, in percent)."""
    if retriever is None:
        if not isinstance(index, VideoIndex):
            index = VideoIndex.load(index)
        retriever = Retriever(index, model, encode_text=encode_text, rerank_k=rerank_k)
    turns = retrieval_turns(annotations_in)               # which turns, their questions: the schema
    data = json.loads(Path(annotations_in).read_text())   # the raw records, to write back
    ranked: list[list[str]] = []
    for b0 in range(0, len(turns), batch):
        ids, _ = retriever.search([t[2] for t in turns[b0:b0 + batch]], k)
        ranked += ids
    for (di, ti, _, _), ids in zip(turns, ranked):
        data[di]["conversations"][ti]["candidate_videos"] = ids
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_name(out_json.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1))
    os.replace(tmp, out_json)
    known = set(retriever.index.ids)
    scored = [(ids, t[3]) for t, ids in zip(turns, ranked) if t[3] in known]
    stats: dict[str, Any] = {"turns": len(turns), "turns_with_gt_in_index": len(scored)}
    if scored:
        ranks = ranks_from_lists([s[0] for s in scored], [s[1] for s in scored])
        m = compute_metrics(ranks, ks=tuple(x for x in (1, 5, 10) if x <= k))
        stats.update({key: v for key, v in m.items() if key.startswith("R")})
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ivcr_jax.retrieval.search --index INDEX [--model WORKDIR] --annotations IN --out OUT``.

    ``config.search.top_k`` candidates are written, re-ranked from the first stage's ``rerank_k``.
    """
    p = argparse.ArgumentParser(prog="python -m ivcr_jax.retrieval.search",
                                description="Write X-Pool top-k candidate_videos into an IVCR-format JSON.")
    p.add_argument("--index", required=True, help="index directory (retrieval/index.py)")
    p.add_argument("--model", default=None, help="X-Pool export (train.py workdir or xpool.safetensors); "
                   "omitted = first stage only (mean-pooled features)")
    p.add_argument("--annotations", required=True, help="IVCR-format JSON to read")
    p.add_argument("--out", required=True, help="IVCR-format JSON to write")
    p.add_argument("--blip2", default=None, help="BLIP-2 directory, if it moved since the index was built")

    def body() -> int:
        config, args = cli.parse(argv, p, default_config="configs/xpool.py")
        ret = Retriever.load(args.index, args.model, rerank_k=int(config.search.rerank_k),
                             extractor_overrides={"path": args.blip2} if args.blip2 else None)
        stats = write_candidates(args.annotations, None, None, args.out, int(config.search.top_k), retriever=ret)
        print(json.dumps(stats))
        return 0
    return cli.run(body, known=USER_ERRORS + (CheckpointError,))


if __name__ == "__main__":
    raise SystemExit(main())
