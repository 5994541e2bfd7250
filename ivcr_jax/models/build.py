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


RANDOM_INITS = ("bert", "fan_in")


def _fan_in_scaled(state):
    """Every weight matrix (``kernel``: Dense ``[in, out]``, the ViT's ``[p, p, 3, out]`` patch
    filter) rescaled from N(0, 0.02²) to N(0, 1/fan_in), and every embedding table to N(0, 1)
    (text tokens then enter the LLM at the scale of the projected video tokens); LoRA is left alone."""
    def scale(path, x):
        names = [str(getattr(k, "key", k)) for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]
        if any("lora" in n for n in names) or x.ndim < 2:
            return x
        if names[-1] == "embedding":  # token / position tables: unit scale, like the video tokens
            return (x * (1.0 / 0.02)).astype(x.dtype)
        if names[-1] != "kernel":
            return x
        fan_in = 1
        for d in x.shape[:-1]:
            fan_in *= int(d)
        return (x * (fan_in ** -0.5 / 0.02)).astype(x.dtype)
    return jax.tree_util.tree_map_with_path(scale, state)


def build_model(cfg: InterLLaVAConfig, *, mesh=None, seed: int = 0, random_init: str = "bert") -> InterLLaVA:
    """Initialise a randomly initialised model, sharded over ``mesh`` when given.

    ``random_init``: ``"bert"`` draws every weight matrix from N(0, 0.02²), as the HF BERT and
    LLaMA configs do (right at the real widths, 768-4096); ``"fan_in"`` from N(0, 1/fan_in), which
    keeps a unit gain per layer at any width. At the tiny widths (64) 0.02 makes each residual
    branch ~8x weaker per matrix than at 768, and a random image Q-Former's output then hardly
    depends on the image (the demo measured 5 % at the Q-Former, 0.4 % at the video tokens).
    """
    if random_init not in RANDOM_INITS:
        raise ValueError(f"random_init must be one of {RANDOM_INITS}, got {random_init!r}")
    gdef, abstract_state = nnx.split(abstract_model(cfg, seed))

    def init():
        state = nnx.split(InterLLaVA(cfg, rngs=nnx.Rngs(seed)))[1]
        return _fan_in_scaled(state) if random_init == "fan_in" else state

    # One compiled initialisation (eager init would compile once per parameter shape).
    if mesh is None:
        state = jax.jit(init)()
    else:
        state = jax.jit(init, out_shardings=sharding.state_shardings(abstract_state, mesh))()
    return nnx.merge(gdef, state)
