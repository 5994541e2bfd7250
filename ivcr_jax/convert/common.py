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
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors

from ivcr_jax.models.params import CheckpointError


# ----------------------------------------------------------------------------- readers

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100_000_000  # the safetensors format's own limit


def _st_entries(path: str, header: Any, data_size: int) -> list[tuple[str, Any, list[int], int, int]]:
    """Check every header entry against the format and the file; ``(name, dtype, shape, start, end)``.

    Problems are named by tensor, so a hand-edited or truncated file says which entry is wrong.
    """
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is a JSON {type(header).__name__}, "
                              "expected an object)")
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{where}: header entry {info!r:.80} lacks dtype/shape/data_offsets")
        dt = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dt is None:
            raise CheckpointError(f"{where} has unsupported dtype {info['dtype']!r} "
                                  f"(readable: {', '.join(_ST_DTYPES)})")
        shape, offs = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"{where}: data_offsets {offs!r} are not [start, end] with 0 <= start <= end")
        need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        if offs[1] - offs[0] != need:
            raise CheckpointError(f"{where}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, but shape "
                                  f"{tuple(shape)} of {info['dtype']} needs {need}")
        if offs[1] > data_size:
            raise CheckpointError(f"{where}: data ends at byte {offs[1]} of the data section, which holds only "
                                  f"{data_size} bytes (truncated file?)")
        out.append((name, dt, shape, offs[0], offs[1]))
    return out


def read_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` from a safetensors file through a memory map (bf16 included).

    The header is checked entry by entry (naming the tensor) and then by the ``safetensors``
    library itself (overlaps, gaps, trailing bytes) before any tensor is handed out.
    """
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {len(head)} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} exceeds the file's "
                                  f"{size} bytes; truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    entries = _st_entries(path, header, size - 8 - n)
    try:
        with safetensors.safe_open(path, framework="numpy"):
            pass
    except Exception as e:  # SafetensorError (a plain Exception subclass) for any format violation
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    if not entries:
        return
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + n
    for name, dt, shape, a, b in entries:
        yield name, mm[base + a: base + b].view(dt).reshape(shape)


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _torch_load_cause(e: Exception) -> str:
    """One line for a failed ``torch.load``, without torch's advice to drop ``weights_only``."""
    text = str(e).strip()
    if "Weights only load failed" in text:
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        why = next((p for p in paras[1:] if not p.startswith("Check the documentation")), "")
        return ("not a loadable PyTorch checkpoint (torch.load with weights_only=True refused it: "
                f"{' '.join(why.split())[:200]})")
    first = text.splitlines()[0] if text else ""
    first = first.split(" This is an internal miniz error")[0]
    return f"not a loadable PyTorch checkpoint ({type(e).__name__}: {first[:240]})"


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
        raise CheckpointError(f"{path}: {_torch_load_cause(e)}") from None
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise CheckpointError(f"{path}: expected a dict with a {key!r} entry")
        obj = obj[key]
    elif isinstance(obj, Mapping) and "model" in obj and not hasattr(obj["model"], "detach"):
        if not isinstance(obj["model"], Mapping):  # LAVIS/TimeChat files: {"model": state_dict, ...}
            raise CheckpointError(f"{path}: its 'model' entry is a {type(obj['model']).__name__}, "
                                  "not a state dict")
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    for name in list(obj.keys()):
        v = obj[name]
        if hasattr(v, "detach"):
            try:
                arr = _torch_to_numpy(v)
            except Exception as e:  # e.g. float8/complex/sparse tensors numpy cannot hold
                raise CheckpointError(f"{path}: tensor {name} ({v.dtype}, {v.layout}) cannot be read "
                                      f"({type(e).__name__}: {e})") from None
            yield name, arr


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
            weight_map = read_json(d / index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{d / index}: no \"weight_map\" object of tensor name -> file name")
            return [d / f for f in sorted(set(weight_map.values()))]
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
    return read_json(p)


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; anything else is a :class:`CheckpointError` naming the file."""
    try:
        obj = json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(obj).__name__}")
    return obj


def check_weight(source: str, name: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` if it can be a weight: a floating-point tensor with finite values.

    An integer or boolean tensor where a weight belongs would otherwise be cast silently, and a
    NaN/Inf (a corrupt download or a bit flip) would only surface as a NaN loss much later.
    """
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise CheckpointError(f"{source}: tensor {name} has dtype {arr.dtype}; expected a floating-point weight")
    if arr.size and not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise CheckpointError(f"{source}: tensor {name} holds {bad} non-finite value(s) (NaN/Inf) of "
                              f"{arr.size}; the file is corrupt")
    return arr


def torch_linear(w: np.ndarray) -> np.ndarray:
    """torch ``Linear.weight`` ``[out, in]`` -> our kernel ``[in, out]``."""
    return np.ascontiguousarray(np.asarray(w).T)


def torch_conv(w: np.ndarray) -> np.ndarray:
    """torch ``Conv2d.weight`` ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]``."""
    return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0))
