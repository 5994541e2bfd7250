"""Sharding rules and the golden PartitionSpec of every parameter of the paper model.

Regenerate after an intended change of rules or model layout with
``IVCR_UPDATE_GOLDEN=1 python -m pytest tests/test_sharding.py`` and review the diff.
"""
import json
import os
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ivcr_jax import sharding
from ivcr_jax.cli import load_config
from ivcr_jax.models import build

GOLDEN = Path(__file__).parent / "golden" / "paper_partition_specs.json"


def test_mesh_resolves_minus_one_and_rejects_bad_shapes():
    assert sharding.resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert sharding.resolve_mesh_shape({"data": -1}, 8) == (8, 1, 1)
    with pytest.raises(ValueError):
        sharding.resolve_mesh_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(ValueError):
        sharding.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_logical_rules_divisibility_and_single_use():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    assert sharding.logical_to_spec(("embed", "mlp"), (4096, 11008), mesh) == P("fsdp", "tensor")
    # 32005 rows cannot split over tensor=2: replicated, not an error
    assert sharding.logical_to_spec(("vocab", "embed"), (32005, 4096), mesh) == P(None, "fsdp")
    # a mesh axis is used at most once per array
    assert sharding.logical_to_spec(("embed", "embed"), (64, 64), mesh) == P("fsdp")
    assert sharding.logical_to_spec(("batch", "length"), (8, 16), mesh) == P("fsdp")
    with pytest.raises(KeyError):
        sharding.logical_to_spec(("nonsense",), (8,), mesh)


def test_every_parameter_has_logical_axes_and_golden_specs():
    cfg = load_config("configs/paper.py")
    model = build.abstract_model(build.model_config(cfg.model))
    state = nnx.state(model)
    missing = [k for k, v in nnx.to_flat_state(state) if sharding.variable_names(v) is None]
    assert not missing, f"parameters without logical axis names: {missing[:10]}"
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices()[:8])
    table = sharding.spec_table(state, mesh)
    if os.environ.get("IVCR_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    added = sorted(set(table) - set(golden))
    removed = sorted(set(golden) - set(table))
    changed = sorted(k for k in set(table) & set(golden) if table[k] != golden[k])
    assert not (added or removed or changed), (
        f"sharding differs from {GOLDEN.name}: added {added[:5]}, removed {removed[:5]}, "
        f"changed {[(k, golden[k], table[k]) for k in changed[:5]]}")
    # the big matrices are really sharded over both axes
    assert "P('fsdp', 'tensor')" in table["llama/layers/0/mlp/gate_proj/kernel"]
    assert "P('fsdp', 'tensor')" in table["vit/blocks/0/mlp/fc1/kernel"]


def test_optimizer_moments_shard_like_their_parameters():
    """Adam's mu/nu follow the parameters' shardings (not replicated); scalars are replicated."""
    from ivcr_jax.train import optim, step as step_lib
    from ivcr_jax.models.params import trainable_filter

    c = load_config("configs/paper.py:tiny")
    abstract = build.abstract_model(build.model_config(c.model), c.seed)
    _, params, _ = nnx.split(abstract, trainable_filter(c.trainable), ...)
    tx, _ = optim.make_optimizer(c.train, params)
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    sh = step_lib.state_shardings(params, tx, c.seed, mesh)
    param_specs = [s.spec for s in jax.tree.leaves(sh["params"])]
    assert sum(s != P() for s in param_specs) > len(param_specs) // 2
    adam = [s for s in jax.tree.leaves(sh["opt"], is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")]
    assert len(adam) == 1
    for moment in (adam[0].mu, adam[0].nu):
        assert jax.tree.structure(moment) == jax.tree.structure(sh["params"])
        assert [s.spec for s in jax.tree.leaves(moment)] == param_specs
    assert sh["step"].spec == P() and sh["rng"].spec == P()
