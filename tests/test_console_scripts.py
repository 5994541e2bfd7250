"""The console scripts of setup.py (``pip install -e .``) are the ``python -m`` programs: the same
usage text and flags, the same exit status."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# script -> the module `python -m` runs
SCRIPTS = {"ivcr-train": "ivcr_jax.train", "ivcr-eval": "ivcr_jax.eval", "ivcr-chat": "ivcr_jax.chat",
           "ivcr-app": "ivcr_jax.app", "ivcr-convert": "ivcr_jax.convert", "ivcr-demo": "ivcr_jax"}


def _declared() -> dict[str, str]:
    """``{script: "module:function"}`` as setup.py declares them."""
    text = (ROOT / "setup.py").read_text()
    return dict(re.findall(r'"([\w-]+) = ([\w.]+:\w+)"', text))


def test_setup_declares_every_script_as_its_programs_main():
    declared = _declared()
    assert set(SCRIPTS) <= set(declared)
    for script, module in SCRIPTS.items():
        target = declared[script]
        assert target.split(":")[1] == "main"
        # the entry module is the one `python -m` runs: the package's __main__, or the module itself
        assert target.split(":")[0] in (module, module + ".__main__"), (script, target)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_help_is_the_module_help(script):
    module = SCRIPTS[script]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not in this checkout yet")
    exe = shutil.which(script)
    assert exe is not None, f"console script {script} is not installed: pip install -e ."
    as_script, as_module = _run([exe, "--help"]), _run([sys.executable, "-m", module, "--help"])
    assert as_module.returncode == 0, as_module.stderr[-2000:]
    assert as_script.returncode == 0, as_script.stderr[-2000:]
    assert as_script.stdout.startswith("usage: ") and as_script.stdout == as_module.stdout


def test_script_exit_status_is_the_programs(tmp_path):
    """A bad input: one line and status 2, from the script as from the module."""
    exe = shutil.which("ivcr-convert")
    assert exe is not None, "console script ivcr-convert is not installed: pip install -e ."
    flags = ["export-hf", "--checkpoint", "/nonexistent", "--out", str(tmp_path / "out")]
    for cmd in ([exe, *flags], [sys.executable, "-m", "ivcr_jax.convert", *flags]):
        r = _run(cmd)
        assert r.returncode == 2 and r.stderr.strip() == "error: /nonexistent: no such checkpoint directory " \
            "(--checkpoint: a training workdir or a step directory)", r.stderr
