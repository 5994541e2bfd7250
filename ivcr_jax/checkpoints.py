"""What a run writes and how it is read back: resume (training), evaluation, chat, export.

A training workdir::

    <workdir>/checkpoints/<step>/state/   train state: {"params", "opt", "step", "rng"} (Orbax)
    <workdir>/checkpoints/<step>/data/    the Grain iterator (resumes the input stream exactly)
    <workdir>/metrics.jsonl  tensorboard/  loss.png   logs (``train/logging.py``)
    <workdir>/eval_<split>/                the default output of ``python -m ivcr_jax.eval``

Orbax writes each step into a temporary directory and renames it to the bare step number only
when every item is complete, so an interrupted save is never listed and never restored. Just
before that rename, ``<step>/ivcr_checksums.json`` is written into it: the size and sha256 of
every file of the step (Orbax checksums only the index of its zarr3 shards, not the data). A
restore first checks them, then that every restored float array is finite; a step that fails
(or has no checksum file) raises :class:`CheckpointCorrupt`. Training then falls back to the
newest step that passes, moving each rejected one to ``<workdir>/rejected_checkpoints/`` (kept
for inspection, out of the way of the step that will be saved again); evaluation and chat refuse
it. Every failure to read or write a step is a :class:`CheckpointError` naming the directory
and the cause.

A converted directory (``python -m ivcr_jax.convert ivcr``; ``ivcr_jax.convert.store``) holds
every parameter of the model (``ivcr_meta.json`` + ``params/``).

Reading weights back (:func:`load_weights`): ``--checkpoint`` may name a converted directory
(every parameter is loaded from it), or a training workdir, its ``checkpoints/`` directory or one
step directory: the latest complete step (or the one named) is read. A training checkpoint holds
only the trainable parameters (``config.trainable``) besides the optimizer state; they are
restored over the base weights training started from: ``config.init.converted`` when set, else
the random initialisation of ``config.seed`` (exactly what the trainer built). Only the
``params`` subtree is read (Orbax partial restore): the Adam moments are never loaded. Keys and
shapes are checked first; a mismatch raises ``CheckpointMismatch`` naming the directory.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from ivcr_jax.cli import leaf_paths
from ivcr_jax.convert import store
from ivcr_jax.convert.store import flatten_paths, load_into, nest_paths
from ivcr_jax.models.params import (CheckpointCorrupt, CheckpointError, check_flat, flat_state, path_str,
                                    trainable_filter)

__all__ = ["MANIFEST", "Checkpointer", "abstract_like", "checkpoint_dir", "config_changes", "default_eval_dir",
           "find_step_dir", "is_converted", "load_trainable", "load_weights", "verify_step"]

MANIFEST = "ivcr_checksums.json"
# Orbax's own bookkeeping at the top of a step, rewritten while the step commits (after the manifest).
_UNHASHED = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt", MANIFEST})


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def is_converted(path: str | Path) -> bool:
    return (Path(path) / "ivcr_meta.json").is_file()


def default_eval_dir(checkpoint: str | Path | None, split: str) -> Path:
    """``<workdir>/eval_<split>`` for a training run, else ``./eval_<split>``."""
    if checkpoint and not is_converted(checkpoint):
        return Path(checkpoint) / f"eval_{split}"
    return Path(f"eval_{split}")


# ----------------------------------------------------------------------------- integrity

def write_manifest(step_dir: str | Path) -> Path:
    """Write ``<step_dir>/ivcr_checksums.json``: the size and sha256 of every file of the step
    (``convert/store.file_digests``, the manifest of converted directories too)."""
    step_dir = Path(step_dir)
    out = step_dir / MANIFEST
    files = store.file_digests(step_dir, skip=_UNHASHED)
    out.write_text(json.dumps({"format": 2, "files": files}, indent=0) + "\n")
    return out


def verify_step(step_dir: str | Path) -> None:
    """Raise :class:`CheckpointCorrupt` unless every file of ``step_dir`` matches its checksum."""
    step_dir = Path(step_dir)
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        raise CheckpointCorrupt(f"{step_dir}: no {MANIFEST} (written as a save commits): the save did not "
                                f"complete or predates checksums, so the step is not trusted")
    try:
        files = json.loads(manifest.read_text())["files"]
        want = {str(k): {"size": int(v["size"]), "sha256": str(v["sha256"])} for k, v in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointCorrupt(f"{manifest}: unreadable checksum file ({type(e).__name__}: {e})") from None
    problems = store.digest_problems(step_dir, want)
    if problems:
        raise CheckpointCorrupt(f"{step_dir}: corrupt, {len(problems)} of {len(want)} files fail their checksums: "
                                + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))


def non_finite(tree: Any) -> list[str]:
    """The ``a/b/c`` paths of the float arrays of ``tree`` holding a NaN or an infinity."""
    leaves = [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return []
    ok = jax.device_get(jax.jit(lambda xs: [jnp.isfinite(x).all() for x in xs])([x for _, x in leaves]))
    return [k for (k, _), good in zip(leaves, ok) if not good]


def _check_finite(source: Path, tree: Any) -> None:
    bad = non_finite(tree)
    if bad:
        raise CheckpointCorrupt(f"{source}: {len(bad)} restored arrays hold NaN or inf: "
                                + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))


def _cause(e: BaseException) -> str:
    """One line for an exception from Orbax / TensorStore / the filesystem: the innermost ``OSError``
    when there is one (disk full, permissions), else the first line of the message."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            name = errno.errorcode.get(x.errno, str(x.errno))
            return f"{x.strerror or name} ({name})" + (f": {x.filename}" if x.filename else "")
        todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    line = (str(e).strip().splitlines() or [""])[0]
    if "No space left on device" in str(e) or "OS error 28" in str(e):   # TensorStore: RESOURCE_EXHAUSTED
        where = re.search(r'local file "([^"]+)"', str(e))
        return "No space left on device (ENOSPC)" + (f": {where.group(1)}" if where else "")
    return f"{type(e).__name__}: {line[:300]}" + (" ..." if len(line) > 300 else "")


