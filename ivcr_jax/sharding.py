"""Device mesh and logical-axis sharding rules: the only module that names mesh axes.

Every parameter of every model carries *logical* axis names (``embed``, ``mlp``, ``heads``,
``vocab`` ...). This module turns them into ``PartitionSpec``s over the three-axis mesh
(``data``, ``fsdp``, ``tensor``), after MaxText's logical-rules idea:

* weights shard their ``embed`` dimension over ``fsdp`` and their wide dimension (``mlp``,
  ``heads``, ``vocab``) over ``tensor``;
* activations shard their ``batch`` dimension over ``data`` and ``fsdp`` together.

A dimension whose size is not divisible by the mesh axes it maps to is replicated instead
(e.g. the 32005-row vocabulary on a tensor axis of 2), so every configuration is shardable.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("lora", None),
    ("norm", None),
    ("pos", None),
    ("query", None),
    ("frames", None),
    ("length", None),
    ("patch", None),
    ("channels", None),
    ("conv", None),
)


def resolve_mesh_shape(shape: Mapping[str, int], n_devices: int) -> tuple[int, int, int]:
    """Resolve a ``{data, fsdp, tensor}`` mapping where one entry may be -1 ("the rest")."""
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"{n_devices} devices cannot be split as {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {n_devices}")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(shape: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """Build the (data, fsdp, tensor) mesh with automatic (GSPMD) axis types."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    try:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # abstract or unusual topologies: plain reshape
        arr = np.asarray(devices, dtype=object).reshape(sizes)
    kwargs = {}
    if hasattr(jax.sharding, "AxisType"):
        kwargs["axis_types"] = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(arr, MESH_AXES, **kwargs)


def _rule_table(rules: Iterable[tuple[str, Any]]) -> dict[str, tuple[str, ...]]:
    table = {}
    for name, target in rules:
        if target is None:
            table[name] = ()
        elif isinstance(target, str):
            table[name] = (target,)
        else:
            table[name] = tuple(target)
    return table


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Iterable[tuple[str, Any]] = RULES) -> P:
    """Map logical axis names of an array of ``shape`` to a PartitionSpec on ``mesh``.

    Mesh axes of size 1 are dropped, a mesh axis is used at most once per array (first
    dimension wins), and a dimension not divisible by its mesh axes is replicated.
    """
    if names is None:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    table = _rule_table(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        axes = tuple(a for a in table[name] if mesh.shape[a] > 1 and a not in used)
        if not axes or dim % math.prod(mesh.shape[a] for a in axes):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def variable_names(var: nnx.Variable) -> tuple[str, ...] | None:
    """The logical axis names a variable was created with (``logical_axes`` metadata).

    Parameters keep their names under our own ``logical_axes`` key, not flax's ``out_sharding``:
    flax shards variables with that key eagerly at creation, while we create models abstractly
    and place them with :func:`state_shardings` under an explicit ``jax.jit``.
    """
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    for key in ("logical_axes", "out_sharding", "sharding", "sharding_names"):
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return None


def _shape(var) -> tuple[int, ...]:
    return tuple(var.get_value().shape)


def _leaf_spec(leaf, mesh: Mesh, rules) -> P:
    if isinstance(leaf, nnx.Variable):
        return logical_to_spec(variable_names(leaf), _shape(leaf), mesh, rules)
    return P()  # a bare array (optimizer step count, RNG key data): replicated


def state_specs(state: Any, mesh: Mesh, rules=RULES) -> Any:
    """PartitionSpecs for every leaf of an (abstract or concrete) state.

    Variables use their logical names; a whole train state works too: optax keeps the parameters'
    ``Variable`` wrappers (and so their names) in moment trees like Adam's ``mu``/``nu``, so those
    shard like the parameters, and bare arrays are replicated.
    """
    return jax.tree.map(lambda v: _leaf_spec(v, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: Any, mesh: Mesh, rules=RULES) -> Any:
    """NamedShardings for every leaf of ``state`` (use as jit in/out_shardings)."""
    return jax.tree.map(lambda v: NamedSharding(mesh, _leaf_spec(v, mesh, rules)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, names: Sequence[str | None], rules=RULES) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op outside a mesh."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


_ACTIVE: list[Mesh] = []


class use_mesh:
    """Context manager that makes ``mesh`` current for :func:`constrain` (and ``jax.set_mesh``)."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self._ctx = None

    def __enter__(self):
        _ACTIVE.append(self.mesh)
        if hasattr(jax, "set_mesh"):
            self._ctx = jax.set_mesh(self.mesh)
            self._ctx.__enter__()
        return self.mesh

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        _ACTIVE.pop()


def current_mesh() -> Mesh | None:
    return _ACTIVE[-1] if _ACTIVE else None


def spec_table(state: nnx.State, mesh: Mesh, rules=RULES) -> dict[str, str]:
    """``{"a/b/c": "PartitionSpec(...)"}`` for every variable: what the golden file records."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        names = variable_names(var)
        spec = logical_to_spec(names, _shape(var), mesh, rules)
        out["/".join(str(p) for p in path)] = f"{tuple(_shape(var))} {names} -> {spec}"
    return out


# ----------------------------------------------------------------------------- batches

def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch array: its leading (batch) axis over ``data`` and ``fsdp``."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    first = axes[0] if len(axes) == 1 else (axes or None)
    return NamedSharding(mesh, P(first))


def to_device(batch: Mapping[str, Any], mesh: Mesh) -> dict:
    """This process's rows of a numpy batch → global jax arrays, batch axis over (data, fsdp)."""
    sh = batch_sharding(mesh)

    def put(x):
        return jax.make_array_from_process_local_data(sh, np.asarray(x))
    return jax.tree.map(put, {k: v for k, v in batch.items() if not isinstance(v, (str, bytes))})


def to_host_local(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array (all rows on one process)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, batch_sharding(mesh).spec))
