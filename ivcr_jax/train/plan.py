"""Memory planning: compile the train step ahead of time on abstract shapes for a mesh.

    python -m ivcr_jax.train.plan --config configs/paper.py --mesh 1,8,1 [--seq 2048]
    python -m ivcr_jax.train.plan --config configs/paper.py --topology v5p:2x2x2 --mesh 1,-1,1
    python -m ivcr_jax.train.plan --config configs/paper.py --mesh 1,1,1 --devices 1 --batch 32 \
        --frames runs/demo_corpus/ivcr.json --vision

``--frames ANNOTATIONS``: the real frames per sample of the config's samples of that corpus, and
how full the ViT's frame pool is for random batches of them at this batch and mesh (the training
batcher's packing, ``data/batch.py``). ``--vision``: compile the video encode alone (the ViT, and
the ViT + image Q-Former, forward over the frame pool) and report its FLOPs per sample, unpacked
(every slot) and packed (``--pool``, else the pool size ``--frames`` met most often; the mix's
figure is its FLOPs per frame times the mix's pool frames per sample) — the 7B step itself is slow
to compile on a CPU host (``--pool`` alone sizes its frame pool).

Nothing is allocated: the model, optimizer state and batch are ``ShapeDtypeStruct``s carrying
their shardings; ``jax.jit(step).lower(...).compile().memory_analysis()`` gives the per-device
bytes. With ``--topology`` (needs the ``libtpu`` package, e.g. ``pip install 'jax[tpu]'``) the
step is compiled for an abstract TPU slice from a CPU-only host — check a pod configuration
before paying for it (MaxText's ``train_compile.py`` idea).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jax.experimental import topologies

from ivcr_jax import cli, sharding
from ivcr_jax.data.pipeline import batch_layout
from ivcr_jax.data.samples import SampleError, build_sample, enumerate_samples, prefix_videos
from ivcr_jax.experiment import USER_ERRORS, Experiment
from ivcr_jax.models import build
from ivcr_jax.models.params import count, trainable_filter
from ivcr_jax.train import optim, step as step_lib
from ivcr_jax.train.aux import make_aux_mode


def abstract_batch(exp: Experiment, batch_size: int, seq_len: int, mesh, *, aux: bool = False,
                   frames_per_row: int | None = None) -> dict:
    """The batch of one step at the config's caps (every video slot of every group), as sharded
    ``ShapeDtypeStruct``s of ``data/batch.py``'s layout (``aux``: with the differentiable targets).
    Its frame pool: one per data-parallel shard of ``mesh``, ``frames_per_row`` frames per row
    (default: the largest pool, every slot)."""
    pc = dataclasses.replace(exp.pipeline(batch_size), pack_groups=_batch_shards(mesh))
    layout = batch_layout(pc, {g: int(c) for g, c in pc.sample.group_capacity().items()})

    def shard(shape):
        spec = sharding.logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh)
        return NamedSharding(mesh, spec)
    return layout.abstract(batch_size, seq_len, shard, aux=aux, frames_per_row=frames_per_row)


def _batch_shards(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))


def _abstract_split(exp: Experiment):
    """``(graphdef, params, frozen, tx, schedule)`` of the model, abstract (no allocation)."""
    abstract = build.abstract_model(exp.model, exp.seed)
    graphdef, params, frozen = nnx.split(abstract, trainable_filter(exp.trainable), ...)
    tx, schedule = optim.make_optimizer(exp.train, params)
    return graphdef, params, frozen, tx, schedule


def abstract_inputs(exp: Experiment, mesh, *, batch_size: int | None = None, seq_len: int = 2048, split=None,
                    frames_per_row: int | None = None):
    """``(state, frozen, batch)`` of one train step as sharded ``ShapeDtypeStruct``s (the frame
    pool: ``frames_per_row``, see :func:`abstract_batch`)."""
    _, params, frozen, tx, _ = split or _abstract_split(exp)
    state = _with_shardings(jax.eval_shape(lambda p: step_lib.init_state(p, tx, exp.seed), params),
                            step_lib.state_shardings(params, tx, exp.seed, mesh))
    frozen = _with_shardings(frozen, sharding.state_shardings(frozen, mesh))
    b = batch_size or _batch_shards(mesh)
    aux = exp.train.aux_loss_mode == "differentiable"
    return state, frozen, abstract_batch(exp, b, seq_len, mesh, aux=aux, frames_per_row=frames_per_row)


def _with_shardings(tree, shardings):
    """Attach ``shardings`` (a prefix tree: one sharding per ``Variable``) to abstract leaves."""
    def attach(x, s):
        if isinstance(x, nnx.Variable):
            v = x.get_value()
            return x.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.tree.map(attach, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def plan(exp: Experiment, mesh, *, batch_size: int | None = None, seq_len: int = 2048,
         frames_per_row: int | None = None) -> dict:
    """Compile the experiment's train step for ``mesh`` without allocating; per-device bytes and FLOPs.
    ``frames_per_row``: the frame pool's size (default the largest, every slot: the memory bound)."""
    split = _abstract_split(exp)
    graphdef, params, frozen_a, tx, schedule = split
    state, frozen, batch = abstract_inputs(exp, mesh, batch_size=batch_size, seq_len=seq_len, split=split,
                                           frames_per_row=frames_per_row)
    b = batch["input_ids"].shape[0]
    tc = exp.train   # the step exactly as train/loop.py builds it (the blockwise loss included)
    aux = make_aux_mode(tc.aux_loss_mode, exp.tokenizer, alpha=tc.alpha, beta=tc.beta, start_step=tc.aux_start_step,
                        faithful_select=tc.faithful_select, lm_chunk=tc.lm_loss_chunk)
    step = step_lib.make_train_step(graphdef, tx, schedule, aux, lm_reduction=tc.lm_loss_reduction)
    with sharding.use_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch).compile()
    mem = compiled.memory_analysis()
    out = {"trainable_params": count(params), "frozen_params": count(frozen_a),
           "mesh": dict(mesh.shape), "batch_size": b, "seq_len": seq_len,
           "pool_frames": int(batch["pool"]["frames"].shape[0] * batch["pool"]["frames"].shape[1])}
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes"):
        out[k] = int(getattr(mem, k, 0) or 0) if mem is not None else None
    if mem is not None:
        out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                      - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out["flops_per_device"] = float(cost.get("flops", float("nan")))
    except Exception:
        pass
    return out


