"""The converted-weights format: an Orbax checkpoint of the model's parameter tree + metadata.

``save_flat`` writes ``{"a/b/c": array}`` as a nested tree with Orbax (``params/``) and a
``ivcr_meta.json`` (format version, model config, sources, and the size and SHA-256 of every file
under ``params/``), written last, so a directory without it is an unfinished save. ``load_into``
restores it straight into the shardings of an existing (possibly abstractly created, sharded)
model, after checking the files against their checksums and every key and shape, and refuses
restored values that are not finite — a 7B conversion happens once and later runs load it
directly, and a corrupt copy is never used. Every failure is a :class:`CheckpointError` naming the
directory (and the file) and the cause.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ivcr_jax.convert.common import read_json
from ivcr_jax.models.params import CheckpointError, check_flat, flat_state

FORMAT = "ivcr_jax.converted/1"
META = "ivcr_meta.json"


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


def check_out(directory: str | Path) -> Path:
    """Raise unless converted weights can be written to ``directory``: checked before a conversion
    reads anything, so a taken or unwritable ``--out`` is reported at once."""
    d = Path(directory).absolute()
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d}: exists and is not a directory; choose an empty output directory")
    held = [n for n in ("params", META) if (d / n).exists()]
    if held:
        raise FileExistsError(f"{d}: already holds a converted checkpoint ({', '.join(held)}); "
                              "choose an empty output directory")
    parent = d
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"{d}: cannot be created ({parent} is not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{d}: cannot be created ({parent} is not writable)")
    if not d.exists():  # some file systems (/proc, read-only mounts) pass the access check and still refuse
        try:
            d.mkdir(parents=True)
        except OSError as e:
            raise CheckpointError(f"{d}: cannot be created ({e.strerror or e})") from None
        for made in [d, *d.parents]:   # leave nothing behind: the conversion creates it again
            if made == parent:
                break
            made.rmdir()
    return d


def file_digests(root: str | Path, skip: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``root`` but those in ``skip``:
    the manifest of a converted directory (``ivcr_meta.json``) and of a training step
    (``checkpoints.py``)."""
    root = Path(root)
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel not in skip:
            out[rel] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    return out


