"""Two ``jax.distributed`` processes on CPU train exactly like one process with the same global batch.

Both setups use a mesh ``data=2`` over two CPU devices: one process holding two (fake) devices, or
two processes holding one each, coordinated through ``JAX_COORDINATOR_ADDRESS`` (gloo collectives).
Each process reads its own block of every global batch, so the global batches — and the losses —
are the same. The two-process run is also stopped after step 2 and resumed (every process restores
its own Grain iterator state from the shared checkpoint).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
               JAX_COMPILATION_CACHE_DIR=os.environ.get("IVCR_TEST_JAX_CACHE", "/tmp/ivcr_jax_test_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    env.update(extra)
    return env


def _cmd(corpus, workdir, max_steps):
    return [sys.executable, "-m", "ivcr_jax.train", "--config", "configs/demo.py",
            "--workdir", str(workdir), f"--config.data.annotations={corpus}/ivcr.json",
            "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.train.ckpt_every=2",
            "--config.train.log_every=1", "--config.train.eval_every=0",   # a row per step, no monitor
            "--config.model.llm.layers=1",             # a smaller graph: 3 runs compile the step
            f"--max_steps={max_steps}"]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(cmds, logs, **extra_env):
    """Run one ``jax.distributed`` process per command (process i: ``cmds[i]``), its output to
    ``logs[i]`` (a full pipe would stall a process inside a collective while the other waits for
    it); assert that every one exits 0 and return their outputs."""
    addr = f"localhost:{_free_port()}"
    procs = []
    for i, (cmd, log) in enumerate(zip(cmds, logs)):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(
                cmd, cwd=ROOT, text=True, stdout=f, stderr=subprocess.STDOUT,
                env=_env(XLA_FLAGS="", JAX_COORDINATOR_ADDRESS=addr, JAX_NUM_PROCESSES=str(len(cmds)),
                         JAX_PROCESS_ID=str(i), **extra_env)))
    try:
        for p in procs:
            p.wait(timeout=900)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [log.read_text() for log in logs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
    return outs


def _two_processes(corpus, workdir, max_steps):
    """Both processes of one training run."""
    logs = [workdir.parent / f"{workdir.name}_{max_steps}_p{i}.log" for i in range(2)]
    return run_processes([_cmd(corpus, workdir, max_steps)] * 2, logs)


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss/lm"], r["loss"], r["grad_norm"]) for r in rows]


def test_two_processes_match_one_process_and_resume(demo_corpus, tmp_path):
    one = tmp_path / "one"
    r = subprocess.run(_cmd(demo_corpus, one, STEPS), cwd=ROOT, text=True, capture_output=True,
                       timeout=900, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]

    two = tmp_path / "two"
    _two_processes(demo_corpus, two, 2)          # stops after step 2 (checkpoint saved)
    outs = _two_processes(demo_corpus, two, STEPS)   # resumes at step 2
    assert "start step 2" in outs[0] + outs[1]

    expected = _losses(one)
    assert [s for s, *_ in expected] == list(range(1, STEPS + 1))
    assert _losses(two) == expected
