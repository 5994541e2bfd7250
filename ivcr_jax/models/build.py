"""Create an InterLLaVA from a config node, sharded on a mesh.

The model is created abstractly (``nnx.eval_shape``), each variable's ``NamedSharding`` is
derived from its logical axis names (``ivcr_jax/sharding.py``), and the real initialisation
runs under ``jax.jit`` with those output shardings, so a 7B model is never materialised whole
on one host or device. Loading converted weights into it is ``ivcr_jax.convert.store.load_into``
(``ivcr_jax.models`` knows nothing of checkpoint formats).
"""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from ivcr_jax import sharding
from ivcr_jax.models.interllava import InterLLaVA, InterLLaVAConfig


def model_config(node: Any) -> InterLLaVAConfig:
    """``config.model`` (ConfigDict or dict) → :class:`InterLLaVAConfig`."""
    d = node.to_dict() if hasattr(node, "to_dict") else dict(node)
    return InterLLaVAConfig.from_dict(d)


def abstract_model(cfg: InterLLaVAConfig, seed: int = 0) -> InterLLaVA:
    return nnx.eval_shape(lambda: InterLLaVA(cfg, rngs=nnx.Rngs(seed)))


def build_model(cfg: InterLLaVAConfig, *, mesh=None, seed: int = 0) -> InterLLaVA:
    """Initialise a randomly initialised model, sharded over ``mesh`` when given."""
    gdef, abstract_state = nnx.split(abstract_model(cfg, seed))

    def init():
        return nnx.split(InterLLaVA(cfg, rngs=nnx.Rngs(seed)))[1]

    # One compiled initialisation (eager init would compile once per parameter shape).
    if mesh is None:
        state = jax.jit(init)()
    else:
        state = jax.jit(init, out_shardings=sharding.state_shardings(abstract_state, mesh))()
    return nnx.merge(gdef, state)
