"""Shared machinery of the weight converters: streaming tensor readers and strict assignment.

Readers yield one tensor at a time (safetensors through memory maps, ``.bin``/``.pth`` through
``torch.load(weights_only=True, mmap=True)``), so converting a 7B model needs little more host
memory than the converted weights themselves.

A converter builds a flat ``{"a/b/c": np.ndarray}`` dict whose keys are the ``/``-joined paths of
the target model's parameters (``nnx.to_pure_dict`` paths). ``ivcr_jax.models.params.load_flat``
checks that dict against the model and raises ``CheckpointMismatch`` listing every missing,
unexpected and mis-shaped key — a partial load never happens silently.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from ivcr_jax.models.params import CheckpointError


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


def torch_linear(w: np.ndarray) -> np.ndarray:
    """torch ``Linear.weight`` ``[out, in]`` -> our kernel ``[in, out]``."""
    return np.ascontiguousarray(np.asarray(w).T)


def torch_conv(w: np.ndarray) -> np.ndarray:
    """torch ``Conv2d.weight`` ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``."""
    return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0))
