"""The memory planner compiles the train step on abstract, sharded shapes and reports per-device bytes."""
import importlib.util

import jax
import numpy as np
import pytest

from ivcr_jax import sharding
from ivcr_jax.cli import load_config
from ivcr_jax.experiment import Experiment
from ivcr_jax.train import plan


def _sharded_bytes(tree) -> int:
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    return total


def test_plan_arguments_are_the_sharded_state_frozen_weights_and_batch():
    config = Experiment.resolve(load_config("configs/paper.py:tiny"))
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    out = plan.plan(config, mesh, seq_len=256)
    assert out["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2} and out["batch_size"] == 4
    st, frozen, batch = plan.abstract_inputs(config, mesh, batch_size=4, seq_len=256)
    expected = _sharded_bytes(st) + _sharded_bytes(frozen) + _sharded_bytes(batch)
    assert out["argument_size_in_bytes"] == pytest.approx(expected, rel=0.02)
    # Adam's two fp32 moments shard with the parameters: far less than a replicated copy.
    replicated_opt = 2 * 4 * out["trainable_params"]
    assert out["argument_size_in_bytes"] < replicated_opt
    assert out["temp_size_in_bytes"] > 0 and out["peak_estimate_bytes"] > out["argument_size_in_bytes"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the libtpu package")
def test_plan_compiles_for_an_abstract_tpu_slice_from_a_cpu_host():
    out = plan.plan_cli(["--config", "configs/paper.py:tiny", "--topology", "v5p:2x2x1", "--mesh", "1,-1,1",
                     "--seq", "256"])
    assert out["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and out["temp_size_in_bytes"] > 0
