"""Process-level XLA settings for running on CPU hosts (benchmarks, CPU-only training and tests).

XLA reads ``XLA_FLAGS`` once, when jax creates its first backend, so these settings must be put in
place before the first jax computation of the process; :func:`configure` does that and refuses
(with a warning) once a backend exists. Nothing here runs on import, and nothing else in the
package calls it: GPU/TPU users never get these flags unless they ask for them. The flags are
``xla_cpu_*`` options, which only change how XLA compiles for the CPU backend.

This module imports nothing from jax, so it can be imported (and :func:`configure` called) first::

    from ivcr_jax import cpu
    cpu.configure()          # before the first jax computation
    import jax

``docs/benchmarks.md`` ("LLaMA against HF transformers + peft (CPU)") gives the measurements
behind :data:`XLA_CPU_FLAGS`.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Sequence

# What ``configure()`` adds by default (measured with benchmarks/llama_bench.py; see
# docs/benchmarks.md). Empty: none of the flags tried beat XLA's own CPU defaults (YNNPACK dots and
# reductions) — Eigen dots (``--xla_cpu_experimental_ynn_fusion_type=``), YNN dots only,
# ``--xla_cpu_enable_fast_math``, ``--xla_cpu_prefer_vector_width=512``, the legacy emitters; the
# XNNPACK and oneDNN fusion flags change nothing in this jaxlib.
XLA_CPU_FLAGS: tuple[str, ...] = ()

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _flag_name(flag: str) -> str:
    return flag.lstrip("-").split("=", 1)[0]


def backend_started() -> bool:
    """Whether jax has already created a backend in this process (then new XLA_FLAGS are ignored)."""
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(xb, "_backends", None))


def configure(flags: Sequence[str] = XLA_CPU_FLAGS) -> str:
    """Append ``flags`` to ``XLA_FLAGS`` unless the user has already set the same flag there.

    Returns the resulting ``XLA_FLAGS``. A flag given explicitly in the environment wins over the
    one here, so ``XLA_FLAGS=--xla_cpu_...=x`` still overrides a default. Call it before the first
    jax computation; afterwards it warns and changes nothing.
    """
    current = os.environ.get("XLA_FLAGS", "")
    if backend_started():
        warnings.warn("ivcr_jax.cpu.configure() called after jax created its backend; "
                      "XLA_FLAGS are read only once, so the CPU settings are not applied", stacklevel=2)
        return current
    have = {_flag_name(f) for f in current.split()}
    extra = [f for f in flags if _flag_name(f) not in have]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return os.environ.get("XLA_FLAGS", "")


def reuse_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory instead of returning it to the kernel (opt-in).

    XLA:CPU allocates each execution's temporaries as one block (131 MB for the LoRA train step of
    the d512/L4/B2/T256 benchmark LLaMA, 256 MB with its 32005-word vocabulary); glibc serves such a
    block with a fresh ``mmap`` and unmaps it after the step, so every step page-faults all of it
    in again (about 62,000 faults and 0.12-0.14 s of kernel time per step there, ~15 % of the
    step's CPU). With one malloc arena, no ``mmap`` for large blocks and no trimming, the block is
    reused: 0 faults per step. The cost: the process keeps its peak heap, and every thread shares
    one arena. Call it before jax starts (its threads pick their arena when created); it is
    process-wide, so torch in the same process gains too. Returns False where glibc is absent.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if backend_started():
        warnings.warn("ivcr_jax.cpu.reuse_freed_memory() called after jax started; threads that "
                      "already have a malloc arena keep it", stacklevel=2)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    return bool(ok)