def digest_problems(root: str | Path, files: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What differs between the files under ``root`` and the manifest ``files`` (:func:`file_digests`):
    one phrase per missing, resized or changed file; empty when every file matches."""
    root = Path(root)
    problems = []
    for rel, want in files.items():
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != want.get("size"):
            problems.append(f"{rel} has {f.stat().st_size} bytes, {want.get('size')} when written "
                            "(truncated or replaced)")
        elif _sha256(f) != want.get("sha256"):
            problems.append(f"{rel} does not match its SHA-256 checksum")
    return problems


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def verify_files(directory: str | Path, meta: Mapping[str, Any] | None = None) -> None:
    """Check the files under ``params/`` against the sizes and checksums ``ivcr_meta.json`` lists.

    A directory written before checksums were recorded (no ``files`` entry) is not checked here;
    the finite check of :func:`load_into` still applies to it.
    """
    directory = Path(directory).absolute()
    files = (meta if meta is not None else read_meta(directory)).get("files")
    if files is None:
        return
    if not isinstance(files, Mapping) or not all(isinstance(v, Mapping) for v in files.values()):
        raise CheckpointError(f"{directory / META}: \"files\" is not an object of file -> size, sha256")
    problems = digest_problems(directory / "params", files)
    if problems:
        raise CheckpointError(f"{directory}: the checkpoint is corrupt: params/{problems[0]}"
                              + (f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""))


def save_flat(directory: str | Path, flat: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None):
    """Write converted weights to ``directory`` (created; must not already hold a checkpoint)."""
    import orbax.checkpoint as ocp

    directory = check_out(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", nest_paths({k: np.asarray(v) for k, v in flat.items()}))
        ckptr.wait_until_finished()
    info = {"format": FORMAT, "num_tensors": len(flat),
            "num_params": int(sum(int(np.prod(v.shape)) for v in flat.values()))}
    info.update(meta or {})
    info["files"] = file_digests(directory / "params")
    # Written last and renamed into place: its presence marks a complete save.
    tmp = directory / (META + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    os.replace(tmp, directory / META)


def read_meta(directory: str | Path) -> dict:
    p = Path(directory) / META
    if not p.is_file():
        raise CheckpointError(f"{directory}: not a converted ivcr_jax checkpoint (no {META}; "
                              "an unfinished conversion leaves none)")
    meta = read_json(p)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta


@contextlib.contextmanager
def _orbax_quiet():
    """Orbax reports a damaged file with an absl warning, and its abandoned coroutines and
    TensorStore callbacks print 'Event loop is closed' tracebacks (through sys.unraisablehook and
    sys.excepthook) before it fails or returns nothing; the CheckpointError raised instead says it
    once. The hooks are restored after a collection has finalised those coroutines."""
    loggers = [logging.getLogger(n) for n in ("absl", "asyncio")]
    levels = [lg.level for lg in loggers]
    hooks = sys.excepthook, sys.unraisablehook
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    except Exception:
        sys.excepthook = sys.unraisablehook = lambda *a: None
        raise
    finally:
        gc.collect()
        sys.excepthook, sys.unraisablehook = hooks
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _cause(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    first = (lines[0] if lines else "").split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {first}"[:300]


def saved_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    import orbax.checkpoint as ocp

    read_meta(directory)
    params = Path(directory).absolute() / "params"
    if not params.is_dir():
        raise CheckpointError(f"{directory}: no params/ directory (the checkpoint is incomplete)")
    try:
        with _orbax_quiet(), ocp.StandardCheckpointer() as ckptr:
            md = ckptr.metadata(params)
    except Exception as e:  # Orbax/TensorStore raise many types for unreadable metadata
        raise CheckpointError(f"{params}: unreadable checkpoint metadata ({_cause(e)})") from None
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping) or not tree:  # Orbax returns None when it cannot read it
        raise CheckpointError(f"{params}: unreadable parameter metadata (_METADATA or an OCDBT file "
                              "under params/ is missing or corrupt)")
    shapes = {}
    for k, v in flatten_paths(tree).items():
        if getattr(v, "shape", None) is None:
            raise CheckpointError(f"{params}: metadata of {k} has no shape (_METADATA corrupt)")
        shapes[k] = tuple(v.shape)
    return shapes


def load_into(model: nnx.Module, directory: str | Path, *, allow_missing=()) -> nnx.Module:
    """Restore converted weights into ``model`` (in place), keeping its shardings and dtypes.

    The model is changed only after every check has passed (files, keys, shapes, finite values).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    verify_files(directory, read_meta(directory))
    shapes = saved_shapes(directory)
    targets = flat_state(model)
    check_flat(str(directory), {k: _Shape(s) for k, s in shapes.items()}, targets, allow_missing)
    abstract = {}
    for k in shapes:
        v = targets[k].get_value()
        abstract[k] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
    try:
        with _orbax_quiet(), ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(directory / "params", nest_paths(abstract))
    except Exception as e:  # Orbax/TensorStore errors of damaged data files
        raise CheckpointError(f"{directory}: params/ could not be restored ({_cause(e)})") from None
    restored = flatten_paths(restored)
    bad = [k for k, arr in restored.items()
           if jnp.issubdtype(arr.dtype, jnp.inexact) and not bool(jnp.isfinite(arr).all())]
    if bad:
        raise CheckpointError(f"{directory}: {len(bad)} tensor(s) hold NaN/Inf after restoring "
                              f"({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}); the checkpoint is corrupt")
    for k, arr in restored.items():
        targets[k][...] = arr
    return model


class _Shape:
    def __init__(self, shape):
        self.shape = tuple(shape)
