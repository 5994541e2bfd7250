"""``jax.distributed`` initialisation for TPU pods, SLURM, generic GPU clusters and CPU tests.

* TPU pods, SLURM and Open MPI: ``jax.distributed.initialize()`` discovers everything itself.
* Generic GPU clusters: the coordinator comes from environment variables
  ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
  (MaxText's ``initialize_jax_for_gpu`` convention).
* CPU (tests): the same variables; collectives go through gloo.
Call :func:`initialize` before any other JAX call. Single-process runs need nothing.

Every process runs the same program. The helpers below are what a multi-process program needs
around that: :func:`is_writer` (only process 0 writes a run's files), :func:`spans_processes`
(whether a mesh's computations are collective, so every process must call them with equally
shaped global inputs) and :func:`allgather` (one small host-side all-gather, e.g. to agree a
data-dependent shape, as the training input agrees its text length).
"""
from __future__ import annotations

import os

import jax
import numpy as np


_INITIALISED = False


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def detect() -> str:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    if os.environ.get("SLURM_JOB_ID") and _env_int("SLURM_NTASKS") and _env_int("SLURM_NTASKS") > 1:
        return "slurm"
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if _env_int("OMPI_COMM_WORLD_SIZE") and _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return "mpi"
    return "single"


def initialize(mode: str = "auto", *, compilation_cache: str | None = None) -> str:
    """Initialise multi-process JAX if the environment asks for it; returns the mode used."""
    if compilation_cache:
        jax.config.update("jax_compilation_cache_dir", compilation_cache)
    global _INITIALISED
    mode = detect() if mode == "auto" else mode
    if mode == "single" or _INITIALISED:
        return mode
    if mode == "env":
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=_env_int("JAX_NUM_PROCESSES"),
                      process_id=_env_int("JAX_PROCESS_ID"))
        if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        if local:
            kwargs["local_device_ids"] = [int(x) for x in local.split(",")]
        jax.distributed.initialize(**kwargs)
    else:  # tpu / slurm / mpi: auto-detected by JAX
        jax.distributed.initialize()
    _INITIALISED = True
    return mode


def is_writer() -> bool:
    """Whether this process writes the run's files (predictions, metrics, reports, checkpoints'
    side files): process 0, so every single-process run."""
    return jax.process_index() == 0


def spans_processes(mesh) -> bool:
    """Whether ``mesh`` holds devices of more than one process (its computations are collective:
    every process must run them, with global inputs of one agreed shape)."""
    if mesh is None:
        return False
    return len({d.process_index for d in np.asarray(mesh.devices).flat}) > 1


def allgather(x) -> np.ndarray:
    """``[process_count, *x.shape]``: every process's (small, host) ``x``, on every process.

    One collective over all processes (each must call it, in the same order); a single process
    gets ``x[None]`` without one.
    """
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))