def _tree_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


_HOOKED = {"excepthook": None}


def _drop_closed_loop_callbacks() -> None:
    """After a save fails mid-write, TensorStore's pending writes call back into Orbax's event
    loop, already closed, and each prints a "RuntimeError: Event loop is closed" traceback through
    ``sys.excepthook`` (hundreds on a full disk). The failure itself is reported as one
    :class:`CheckpointError` line; those echoes are dropped, from ``sys.unraisablehook`` too (any
    other exception is printed as before)."""
    if _HOOKED["excepthook"] is not None:
        return
    previous = _HOOKED["excepthook"] = sys.excepthook

    def hook(kind, value, tb):
        if kind is RuntimeError and str(value) == "Event loop is closed":
            return
        previous(kind, value, tb)
    sys.excepthook = hook
    previous_unraisable = sys.unraisablehook   # the same echo, when raised inside a callback

    def unraisable(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        previous_unraisable(u)
    sys.unraisablehook = unraisable


@contextlib.contextmanager
def _quiet(logger: str = "absl"):
    """Orbax logs a failed save or restore with a traceback before raising; the caller reports it
    as one line (:class:`CheckpointError`)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


class _NoOrbaxErrorLogs(logging.Filter):
    """Orbax logs a failed save or restore (with its traceback, from its background threads), then
    raises the error to the caller, which reports it as one :class:`CheckpointError` line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "/orbax/" in record.pathname.replace("\\", "/"))


if not any(isinstance(f, _NoOrbaxErrorLogs) for f in logging.getLogger("absl").filters):
    logging.getLogger("absl").addFilter(_NoOrbaxErrorLogs())


