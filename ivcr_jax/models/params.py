"""Parameter trees: ``a/b/c`` paths, which parameters train, flat views and strict loading.

Paths are those of ``nnx.state(model)``: ``qformer/layers/0/attention/query/kernel``,
``llama/layers/3/attn/q_proj/lora_a`` ... The same path strings name parameters in
``config.trainable`` (regexes), the sharding golden file, learning-rate multipliers, converted
weights and checkpoints. :func:`load_flat` checks a flat ``{"a/b/c": array}`` dict against a model
and raises :class:`CheckpointMismatch` listing every missing, unexpected and mis-shaped key — a
partial load never happens silently.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class CheckpointError(ValueError):
    """A file is not a checkpoint of the expected kind, or it cannot be read or written."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint's files or values are damaged or incomplete (a checksum fails, a file is
    missing, a restored array is not finite): it is never used; training falls back to an
    older step."""


class CheckpointMismatch(CheckpointError):
    """Keys or shapes of a checkpoint do not match the model."""

    def __init__(self, source: str, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [f"checkpoint {source} does not match the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing[:50])
                         + (" ..." if len(self.missing) > 50 else ""))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected[:50])
                         + (" ..." if len(self.unexpected) > 50 else ""))
        if self.mismatched:
            lines.append(f"  mis-shaped keys ({len(self.mismatched)}): " + ", ".join(
                f"{k} (checkpoint {a}, model {b})" for k, a, b in self.mismatched[:50]))
        super().__init__("\n".join(lines))


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


def flat_state(model: nnx.Module, filter=nnx.Param) -> dict[str, Any]:
    """``{"a/b/c": Variable}`` for every variable of ``model`` matching ``filter``."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, filter)):
        out["/".join(str(p) for p in path)] = var
    return out


def check_flat(source: str, flat: Mapping[str, np.ndarray], targets: Mapping[str, Any],
               allow_missing=()) -> None:
    """Raise :class:`CheckpointMismatch` unless ``flat`` covers ``targets`` with equal shapes."""
    missing = [k for k in targets if k not in flat and not any(re.fullmatch(p, k) for p in allow_missing)]
    unexpected = [k for k in flat if k not in targets]
    def shape(t):
        return tuple((t.get_value() if hasattr(t, "get_value") else t).shape)
    mismatched = [(k, tuple(flat[k].shape), shape(targets[k]))
                  for k in flat if k in targets and tuple(flat[k].shape) != shape(targets[k])]
    if missing or unexpected or mismatched:
        raise CheckpointMismatch(source, missing, unexpected, mismatched)


def load_flat(model: nnx.Module, flat: Mapping[str, np.ndarray], source: str = "<weights>",
              allow_missing=(), filter=nnx.Param) -> nnx.Module:
    """Assign ``flat`` to ``model``'s variables in place (cast to each variable's dtype)."""
    targets = flat_state(model, filter)
    check_flat(source, flat, targets, allow_missing)
    for k, arr in flat.items():
        var = targets[k]
        # set_value also fills an abstractly created (ShapeDtypeStruct) variable, so a model
        # built with nnx.eval_shape is loaded without first materialising random weights.
        var.set_value(jnp.asarray(np.asarray(arr), dtype=var.get_value().dtype))
    return model
