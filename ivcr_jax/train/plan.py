"""Memory planning: compile the train step ahead of time on abstract shapes for a mesh.

    python -m ivcr_jax.train.plan --config configs/paper.py --mesh 1,8,1 [--seq 2048]
    python -m ivcr_jax.train.plan --config configs/paper.py --topology v5p:2x2x2 --mesh 1,-1,1

Nothing is allocated: the model, optimizer state and batch are ``ShapeDtypeStruct``s carrying
their shardings; ``jax.jit(step).lower(...).compile().memory_analysis()`` gives the per-device
bytes. With ``--topology`` (needs the ``libtpu`` package, e.g. ``pip install 'jax[tpu]'``) the
step is compiled for an abstract TPU slice from a CPU-only host — check a pod configuration
before paying for it (MaxText's ``train_compile.py`` idea).
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from ivcr_jax import sharding
from ivcr_jax.models import build
from ivcr_jax.train import optim, step as step_lib
from ivcr_jax.models.params import count, trainable_filter


def abstract_batch(config, batch_size: int, seq_len: int, mesh) -> dict:
    """The batch of one step: a retrieval sample shape (10 candidates × 12 frames + 1 moment video)."""
    d = config.data
    bs = NamedSharding(mesh, sharding.logical_to_spec(("batch",), (batch_size,), mesh))

    def arr(shape, dtype):
        spec = sharding.logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    size, L = d.frame_size, d.timestamp_len

    def group(v, t):
        return {"frames": arr((batch_size, v, t, size, size, 3), jnp.uint8),
                "timestamp_ids": arr((batch_size, v, t, L), jnp.int32),
                "timestamp_mask": arr((batch_size, v, t, L), jnp.int32),
                "frame_mask": arr((batch_size, v, t), jnp.bool_),
                "video_mask": arr((batch_size, v), jnp.bool_)}

    del bs
    return {
        "input_ids": arr((batch_size, seq_len), jnp.int32),
        "attention_mask": arr((batch_size, seq_len), jnp.int32),
        "labels": arr((batch_size, seq_len), jnp.int32),
        "video_token_index": arr((batch_size, seq_len), jnp.int32),
        "videos": {f"f{d.retrieval_frames}": group(d.max_retrieval_videos, d.retrieval_frames),
                   f"f{d.moment_frames}": group(d.max_moment_videos, d.moment_frames)},
        "kind": arr((batch_size,), jnp.int32), "target_index": arr((batch_size,), jnp.int32),
        "gt_span": arr((batch_size, 2), jnp.float32), "duration": arr((batch_size,), jnp.float32),
        "weight": arr((batch_size,), jnp.float32), "sample_id": arr((batch_size,), jnp.int32),
    }


def _abstract_split(config):
    """``(graphdef, params, frozen, tx, schedule)`` of the model, abstract (no allocation)."""
    abstract = build.abstract_model(build.model_config(config.model), config.seed)
    graphdef, params, frozen = nnx.split(abstract, trainable_filter(config.trainable), ...)
    tx, schedule = optim.make_optimizer(config.train, params)
    return graphdef, params, frozen, tx, schedule


def abstract_inputs(config, mesh, *, batch_size: int | None = None, seq_len: int = 2048, split=None):
    """``(state, frozen, batch)`` of one train step as sharded ``ShapeDtypeStruct``s."""
    _, params, frozen, tx, _ = split or _abstract_split(config)
    state = _with_shardings(jax.eval_shape(lambda p: step_lib.init_state(p, tx, config.seed), params),
                            step_lib.state_shardings(params, tx, config.seed, mesh))
    frozen = _with_shardings(frozen, sharding.state_shardings(frozen, mesh))
    b = batch_size or int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    return state, frozen, abstract_batch(config, b, seq_len, mesh)


def _with_shardings(tree, shardings):
    """Attach ``shardings`` (a prefix tree: one sharding per ``Variable``) to abstract leaves."""
    def attach(x, s):
        if isinstance(x, nnx.Variable):
            v = x.get_value()
            return x.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.tree.map(attach, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def plan(config, mesh, *, batch_size: int | None = None, seq_len: int = 2048) -> dict:
    """Compile the paper step for ``mesh`` without allocating; per-device bytes and FLOPs."""
    split = _abstract_split(config)
    graphdef, params, frozen_a, tx, schedule = split
    state, frozen, batch = abstract_inputs(config, mesh, batch_size=batch_size, seq_len=seq_len, split=split)
    b = batch["input_ids"].shape[0]
    step = step_lib.make_train_step(graphdef, tx, schedule, aux_mode="off")
    with sharding.use_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch).compile()
    mem = compiled.memory_analysis()
    out = {"trainable_params": count(params), "frozen_params": count(frozen_a),
           "mesh": dict(mesh.shape), "batch_size": b, "seq_len": seq_len}
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1 = the rest)")
    ap.add_argument("--devices", type=int, default=0, help="fake CPU devices (default: all local)")
    ap.add_argument("--topology", default="", help="abstract TPU topology, e.g. v5p:2x2x2 (needs libtpu)")
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args(argv)
    from ivcr_jax.configs_loader import load_config
    config = load_config(args.config)
    sizes = dict(zip(sharding.MESH_AXES, (int(x) for x in args.mesh.split(","))))
    if args.topology:
        from jax.experimental import topologies
        devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    else:
        devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    mesh = sharding.make_mesh(sizes, devices)
    out = plan(config, mesh, batch_size=args.batch or None, seq_len=args.seq)
    gib = 1024 ** 3
    print(f"mesh {out['mesh']}  batch {out['batch_size']}  seq {out['seq_len']}")
    print(f"trainable {out['trainable_params']:,}  frozen {out['frozen_params']:,}")
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "peak_estimate_bytes"):
        if out.get(k) is not None:
            print(f"  {k:28s} {out[k] / gib:8.2f} GiB per device")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
