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
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jax.experimental import topologies

from ivcr_jax import cli, sharding
from ivcr_jax.data.pipeline import batch_layout
from ivcr_jax.experiment import USER_ERRORS, Experiment
from ivcr_jax.models import build
from ivcr_jax.models.params import count, trainable_filter
from ivcr_jax.train import optim, step as step_lib
from ivcr_jax.train.aux import make_aux_mode


def abstract_batch(exp: Experiment, batch_size: int, seq_len: int, mesh, *, aux: bool = False) -> dict:
    """The batch of one step at the config's caps (every video slot of every group), as sharded
    ``ShapeDtypeStruct``s of ``data/batch.py``'s layout (``aux``: with the differentiable targets)."""
    pc = exp.pipeline(batch_size)
    layout = batch_layout(pc, {g: int(c) for g, c in pc.sample.group_capacity().items()})

    def shard(shape):
        spec = sharding.logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh)
        return NamedSharding(mesh, spec)
    return layout.abstract(batch_size, seq_len, shard, aux=aux)


def _abstract_split(exp: Experiment):
    """``(graphdef, params, frozen, tx, schedule)`` of the model, abstract (no allocation)."""
    abstract = build.abstract_model(exp.model, exp.seed)
    graphdef, params, frozen = nnx.split(abstract, trainable_filter(exp.trainable), ...)
    tx, schedule = optim.make_optimizer(exp.train, params)
    return graphdef, params, frozen, tx, schedule


def abstract_inputs(exp: Experiment, mesh, *, batch_size: int | None = None, seq_len: int = 2048, split=None):
    """``(state, frozen, batch)`` of one train step as sharded ``ShapeDtypeStruct``s."""
    _, params, frozen, tx, _ = split or _abstract_split(exp)
    state = _with_shardings(jax.eval_shape(lambda p: step_lib.init_state(p, tx, exp.seed), params),
                            step_lib.state_shardings(params, tx, exp.seed, mesh))
    frozen = _with_shardings(frozen, sharding.state_shardings(frozen, mesh))
    b = batch_size or int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    aux = exp.train.aux_loss_mode == "differentiable"
    return state, frozen, abstract_batch(exp, b, seq_len, mesh, aux=aux)


def _with_shardings(tree, shardings):
    """Attach ``shardings`` (a prefix tree: one sharding per ``Variable``) to abstract leaves."""
    def attach(x, s):
        if isinstance(x, nnx.Variable):
            v = x.get_value()
            return x.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.tree.map(attach, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def plan(exp: Experiment, mesh, *, batch_size: int | None = None, seq_len: int = 2048) -> dict:
    """Compile the experiment's train step for ``mesh`` without allocating; per-device bytes and FLOPs."""
    split = _abstract_split(exp)
    graphdef, params, frozen_a, tx, schedule = split
    state, frozen, batch = abstract_inputs(exp, mesh, batch_size=batch_size, seq_len=seq_len, split=split)
    b = batch["input_ids"].shape[0]
    aux = make_aux_mode(exp.train.aux_loss_mode, exp.tokenizer, alpha=exp.train.alpha, beta=exp.train.beta)
    step = step_lib.make_train_step(graphdef, tx, schedule, aux)
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


def plan_cli(argv=None) -> dict:
    """The command line's work: parse, plan, print; returns :func:`plan`'s figures."""
    parser = argparse.ArgumentParser(prog="python -m ivcr_jax.train.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1 = the rest)")
    parser.add_argument("--devices", type=int, default=0, help="fake CPU devices (default: all local)")
    parser.add_argument("--topology", default="", help="abstract TPU topology, e.g. v5p:2x2x2 (needs libtpu)")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--seq", type=int, default=2048)
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
    out = plan(exp, mesh, batch_size=args.batch or None, seq_len=args.seq)
    gib = 1024 ** 3
    print(f"mesh {out['mesh']}  batch {out['batch_size']}  seq {out['seq_len']}  aux {exp.train.aux_loss_mode}")
    print(f"trainable {out['trainable_params']:,}  frozen {out['frozen_params']:,}")
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "peak_estimate_bytes"):
        if out.get(k) is not None:
            print(f"  {k:28s} {out[k] / gib:8.2f} GiB per device")
    return out


def main(argv=None) -> int:
    return cli.run(lambda: 0 if plan_cli(argv) else 1, known=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