def frame_mix(exp: Experiment, annotations: str, batch_size: int, shards: int, *, split: str = "train",
              batches: int = 2000, seed: int = 0) -> dict:
    """The real frames per sample of ``split``'s samples (as the pipeline builds them: history that
    does not fit dropped; placeholder frame times) and, over ``batches`` random batches of them
    packed as the training batcher packs them (``shards`` pools, rows reordered), the share of the
    ViT's frame pool that is real frames; ``pool_rows``: how often each pool size (frames per row) is met."""
    dialogues, _ = exp.dialogues(split, annotations=annotations)
    pc = dataclasses.replace(exp.pipeline(batch_size), pack_groups=max(1, int(shards)))
    layout = batch_layout(pc, {g: int(c) for g, c in pc.sample.group_capacity().items()})
    kinds: dict = {}
    frames = []
    for ref in enumerate_samples(dialogues, pc.sample):
        reqs = prefix_videos(ref.dialogue, ref.turn_idx, pc.sample)
        ts = {r.turn: [0.5 * i for i in range(r.num_frames)] for r in reqs if r.role == "moment"}
        try:
            s = build_sample(ref.dialogue, ref.turn_idx, exp.tokenizer, pc.sample, timestamps=ts)
        except SampleError:
            continue
        n = sum(v.num_frames for v in s.videos)
        shown = ", ".join(f"{c} x {g}" for g, c in sorted(s.group_counts().items())) or "no video"
        key = (s.kind, shown, n)
        kinds[key] = kinds.get(key, 0) + 1
        frames.append(n)
    frames = np.asarray(frames, np.int64)
    B, K = int(batch_size), layout.slots_per_row
    P = layout.num_pools(B)
    rng = np.random.default_rng(seed)
    real = pooled = 0
    sizes: dict = {}
    for _ in range(batches):
        counts = rng.choice(frames, B)
        order = layout.balanced_order(counts, B)
        counts = counts if order is None else counts[order]
        F = layout.pool_rows(int(counts.reshape(P, B // P).sum(1).max()), B // P)
        real, pooled = real + int(counts.sum()), pooled + P * F
        sizes[F * P // B] = sizes.get(F * P // B, 0) + 1
    return {"samples": len(frames), "kinds": {k: v for k, v in sorted(kinds.items(), key=lambda x: x[0][2])},
            "slots_per_row": K, "mean_real": float(frames.mean()), "fraction_unpacked": float(frames.mean() / K),
            "fraction_packed": real / pooled, "pool_rows": dict(sorted(sizes.items())),
            "mean_pool_per_sample": pooled / (batches * B), "batch_size": B, "pools": P}


def vision_cost(exp: Experiment, mesh, *, batch_size: int, frames_per_row: int | None = None) -> dict:
    """FLOPs of the video encode alone over a frame pool of ``frames_per_row`` frames per row (default
    every slot): ``vit`` (the frozen ViT with ln_vision) and ``vit_qformer`` (then the image Q-Former,
    forward), from ``compile().cost_analysis()`` on abstract, sharded inputs; per device and per sample."""
    abstract = build.abstract_model(exp.model, exp.seed)
    graphdef, state = nnx.split(abstract)
    state = _with_shardings(state, sharding.state_shardings(state, mesh))
    pool = abstract_batch(exp, batch_size, 256, mesh, frames_per_row=frames_per_row)["pool"]
    fns = {"vit": lambda st, p: nnx.merge(graphdef, st).image_features(
               p["frames"].reshape((-1,) + p["frames"].shape[2:])),
           "vit_qformer": lambda st, p: nnx.merge(graphdef, st).encode_pool(p)}
    frames = int(pool["frames"].shape[0] * pool["frames"].shape[1])
    out = {"pool_frames": frames, "batch_size": int(batch_size)}
    devices = int(np.prod(list(mesh.shape.values())))
    with sharding.use_mesh(mesh):
        for name, fn in fns.items():
            cost = jax.jit(fn).lower(state, pool).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            flops = float(cost.get("flops", float("nan")))
            out[f"{name}_flops_per_device"] = flops
            out[f"{name}_flops_per_sample"] = flops * devices / batch_size
            out[f"{name}_flops_per_frame"] = flops * devices / frames
    return out


def _print_frames(mix: dict) -> None:
    n, K = mix["samples"], mix["slots_per_row"]
    print(f"{n} samples; real frames per sample (of {K} slots):")
    print(f"  {'supervised turn':16s} {'videos shown':24s} {'share':>7s} {'frames':>7s}")
    for (kind, shown, f), c in mix["kinds"].items():
        print(f"  {kind:16s} {shown:24s} {100 * c / n:6.1f}% {f:7d}")
    print(f"  mean {mix['mean_real']:.1f} real frames: {100 * mix['fraction_unpacked']:.1f} % of the {K} slots")
    print(f"packed, batch {mix['batch_size']} in {mix['pools']} pool(s): {100 * mix['fraction_packed']:.1f} % of the "
          f"pool is real frames ({mix['mean_pool_per_sample']:.1f} pool frames per sample); pool sizes (frames per "
          f"row: share of batches) " + ", ".join(f"{k}: {100 * v / sum(mix['pool_rows'].values()):.0f}%"
                                                for k, v in mix["pool_rows"].items()))


def plan_cli(argv=None) -> dict:
    """The command line's work: parse, plan, print; returns :func:`plan`'s figures."""
    parser = argparse.ArgumentParser(prog="python -m ivcr_jax.train.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1 = the rest)")
    parser.add_argument("--devices", type=int, default=0, help="fake CPU devices (default: all local)")
    parser.add_argument("--topology", default="", help="abstract TPU topology, e.g. v5p:2x2x2 (needs libtpu)")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--pool", type=int, default=0,
                        help="frames per batch row in the ViT's frame pool (default: every slot, the largest)")
    parser.add_argument("--frames", default="", help="annotations: real frames per sample and the pool's fill")
    parser.add_argument("--vision", action="store_true",
                        help="compile the video encode alone (ViT, ViT + image Q-Former): FLOPs per sample")
    config, args = cli.parse(argv, parser)
    exp = Experiment.resolve(config)
    try:
        sizes = dict(zip(sharding.MESH_AXES, (int(x) for x in args.mesh.split(","))))
    except ValueError:
        raise cli.UsageError(f"--mesh {args.mesh}: give data,fsdp,tensor sizes, e.g. 1,-1,1") from None
    if args.topology:
        devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    else:
        devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    try:
        sharding.resolve_mesh_shape(sizes, len(devices))
    except ValueError as e:
        raise cli.UsageError(f"--mesh {args.mesh}: {e}") from None
    mesh = sharding.make_mesh(sizes, devices)
    if args.frames or args.vision:
        return _frames_cli(exp, mesh, args)
    out = plan(exp, mesh, batch_size=args.batch or None, seq_len=args.seq, frames_per_row=args.pool or None)
    gib = 1024 ** 3
    print(f"mesh {out['mesh']}  batch {out['batch_size']}  seq {out['seq_len']}  aux {exp.train.aux_loss_mode}  "
          f"frame pool {out['pool_frames']} frames")
    print(f"trainable {out['trainable_params']:,}  frozen {out['frozen_params']:,}")
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "peak_estimate_bytes"):
        if out.get(k) is not None:
            print(f"  {k:28s} {out[k] / gib:8.2f} GiB per device")
    if out.get("flops_per_device") is not None:
        print(f"  {'flops_per_device':28s} {out['flops_per_device'] / 1e12:8.2f} TFLOP (XLA cost analysis)")
    return out


def _frames_cli(exp: Experiment, mesh, args) -> dict:
    b = args.batch or _batch_shards(mesh)
    out: dict = {"mesh": dict(mesh.shape), "batch_size": b}
    if args.frames:
        out["mix"] = mix = frame_mix(exp, args.frames, b, _batch_shards(mesh))
        _print_frames(mix)
    if args.vision:
        # every slot, and one packed pool: --pool, else the size the mix met most often (the cost is
        # linear in the pool's frames: the two compiles' FLOPs per frame agree)
        common = max(out["mix"]["pool_rows"].items(), key=lambda kv: kv[1])[0] if args.frames else None
        sizes = [None] + [f for f in (args.pool or common,) if f]
        out["vision"] = {}
        for fpr in sizes:
            v = out["vision"][fpr or "every slot"] = vision_cost(exp, mesh, batch_size=b, frames_per_row=fpr)
            print(f"vision, pool of {v['pool_frames']} frames ({'every slot' if fpr is None else f'{fpr} per row'}): "
                  f"ViT {v['vit_flops_per_sample'] / 1e12:.2f} TFLOP per sample "
                  f"({v['vit_flops_per_frame'] / 1e9:.1f} GFLOP per frame), ViT + image Q-Former "
                  f"{v['vit_qformer_flops_per_sample'] / 1e12:.2f} TFLOP per sample "
                  f"({v['vit_qformer_flops_per_frame'] / 1e9:.1f} GFLOP per frame)")
        if args.frames:
            mix, last = out["mix"], out["vision"][sizes[-1]]
            before = {k: out["vision"]["every slot"][f"{k}_flops_per_sample"] for k in ("vit", "vit_qformer")}
            after = {k: last[f"{k}_flops_per_frame"] * mix["mean_pool_per_sample"] for k in before}
            out["vision"]["per_sample"] = {"unpacked": before, "packed": after}
            print(f"per sample over the mix ({mix['mean_pool_per_sample']:.1f} pool frames per sample packed): ViT "
                  f"{before['vit'] / 1e12:.2f} -> {after['vit'] / 1e12:.2f} TFLOP ({before['vit'] / after['vit']:.2f}x "
                  f"less); ViT + image Q-Former {before['vit_qformer'] / 1e12:.2f} -> "
                  f"{after['vit_qformer'] / 1e12:.2f} TFLOP")
    return out


def main(argv=None) -> int:
    return cli.run(lambda: 0 if plan_cli(argv) else 1, known=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
