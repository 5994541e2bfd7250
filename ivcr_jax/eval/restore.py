"""Load weights for evaluation and chat: a converted directory, or a training run's checkpoint.

``--checkpoint`` may name

* a directory written by ``python -m ivcr_jax.convert`` (``ivcr_meta.json`` + ``params/``): every
  parameter is loaded from it;
* a training workdir (``<workdir>/checkpoints/<step>/state``), its ``checkpoints/`` directory, or one
  step directory: the latest complete step (or the one named) is read. A training checkpoint holds
  only the trainable parameters (``config.trainable``) besides the optimizer state; they are
  restored over the base weights that training started from: ``config.init.converted`` when set,
  else the random initialisation of ``config.seed`` (what ``ivcr_jax.train.loop`` builds, so a
  randomly initialised frozen part is reproduced exactly).

Only the ``params`` subtree of the train state is read (Orbax partial restore): the Adam moments are
never loaded. Keys and shapes are checked first; a mismatch raises ``CheckpointMismatch`` naming the
directory and listing the keys.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from ivcr_jax.models.params import CheckpointError, check_flat, flat_state

__all__ = ["find_step_dir", "load_trainable", "load_weights"]
from ivcr_jax.convert.store import flatten_paths, nest_paths


def _is_converted(p: Path) -> bool:
    return (p / "ivcr_meta.json").is_file()


def _steps(d: Path) -> list[int]:
    # Orbax renames a step's temporary directory to the bare step number only once it is complete.
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


def load_trainable(model: nnx.Module, checkpoint: str | Path, config) -> int:
    """Restore the trainable parameters of a training checkpoint into ``model`` in place.

    ``checkpoint``: a workdir, its ``checkpoints/`` directory or a step directory. The parameters
    are those ``ivcr_jax.models.params.trainable_filter(config.trainable)`` selects. Returns the step.
    """
    import orbax.checkpoint as ocp

    from ivcr_jax.models.params import trainable_filter

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
    targets = flat_state(model, trainable_filter(config.trainable))
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


def load_weights(model: nnx.Module, checkpoint: str | Path | None, config) -> str:
    """Load ``checkpoint`` (converted dir or training run) into ``model``; returns a description.

    ``None`` loads only the base weights (``config.init.converted``, else keeps the random init).
    """
    from ivcr_jax.models.build import load_converted

    base = str(config.init.get("converted", "") or "") if "init" in config else ""
    if checkpoint is not None and _is_converted(Path(checkpoint)):
        load_converted(model, checkpoint)
        return f"converted weights {checkpoint}"
    if base:
        load_converted(model, base)
    what = f"base {base}" if base else f"base: random initialisation (seed {config.seed})"
    if checkpoint is None:
        return what
    step = load_trainable(model, checkpoint, config)
    return f"trainable parameters of step {step} from {find_step_dir(checkpoint)} over {what}"
