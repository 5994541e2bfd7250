"""First-stage retrieval speed: our jitted, sharded exact top-k against faiss ``IndexFlatIP``.

Both search the same synthetic L2-normalised float32 vectors (``--dim``, default 256 = BLIP-2's ITC
dimension) for the top-``k`` inner products, exactly, in the same process:

* **single-query p50**: the median wall time of one query (host array in, ids/scores back on the
  host), over ``--single`` queries (fewer at 1M, see ``--single-budget``);
* **batched queries/s**: one batch of ``--batch`` queries (``--batch-1m`` at >= 1M vectors), timed
  over ``--reps`` repetitions (best kept).

It prints a table and, per size, the ratio ours/faiss (latency: > 1 means slower; throughput:
> 1 means faster), and checks that both return the same top-k. Runs in a few minutes on 2 cores:

    python benchmarks/retrieval_bench.py --sizes 12500,100000,1000000 --dim 256

performance-model.md §5 gives the anchors (exact two-tower top-10 over 1M x 512 on CPU at
~40 ms/query when memory-bound; faiss's own guidance for flat indexes at 1M).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _unit(rng: np.random.Generator, n: int, d: int, chunk: int = 1 << 17) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        out[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _p50(fn, queries: np.ndarray) -> float:
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q[None])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _qps(fn, batch: np.ndarray, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn(batch)
        best = min(best, time.perf_counter() - t)
    return len(batch) / best


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="12500,100000,1000000", help="comma-separated corpus sizes")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--single", type=int, default=50, help="single queries timed per size")
    p.add_argument("--single-budget", type=float, default=2.5e7,
                   help="cap single queries at budget/size (so 1M vectors get 25 queries)")
    p.add_argument("--batch", type=int, default=256, help="queries per batch below 1M vectors")
    p.add_argument("--batch-1m", type=int, default=64, help="queries per batch at >= 1M vectors")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="our embedding dtype (faiss IndexFlatIP is always float32)")
    p.add_argument("--faiss-threads", default="1,all",
                   help="faiss OpenMP thread counts to try ('all' = every core); the best is reported")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import faiss
    import jax

    from ivcr_jax.retrieval.search import FirstStage

    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    all_threads = faiss.omp_get_max_threads()
    threads = sorted({all_threads if t == "all" else int(t) for t in args.faiss_threads.split(",")})
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {machine()}, load average {load:.2f}; jax {jax.__version__} ({jax.default_backend()}, "
          f"{jax.device_count()} device(s)); faiss {faiss.__version__} (best of {threads} OpenMP threads)")
    print(f"dim {args.dim}, k {args.k}, ours in {args.dtype}\n")
    header = (f"{'N':>9} | {'ours p50 ms':>11} {'faiss p50 ms':>12} {'ratio':>6} | "
              f"{'ours q/s':>9} {'faiss q/s':>9} {'ratio':>6} | {'batch':>5} {'top-k agree':>11}")
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(args.seed)
    rows = []
    for n in sizes:
        emb = _unit(rng, n, args.dim)
        n_single = max(5, min(args.single, int(args.single_budget / n)))
        bsz = args.batch_1m if n >= 1_000_000 else args.batch
        single_q = _unit(rng, n_single, args.dim)
        batch_q = _unit(rng, bsz, args.dim)

        fs = FirstStage(emb, dtype=args.dtype)
        ours = lambda q: fs.search(q, args.k)                              # noqa: E731
        index = faiss.IndexFlatIP(args.dim)
        index.add(emb)
        theirs = lambda q: index.search(q, args.k)                        # noqa: E731
        for f in (ours, theirs):                                           # compile / warm up
            f(single_q[:1])
            f(batch_q)

        r_ours, _ = ours(batch_q)
        _, r_faiss = theirs(batch_q)
        agree = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(r_ours, r_faiss)]))

        lat_o, qps_o = _p50(ours, single_q), _qps(ours, batch_q, args.reps)
        # OpenMP spin-waiting can make faiss much slower with every core on a busy machine, so each
        # thread count is measured and faiss's best is kept.
        lat_f, qps_f = float("inf"), 0.0
        for t in threads:
            faiss.omp_set_num_threads(t)
            theirs(single_q[:1])
            lat_f = min(lat_f, _p50(theirs, single_q))
            qps_f = max(qps_f, _qps(theirs, batch_q, args.reps))
        faiss.omp_set_num_threads(all_threads)
        row = (n, lat_o * 1e3, lat_f * 1e3, lat_o / lat_f, qps_o, qps_f, qps_o / qps_f, bsz, agree)
        rows.append(row)
        print(f"{n:>9} | {row[1]:>11.3f} {row[2]:>12.3f} {row[3]:>6.2f} | "
              f"{row[4]:>9.0f} {row[5]:>9.0f} {row[6]:>6.2f} | {bsz:>5} {agree:>11.3f}", flush=True)
        del fs, index, emb
    print("\nratio: latency ours/faiss (>1 = we are slower); throughput ours/faiss (>1 = we are faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
