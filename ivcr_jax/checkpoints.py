"""What a run writes and how it is read back: resume (training), evaluation, chat, export.

A training workdir::

    <workdir>/checkpoints/<step>/state/   train state: {"params", "opt", "step", "rng"} (Orbax)
    <workdir>/checkpoints/<step>/data/    the Grain iterator (resumes the input stream exactly)
    <workdir>/metrics.jsonl  tensorboard/  loss.png   logs (``train/logging.py``)
    <workdir>/eval_<split>/                the default output of ``python -m ivcr_jax.eval``

Orbax writes each step into a temporary directory and renames it to the bare step number only
when every item is complete, so an interrupted save is never listed and never restored.

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

import logging
from pathlib import Path
from typing import Any, Iterable

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from ivcr_jax.convert.store import flatten_paths, load_into, nest_paths
from ivcr_jax.models.params import CheckpointError, check_flat, flat_state, trainable_filter

__all__ = ["Checkpointer", "abstract_like", "checkpoint_dir", "default_eval_dir", "find_step_dir",
           "is_converted", "load_trainable", "load_weights"]


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def is_converted(path: str | Path) -> bool:
    return (Path(path) / "ivcr_meta.json").is_file()


def default_eval_dir(checkpoint: str | Path | None, split: str) -> Path:
    """``<workdir>/eval_<split>`` for a training run, else ``./eval_<split>``."""
    if checkpoint and not is_converted(checkpoint):
        return Path(checkpoint) / f"eval_{split}"
    return Path(f"eval_{split}")


# ----------------------------------------------------------------------------- training: save, resume

class Checkpointer:
    """Train state and Grain iterator of each saved step, asynchronously, the last ``keep`` kept."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter=None, *, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, data_iter=None):
        """Restore into ``abstract_state`` (ShapeDtypeStructs carrying target shardings)."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # Also when the body raises: a save in flight completes, so the last checkpoint is kept.
        self.close()


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
    checkpoint into ``model`` in place. Returns the step."""
    step_dir = find_step_dir(checkpoint)
    state_dir = (step_dir / "state").absolute()
    ckptr = ocp.PyTreeCheckpointer()
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns about an absent per-item metadata file
    try:
        md = ckptr.metadata(state_dir)
    finally:
        absl_logger.setLevel(level)
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
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
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
