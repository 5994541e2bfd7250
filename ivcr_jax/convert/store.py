"""The converted-weights format: an Orbax checkpoint of the model's parameter tree + metadata.

``save_flat`` writes ``{"a/b/c": array}`` as a nested tree with Orbax (``params/``) and a
``ivcr_meta.json`` (format version, model config, sources). ``load_into`` restores it straight
into the shardings of an existing (possibly abstractly created, sharded) model, after checking
every key and shape — a 7B conversion happens once and later runs load it directly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from ivcr_jax.models.params import CheckpointError, check_flat, flat_state

FORMAT = "ivcr_jax.converted/1"


def nest_paths(flat: Mapping[str, Any]) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    out: dict = {}
    for k, v in flat.items():
        d = out
        parts = k.split("/")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def flatten_paths(tree: Mapping[str, Any], prefix: str = "") -> dict:
    """The inverse of :func:`nest_paths`."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_paths(v, key))
        else:
            out[key] = v
    return out


def save_flat(directory: str | Path, flat: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None):
    """Write converted weights to ``directory`` (created; must not already hold a checkpoint)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if (directory / "params").exists():
        raise FileExistsError(f"{directory}/params already exists; choose an empty output directory")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", nest_paths({k: np.asarray(v) for k, v in flat.items()}))
        ckptr.wait_until_finished()
    info = {"format": FORMAT, "num_tensors": len(flat),
            "num_params": int(sum(int(np.prod(v.shape)) for v in flat.values()))}
    info.update(meta or {})
    (directory / "ivcr_meta.json").write_text(json.dumps(info, indent=1, default=str))


def read_meta(directory: str | Path) -> dict:
    p = Path(directory) / "ivcr_meta.json"
    if not p.is_file():
        raise CheckpointError(f"{directory}: not a converted ivcr_jax checkpoint (no ivcr_meta.json)")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def saved_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    import orbax.checkpoint as ocp

    read_meta(directory)
    with ocp.StandardCheckpointer() as ckptr:
        md = ckptr.metadata(Path(directory).absolute() / "params")
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    return {k: tuple(v.shape) for k, v in flatten_paths(tree).items()}


def load_into(model: nnx.Module, directory: str | Path, *, allow_missing=()) -> nnx.Module:
    """Restore converted weights into ``model`` (in place), keeping its shardings and dtypes."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    shapes = saved_shapes(directory)
    targets = flat_state(model)
    check_flat(str(directory), {k: _Shape(s) for k, s in shapes.items()}, targets, allow_missing)
    abstract = {}
    for k in shapes:
        v = targets[k].get_value()
        abstract[k] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory / "params", nest_paths(abstract))
    for k, arr in flatten_paths(restored).items():
        targets[k][...] = arr
    return model


class _Shape:
    def __init__(self, shape):
        self.shape = tuple(shape)
