"""SIGTERM (preemption, SLURM time limit) → the trainer saves the current step and exits cleanly."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ivcr_jax.checkpoints import Checkpointer

ROOT = Path(__file__).resolve().parent.parent


def test_sigterm_saves_the_current_step_and_exits_cleanly(demo_corpus, tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               JAX_COMPILATION_CACHE_DIR=os.environ.get("IVCR_TEST_JAX_CACHE", "/tmp/ivcr_jax_test_cache"))
    work = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "ivcr_jax.train", "--config", "configs/demo.py",
                          "--workdir", str(work), f"--config.data.annotations={demo_corpus}/ivcr.json",
                          "--config.train.steps=1000", "--config.train.ckpt_every=1000"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = work / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    assert p.poll() is None, p.communicate()[0][-3000:]
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
    last = json.loads(log.read_text().splitlines()[-1])["step"]
    assert Checkpointer(work).latest_step() == last < 1000
    assert "SIGTERM" in out
