"""Shared machinery of the weight converters: streaming tensor readers and strict assignment.

Readers yield one tensor at a time (safetensors through memory maps, ``.bin``/``.pth`` through
``torch.load(weights_only=True, mmap=True)``), so converting a 7B model needs little more host
memory than the converted weights themselves.

A converter builds a flat ``{"a/b/c": np.ndarray}`` dict whose keys are the ``/``-joined paths of
the target model's parameters (``nnx.to_pure_dict`` paths). :func:`load_flat` checks that dict
against the model and raises :class:`CheckpointMismatch` listing every missing, unexpected and
mis-shaped key — a partial load never happens silently.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx


class CheckpointError(ValueError):
    """A file is not a checkpoint of the expected kind."""


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


# ----------------------------------------------------------------------------- readers

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` from a safetensors file through a memory map (bf16 included)."""
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        yield name, mm[base + a: base + b].view(dt).reshape(info["shape"])


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def read_torch(path: str | os.PathLike, key: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` from a ``.pth``/``.bin`` state dict, loaded with ``weights_only=True``.

    ``key`` selects a nested dict (LAVIS/TimeChat files store ``{"model": state_dict, ...}``); with
    ``key=None`` a top-level ``"model"`` entry is used when present.
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading .pth/.bin files needs torch: pip install 'ivcr_jax[convert]'") from e
    path = str(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise CheckpointError(f"{path}: expected a dict with a {key!r} entry")
        obj = obj[key]
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    for name in list(obj.keys()):
        v = obj[name]
        if hasattr(v, "detach"):
            yield name, _torch_to_numpy(v)


def read_any(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Dispatch on the file suffix: ``.safetensors`` or a torch pickle (``.bin``/``.pth``/``.pt``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch(path)


def hf_weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of an HF ``save_pretrained`` directory (sharded or not)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            files = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
            return [d / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            return [d / single]
    raise CheckpointError(f"{d}: no model.safetensors or pytorch_model.bin found")


def read_hf_dir(directory: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    for f in hf_weight_files(directory):
        yield from read_any(f)


def read_hf_config(directory: str | os.PathLike) -> dict:
    p = Path(directory) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{directory}: no config.json (expected an HF save_pretrained directory)")
    return json.loads(p.read_text())


# ----------------------------------------------------------------------------- assignment

def flat_state(model: nnx.Module, filter=nnx.Param) -> dict[str, Any]:
    """``{"a/b/c": Variable}`` for every variable of ``model`` matching ``filter``."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, filter)):
        out["/".join(str(p) for p in path)] = var
    return out


def check_flat(source: str, flat: Mapping[str, np.ndarray], targets: Mapping[str, Any],
               allow_missing=()) -> None:
    """Raise :class:`CheckpointMismatch` unless ``flat`` covers ``targets`` with equal shapes."""
    import re
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


def torch_linear(w: np.ndarray) -> np.ndarray:
    """torch ``Linear.weight`` ``[out, in]`` -> our kernel ``[in, out]``."""
    return np.ascontiguousarray(np.asarray(w).T)


def torch_conv(w: np.ndarray) -> np.ndarray:
    """torch ``Conv2d.weight`` ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``."""
    return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0))
