"""The Grain input pipeline at the paper's shapes: samples/s, frames/s, CPU-s per sample, where the time goes.

    python benchmarks/input_pipeline.py                 # --quick: a few minutes on 2 cores
    python benchmarks/input_pipeline.py --full          # more samples per setting

On the corpus of ``ivcr_jax/data/bench_corpus.py`` (built on demand under ``--corpus``; clips in the
reference's compressed form: 1–3 min, 3 fps, 398x224, libx264 defaults), at 224 px, 12 frames per
retrieval candidate and 96 per moment video, the sample mix of its dialogues (every prefix,
``samples.enumerate_samples``). Measured here, in one run:

1. Per video (the same files): open (``VideoReader``), decode at 224 through decord (``get_batch``:
   forward within a key-frame interval, a seek to each later one), the same frames at native size
   (the resize's share), a full sequential pass (``next()``: decode is the floor), the CLIP
   normalisation on the host (what the device does now) and the frame-record packing.
2. Per sample, before / after, alternating: ``load_frames`` per (video, frame count) (before) and
   ``RawVideos.load_many`` (after: a file opened once per sample, one decode pass for its 12- and
   96-frame requests).
3. The training pipeline (``data.pipeline.make_pipeline``, train=True, the loop's Grain chain) at
   batch ``--batch``: raw videos with 0 / 1 / 2 workers and 2 read threads, the prepared dataset
   (``data/prepare.py``) and a ViT feature cache (tiny ViT, ``features.write_features``).
   CPU-s per sample = (this process's + workers' CPU time) / samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from ivcr_jax.data import frames as frames_lib  # noqa: E402
from ivcr_jax.data.bench_corpus import build_bench_corpus  # noqa: E402
from ivcr_jax.data.pipeline import PipelineConfig, RawVideos, make_pipeline  # noqa: E402
from ivcr_jax.data.samples import SampleConfig, enumerate_samples, prefix_videos  # noqa: E402
from ivcr_jax.data.schema import load_dialogues  # noqa: E402


def uptime() -> str:
    try:
        return "load average " + ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average ?"


def cpu_s() -> float:
    """CPU seconds of this process, its finished children and (with psutil) its live ones: the
    Grain workers' decoding counts too."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
    try:
        import psutil
    except ImportError:
        return total
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # exited in between: then it is in RUSAGE_CHILDREN once reaped
            pass
    return total


def best(f, n):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def per_video(paths, rounds):
    import decord

    rows = []
    for p in paths:
        vr = decord.VideoReader(str(p), num_threads=1)
        V, (h, w) = len(vr), vr[0].shape[:2]
        del vr
        r = {"video": p.name, "frames": V, "size": f"{w}x{h}"}
        r["open"] = best(lambda: decord.VideoReader(str(p), width=224, height=224, num_threads=1), rounds)
        for n in (12, 96):
            idx = frames_lib.sample_indices(V, n, "uniform").tolist()

            def dec(size=224, threads=1):
                kw = dict(width=size, height=size) if size else {}
                return decord.VideoReader(str(p), num_threads=threads, **kw).get_batch(idx).asnumpy()

            r[f"decode{n}"] = best(dec, rounds) - r["open"]
            r[f"native{n}"] = best(lambda: dec(None), rounds) - r["open"]
            r[f"threads2_{n}"] = best(lambda: dec(224, 2), rounds) - r["open"]
        px = dec()

        def seq():
            vr = decord.VideoReader(str(p), width=224, height=224, num_threads=1)
            for _ in range(len(vr)):
                vr.next()
        r["sequential_all"] = best(seq, 1) - r["open"]
        r["normalise96"] = best(lambda: frames_lib.normalize(px), rounds)
        r["pack96"] = best(lambda: np.ascontiguousarray(px[::-1]), rounds)  # one copy into the record
        rows.append(r)
    return rows


def per_sample(refs, scfg, rounds):
    """Before (load per (video, frame count)) / after (load_many), alternating, same samples."""
    after_src = RawVideos(224)
    t_before = t_after = 0.0
    n_dec_before = n_dec_after = 0
    for _ in range(rounds):
        for ref in refs:
            reqs = prefix_videos(ref.dialogue, ref.turn_idx, scfg)
            keys = list(dict.fromkeys((r.path, r.num_frames) for r in reqs))
            t0 = time.perf_counter()
            rng = np.random.default_rng(ref.sample_id)
            a = {k: frames_lib.load_frames(k[0], k[1], mode="random", rng=rng, size=224) for k in keys}
            t1 = time.perf_counter()
            b = after_src.load_many(reqs, "random", np.random.default_rng(ref.sample_id))
            t2 = time.perf_counter()
            t_before, t_after = t_before + t1 - t0, t_after + t2 - t1
            n_dec_before += len(keys)
            n_dec_after += len({p for p, _ in keys})
            assert a.keys() == b.keys() and all(np.array_equal(a[k].pixels, b[k].pixels) for k in a)
    n = rounds * len(refs)
    return {"before_s": t_before / n, "after_s": t_after / n, "ratio": t_before / t_after,
            "files_before": n_dec_before / n, "files_after": n_dec_after / n}