def config_changes(path: str | Path, config) -> list[str]:
    """``["model.llm.layers (4 -> 2)", ...]``: the keys where ``config`` differs from the JSON config
    a run wrote to ``path`` (``<workdir>/config.json``); ``[]`` when there is none to compare."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    new = json.loads(config.to_json_best_effort(sort_keys=True))
    a, b = leaf_paths(old), leaf_paths(new)
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ----------------------------------------------------------------------------- training: save, resume

class _ChecksummedRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """Orbax's atomic rename, writing the checksum manifest into a step's temporary directory just
    before the rename: a step directory holds its manifest exactly when its save committed."""

    async def finalize(self):
        # Each item (state/, data/) is finalised inside the step first; the step is the digits.
        if Path(self.get_final()).name.isdigit():
            await asyncio.to_thread(write_manifest, Path(self.get()))
        await super().finalize()


class Checkpointer:
    """Train state and Grain iterator of each saved step, asynchronously, the last ``keep`` kept,
    checksummed (:func:`verify_step`)."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        self.workdir = Path(workdir).absolute()
        self.directory = checkpoint_dir(workdir)
        self._in_flight: int | None = None     # the step an asynchronous save is writing
        _drop_closed_loop_callbacks()
        self._failed = False
        # cleanup_tmp_directories: a save that died half-way (kill, disk full) leaves Orbax's
        # temporary directory; the next run removes it.
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=async_save,
                                                 temporary_path_class=_ChecksummedRename),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    # -- saving

    def save(self, step: int, state: Any, data_iter=None, *, force: bool = False) -> bool:
        """Start saving ``step`` (the previous save is finished first). A save that fails (disk
        full, ...) raises :class:`CheckpointError`; the steps saved before it are untouched."""
        self.wait()
        self._check_room(step)
        args = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        try:
            with _quiet():
                saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as e:  # noqa: BLE001 - whatever Orbax/TensorStore raise, one line naming the step
            raise self._save_failed(step, e) from None
        self._in_flight = step if saved else None
        return saved

    def _check_room(self, step: int) -> None:
        """Refuse to start a save the disk cannot hold: a step is about the size of the last one,
        and the oldest kept step is deleted only after the new one commits. Checked before Orbax
        writes anything, so a full disk stops the run with one line and the last step untouched;
        a disk that fills up during the write is caught by :meth:`wait` instead."""
        steps = [s for s in _steps(self.directory) if s != step]
        if not steps:
            return
        need = int(_tree_bytes(self.step_dir(steps[-1])) * 1.05) + (1 << 20)
        free = shutil.disk_usage(self.directory).free
        short = free < need
        if jax.process_count() > 1:   # every process stops, or none (a save is collective)
            short = bool(multihost_utils.process_allgather(jnp.asarray(short)).any())
        if short:
            raise self._save_failed(step, OSError(errno.ENOSPC, f"No space left on device: {free / 2**20:.0f} MiB "
                                                  f"free, a step takes about {need / 2**20:.0f} MiB",
                                                  str(self.directory)))

    def wait(self):
        """Block until the save in flight has committed; raise :class:`CheckpointError` if it failed."""
        step, self._in_flight = self._in_flight, None
        try:
            with _quiet():
                self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the background save's error, one line naming the step
            raise self._save_failed(step, e) from None

    def _save_failed(self, step: int | None, e: BaseException) -> CheckpointError:
        self._failed = True
        with _quiet():
            _join_orbax_threads()
        moved = ""
        if step is not None and self.step_dir(step).is_dir() and jax.process_index() == 0:
            # Orbax may still commit a step whose metadata write failed: a save that reported an
            # error is never trusted (kept for inspection, out of the resume's way).
            moved = f"; the partly written step was moved to {self._move_aside(step)}"
        intact = [s for s in _steps(self.directory) if s != step]
        if intact:
            last = self.step_dir(intact[-1])
            try:
                verify_step(last)
                kept = f"the previous checkpoint {last} is intact (checksums verified)"
            except CheckpointCorrupt as bad:
                kept = f"the previous checkpoint is not intact either ({bad})"
        else:
            kept = "no earlier checkpoint exists"
        what = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointError(f"cannot save {what} to {self.directory}: {_cause(e)}; {kept}{moved}. The run stops "
                               f"here: free space (or fix the cause) and rerun the same command to resume")

    # -- restoring

    def restore(self, step: int, abstract_state: Any, data_iter=None):
        """Restore ``step`` into ``abstract_state`` (ShapeDtypeStructs carrying target shardings),
        after checking its checksums, and check that its float arrays are finite. Raises
        :class:`CheckpointCorrupt` for a damaged step, :class:`CheckpointError` for one that does
        not fit ``abstract_state``."""
        step_dir = self.step_dir(step)
        verify_step(step_dir)
        # Before Orbax sees it: a tree that does not fit fails there with a page-long dump.
        differs = _saved_vs_wanted(step_dir / "state", abstract_state)
        if differs:
            raise CheckpointError(f"{step_dir}: cannot be restored into this run's train state ({differs})")
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            with _quiet():
                state = self.manager.restore(step, args=ocp.args.Composite(**args))["state"]
        except Exception as e:  # noqa: BLE001 - the checksums hold: the step does not fit this run
            raise CheckpointError(f"{step_dir}: cannot be restored into this run's train state "
                                  f"({_saved_vs_wanted(step_dir / 'state', abstract_state) or _cause(e)})") from None
        _check_finite(step_dir, state)
        return state

    def restore_latest(self, abstract_state: Any, data_iter=None, *, config=None,
                       log: Callable[[str], None] = print):
        """``(step, state)`` of the newest step that restores intact, ``(None, None)`` when there is
        none saved. Each newer corrupt step is reported (one line each) and moved to
        ``<workdir>/rejected_checkpoints/``; when every step is corrupt, :class:`CheckpointCorrupt`.
        A step that does not fit ``abstract_state`` raises :class:`CheckpointError`, naming the keys
        where ``config`` differs from the run's ``<workdir>/config.json``."""
        rejected = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore(step, abstract_state, data_iter)
            except CheckpointCorrupt as e:
                log(f"checkpoint rejected: {e}")
                rejected.append(step)
                continue
            except CheckpointError as e:
                changed = config_changes(self.workdir / "config.json", config) if config is not None else []
                if not changed:
                    raise
                raise CheckpointError(f"{e}; the config differs from {self.workdir / 'config.json'} in: "
                                      + ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
                                      + " (resume with the run's config, or train in a new workdir)") from None
            if rejected:
                self._set_aside(rejected)
                log(f"resuming from step {step}, the newest intact checkpoint (rejected steps "
                    f"{', '.join(map(str, rejected))} moved to {self.workdir / 'rejected_checkpoints'})")
            return step, state
        if rejected:
            raise CheckpointCorrupt(f"{self.directory}: no intact checkpoint (steps {', '.join(map(str, rejected))} "
                                    f"rejected, see above); move the directory away to train from scratch")
        return None, None

    def _move_aside(self, step: int) -> Path:
        out = self.workdir / "rejected_checkpoints"
        out.mkdir(exist_ok=True)
        dst, n = out / str(step), 1
        while dst.exists():
            dst, n = out / f"{step}.{n}", n + 1
        shutil.move(str(self.step_dir(step)), str(dst))
        return dst

    def _set_aside(self, steps: Iterable[int]):
        if jax.process_index() == 0:
            for step in steps:
                self._move_aside(step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ivcr_jax:rejected_checkpoints")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self):
        if self._failed:
            return   # reported, and the manager closed, when the save failed
        try:
            self.wait()
        finally:
            with _quiet():
                self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # Also when the body raises: a save in flight completes, so the last checkpoint is kept.
        try:
            self.close()
        except CheckpointError:
            if exc is None and not self._failed:
                raise
        # (an error of the body, or a save failure already raised, is the one reported)


def _join_orbax_threads(timeout: float = 120.0):
    """After a failed save, let Orbax's other background writers (they fail too, on a full disk)
    end while the interpreter is alive: otherwise they log tracebacks as the process exits."""
    for t in threading.enumerate():
        if t is not threading.current_thread() and type(t).__module__.startswith("orbax."):
            with contextlib.suppress(Exception):   # Orbax's threads re-raise their error on join
                t.join(timeout)


def _saved_vs_wanted(state_dir: Path, abstract_state: Any) -> str:
    """How the train state saved in ``state_dir`` differs from ``abstract_state``: counts and the
    first few paths missing, unexpected or of another shape ("" when that cannot be told)."""
    try:
        with _quiet():
            md = ocp.PyTreeCheckpointer().metadata(state_dir)
        tree = getattr(getattr(md, "item_metadata", md), "tree", getattr(md, "item_metadata", md))
        # (an nnx.Variable inside an optimizer state is saved as ".../<name>/value")
        saved = {path_str(p).removesuffix("/value"): tuple(getattr(x, "shape", ()) or ())
                 for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    except Exception:  # noqa: BLE001 - a best-effort explanation; the caller has the cause
        return ""
    wanted = {path_str(p).removesuffix("/value"): tuple(x.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    missing = [k for k in wanted if k not in saved]
    unexpected = [k for k in saved if k not in wanted]
    shaped = [f"{k} (saved {saved[k]}, now {wanted[k]})" for k in wanted if k in saved and saved[k] != wanted[k]]
    parts = [f"{label} {len(v)}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}"
             for label, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)) if v]
    return "; ".join(parts)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a concrete tree: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


# ----------------------------------------------------------------------------- reading weights back

def _steps(d: Path) -> list[int]:
    return sorted(int(c.name) for c in d.iterdir() if c.is_dir() and c.name.isdigit() and (c / "state").is_dir())


def find_step_dir(path: str | Path) -> Path:
    """The step directory (holding ``state/``) for a workdir, a ``checkpoints/`` dir or a step dir."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    if (p / "state").is_dir():
        return p
    for d in (p / "checkpoints", p):
        if d.is_dir():
            steps = _steps(d)
            if steps:
                return d / str(steps[-1])
    raise CheckpointError(f"{p}: neither a converted checkpoint (ivcr_meta.json) nor a training workdir "
                          f"(no complete <workdir>/checkpoints/<step>/state)")


def load_trainable(model: nnx.Module, checkpoint: str | Path, trainable: Iterable[str]) -> int:
    """Restore the trainable parameters (``trainable``: the config's regexes) of a training
    checkpoint into ``model`` in place. Returns the step. A step whose checksums fail or whose
    parameters are not finite is refused (:class:`CheckpointCorrupt`), never loaded."""
    step_dir = find_step_dir(checkpoint)
    state_dir = (step_dir / "state").absolute()
    verify_step(step_dir)
    try:
        with _quiet():   # orbax also warns about an absent per-item metadata file
            md = ocp.PyTreeCheckpointer().metadata(state_dir)
    except Exception as e:  # noqa: BLE001 - one line naming the directory
        raise CheckpointError(f"{state_dir}: unreadable train state metadata ({_cause(e)})") from None
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or "params" not in tree:
        raise CheckpointError(f"{state_dir}: not an ivcr_jax train state (no 'params' entry)")
    # nnx.Variable leaves are saved as ".../<name>/value".
    saved = {k.removesuffix("/value"): (k, v) for k, v in flatten_paths(tree["params"]).items()}
    targets = flat_state(model, trainable_filter(trainable))
    check_flat(str(state_dir), {k: v for k, (_, v) in saved.items()}, targets)
    abstract = {}
    for k, var in targets.items():
        x = var.get_value()
        abstract[saved[k][0]] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    item = {"params": nest_paths(abstract)}
    try:
        with _quiet():
            restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    except Exception as e:  # noqa: BLE001 - one line naming the directory
        raise CheckpointError(f"{state_dir}: cannot be restored ({_cause(e)})") from None
    _check_finite(step_dir, restored["params"])
    for k, arr in flatten_paths(restored["params"]).items():
        targets[k.removesuffix("/value")][...] = arr
    return int(step_dir.name) if step_dir.name.isdigit() else -1


def load_weights(model: nnx.Module, checkpoint: str | Path | None, *, base: str = "",
                 trainable: Iterable[str] = (), seed: int = 0) -> str:
    """Load ``checkpoint`` (a converted dir or a training run) into ``model``; returns a description.

    ``base`` (``config.init.converted``) is loaded under a training checkpoint's trainable
    parameters; without it the model keeps its random initialisation (of ``seed``, said in the
    description). ``checkpoint=None`` loads only the base.
    """
    if checkpoint is not None and is_converted(checkpoint):
        load_into(model, checkpoint)
        return f"converted weights {checkpoint}"
    if base:
        load_into(model, base)
    what = f"base {base}" if base else f"base: random initialisation (seed {seed})"
    if checkpoint is None:
        return what
    step = load_trainable(model, checkpoint, trainable)
    return f"trainable parameters of step {step} from {find_step_dir(checkpoint)} over {what}"
