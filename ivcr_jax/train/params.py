"""Which parameters train: regex lists over ``/``-joined parameter paths (config.trainable).

Paths are those of ``nnx.state(model)``: ``qformer/layers/0/attention/query/kernel``,
``llama/layers/3/attn/q_proj/lora_a`` ... The same path strings name parameters in the
sharding golden file, in learning-rate multipliers and in checkpoints.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

import jax
from flax import nnx


def path_str(path: Sequence[Any]) -> str:
    """Join an nnx / jax tree path into ``a/b/c`` (dropping a Variable's ``value`` attribute)."""
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.GetAttrKey):
            if p.name == "value":
                continue
            parts.append(p.name)
        elif isinstance(p, jax.tree_util.DictKey):
            parts.append(str(p.key))
        elif isinstance(p, jax.tree_util.SequenceKey):
            parts.append(str(p.idx))
        elif isinstance(p, jax.tree_util.FlattenedIndexKey):
            parts.append(str(p.key))
        else:
            parts.append(str(p))
    return "/".join(parts)


def trainable_filter(patterns: Iterable[str]) -> Callable[[tuple, Any], bool]:
    """An nnx filter selecting ``nnx.Param``s whose path fully matches one of ``patterns``."""
    regs = [re.compile(p) for p in patterns]

    def f(path, var) -> bool:
        if not isinstance(var, nnx.Param):
            return False
        s = "/".join(str(p) for p in path)
        return any(r.fullmatch(s) for r in regs)

    return f


def tree_paths(tree) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_with_path(fn: Callable[[str, Any], Any], tree):
    """``jax.tree.map`` with the ``a/b/c`` path string as first argument."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))