def pipeline_rate(cfg, refs, tok, batches, label):
    p = make_pipeline(cfg, refs, train=True, seed=0, tokenizer=tok, process_index=0, process_count=1)
    it = iter(p)
    t0, c0 = time.perf_counter(), cpu_s()
    first = next(it)
    t_first = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), cpu_s()
    frames = 0
    for _ in range(batches):
        b = next(it)
        frames += int(sum(np.sum(g["frame_mask"]) for g in b["videos"].values()))  # real frames
    dt, dc = time.perf_counter() - t1, cpu_s() - c1
    n = batches * cfg.batch_size
    del it, first
    return {"setting": label, "first_batch_s": t_first, "samples_per_s": n / dt, "batches_per_s": batches / dt,
            "frames_per_s": frames / dt, "cpu_s_per_sample": dc / n, "samples": n}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="/tmp/ivcr_bench_corpus")
    ap.add_argument("--full", action="store_true", help="more samples per setting (default: --quick)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--gpu-batch", type=int, default=32, help="global batch of the step being fed")
    ap.add_argument("--gpu-step-online", type=float, default=5.3,
                    help="s per step with the online ViT (performance-model.md §0: batch 32 on one "
                         "H100/H200 at 40 %% MFU; 2.1 s at the compute floor)")
    ap.add_argument("--gpu-step-features", type=float, default=1.2,
                    help="s per step from cached ViT features (performance-model.md §0)")
    a = ap.parse_args(argv)
    quick = not a.full
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
    root = Path(a.corpus)
    print(f"input pipeline benchmark, {os.cpu_count()} CPUs, {uptime()}", flush=True)
    if not (root / "ivcr.json").is_file():
        t = time.perf_counter()
        build_bench_corpus(root, log=lambda *_: None)
        print(f"built the corpus in {root} in {time.perf_counter() - t:.0f} s", flush=True)
    out = {"cpus": os.cpu_count(), "load_before": uptime()}

    # --- 1. per video ---
    vids = sorted((root / "videos" / "compressed").glob("*.mp4"))
    srcs = sorted((root / "videos" / "source").glob("*.mp4"))
    picks = [vids[0], max(vids, key=lambda p: p.stat().st_size)] + srcs
    out["per_video"] = rows = per_video(picks, 2 if quick else 3)
    print("\nper video (s): open | decode 12 @224 | 96 @224 | 96 native | 96 @224 2 threads | whole clip "
          "sequential | normalise 96 | pack 96")
    for r in rows:
        print(f"  {r['video']:24s} {r['size']:>9s} {r['frames']:4d} f  {r['open']:.3f} | {r['decode12']:.3f} | "
              f"{r['decode96']:.3f} | {r['native96']:.3f} | {r['threads2_96']:.3f} | {r['sequential_all']:.3f} | "
              f"{r['normalise96']:.3f} | {r['pack96']:.3f}", flush=True)

    # --- samples ---
    from ivcr_jax.tokenizer import bundled_test_tokenizer, load_tokenizer

    tok = load_tokenizer(bundled_test_tokenizer())
    scfg = SampleConfig.paper(video_root=str(root / "videos"))
    dialogues, _ = load_dialogues(root / "ivcr.json")
    refs = enumerate_samples(dialogues, scfg)
    mix = {}
    for ref in refs:
        reqs = prefix_videos(ref.dialogue, ref.turn_idx, scfg)
        k = " + ".join(f"{n}x f{f}" for f, n in sorted(
            {f: sum(r.num_frames == f for r in reqs) for f in {r.num_frames for r in reqs}}.items()))
        mix[k] = mix.get(k, 0) + 1
    frames_per_sample = float(np.mean([sum(r.num_frames for r in prefix_videos(x.dialogue, x.turn_idx, scfg))
                                       for x in refs]))
    out["mix"] = mix
    out["frames_per_sample"] = frames_per_sample
    print(f"\n{len(refs)} samples, mix {mix}, {frames_per_sample:.1f} frames per sample", flush=True)

    # --- 2. before / after per sample ---
    sub = refs[:: max(1, len(refs) // (8 if quick else 24))]
    ps = per_sample(sub, scfg, 1 if quick else 2)
    out["per_sample"] = ps
    print(f"per sample (one process, {len(sub)} samples): before {ps['before_s']:.2f} s "
          f"({ps['files_before']:.1f} decodes), after {ps['after_s']:.2f} s ({ps['files_after']:.1f} files): "
          f"{ps['ratio']:.2f}x", flush=True)

    # --- 3. the pipeline ---
    base = PipelineConfig(sample=scfg, batch_size=a.batch, buckets=(1024, 2048, 4096), frame_size=224,
                          frame_pool=(96, 120, 136, 144, 152, 160, 168, 176, 184, 192, 200, 216, 240, 288, 336, 432))
    nb = 2 if quick else 6
    settings = [("raw, 0 workers", dict()), ("raw, 0 workers, 2 read threads", dict(read_threads=2)),
                ("raw, 1 worker", dict(num_workers=1)), ("raw, 2 workers", dict(num_workers=2))]
    res = []
    for label, kw in settings:
        res.append(pipeline_rate(dataclasses.replace(base, **kw), refs, tok, nb, label))
        print("  " + json.dumps(res[-1]), flush=True)

    import tempfile

    from ivcr_jax.data.prepare import prepare

    tmp = Path(tempfile.mkdtemp(prefix="ivcr_bench_"))
    t = time.perf_counter()
    prepared = prepare(root, tmp / "prepared", retrieval_frames=12, moment_frames=96, size=224)
    out["prepare_s"] = time.perf_counter() - t
    for label, kw in [("prepared, 0 workers", dict(prepared=str(prepared))),
                      ("prepared, 2 workers", dict(prepared=str(prepared), num_workers=2))]:
        res.append(pipeline_rate(dataclasses.replace(base, **kw), refs, tok, nb * 4, label))
        print("  " + json.dumps(res[-1]), flush=True)
    try:
        feats = write_tiny_features(root, tmp / "features")
        res.append(pipeline_rate(dataclasses.replace(base, vit_features=str(feats)), refs, tok, nb * 4,
                                 "ViT features (tiny ViT), 0 workers"))
        print("  " + json.dumps(res[-1]), flush=True)
    except Exception as e:  # noqa: BLE001  (report and go on: the other figures stand)
        print(f"  ViT features: not measured ({type(e).__name__}: {e})")
    out["pipeline"] = res
    out["cores_per_gpu"] = feed = cores_per_gpu(res, a)
    print(f"\nwhat it takes to feed one GPU (batch {a.gpu_batch}; step {a.gpu_step_online} s online, "
          f"{a.gpu_step_features} s from features), from the 0-worker CPU-s per sample:")
    for r in feed:
        print(f"  {r['source']:32s} {r['cpu_s_per_sample']:.3f} CPU-s/sample x {r['samples_per_s_needed']:.1f} "
              f"samples/s = {r['cores_per_gpu']:.1f} cores per GPU, {8 * r['cores_per_gpu']:.0f} per 8-GPU node")
    out["load_after"] = uptime()
    print(f"\n{uptime()}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


def cores_per_gpu(res, a):
    """Host cores one GPU needs: CPU-s per sample (the 0-worker settings, where all the work is in
    this process) x the samples/s the step consumes."""
    need = {"raw": a.gpu_batch / a.gpu_step_online, "prepared": a.gpu_batch / a.gpu_step_online,
            "ViT features": a.gpu_batch / a.gpu_step_features}
    out = []
    for r in res:
        if "0 workers" not in r["setting"] or "threads" in r["setting"]:
            continue
        src = next(k for k in need if r["setting"].startswith(k))
        out.append({"source": r["setting"].replace(", 0 workers", ""), "cpu_s_per_sample": r["cpu_s_per_sample"],
                    "samples_per_s_needed": need[src], "cores_per_gpu": r["cpu_s_per_sample"] * need[src]})
    return out


def write_tiny_features(root, out):
    """A ViT feature cache at a tiny random ViT (224 px, patch 14, width 64): the reading cost only."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ivcr_jax.data.features import write_features
    from ivcr_jax.models.eva_vit import EvaViT, EvaViTConfig

    cfg = EvaViTConfig(image_size=224, patch_size=14, width=64, depth=1, heads=2, mlp_dim=128)
    vit = EvaViT(cfg, rngs=nnx.Rngs(0))
    g, st = nnx.split(vit)

    @jax.jit
    def enc(st, x):
        m = nnx.merge(g, st)
        x = (x.astype(jnp.float32) / 255.0 - jnp.asarray(frames_lib.CLIP_MEAN)) / jnp.asarray(frames_lib.CLIP_STD)
        return m(x, apply_post_norm=True)

    def encode(px):
        return np.asarray(enc(st, px))

    return write_features(root, out, encode=encode, tokens=1 + (224 // 14) ** 2, width=64,
                          retrieval_frames=12, moment_frames=96, size=224, dtype="bfloat16",
                          signature={"digest": "benchtinyvit0000", "bench": "tiny random ViT"})


if __name__ == "__main__":
    main()
