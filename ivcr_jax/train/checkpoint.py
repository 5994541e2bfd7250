"""Checkpoints with Orbax: train state (trainable params, optimizer state, step, RNG) and the
Grain iterator in one step directory, saved asynchronously, the last N kept.

Orbax writes each step into a temporary directory and renames it only when every item is
complete, so an interrupted save is never listed by ``latest_step()`` and never restored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
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
            import grain
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, data_iter=None):
        """Restore into ``abstract_state`` (ShapeDtypeStructs carrying target shardings)."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            import grain
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return out["state"]

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
