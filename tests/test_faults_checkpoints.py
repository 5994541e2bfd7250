"""Checkpoint faults (issue 14, items 2 and 6): a damaged step is never used, training falls back to
the newest intact one, evaluation refuses it naming the path, a resume with another model config
names the changed keys, and a save that runs out of disk keeps the previous step and stops."""
import errno
import json
import os
import shutil
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from ivcr_jax import checkpoints
from ivcr_jax.checkpoints import MANIFEST, Checkpointer, abstract_like, verify_step
from ivcr_jax.cli import load_config
from ivcr_jax.eval.__main__ import main as eval_main
from ivcr_jax.experiment import Experiment
from ivcr_jax.models.params import CheckpointCorrupt, CheckpointError
from ivcr_jax.train.loop import non_finite_message, train


# ----------------------------------------------------------------------------- a tiny train state

def _state(scale=1.0):
    return {"params": {"a": jnp.arange(10.0) * scale, "b": {"c": jnp.ones((3, 4)) * scale}},
            "opt": (jnp.zeros(2), {"mu": jnp.ones(3)}), "step": jnp.int32(3)}


def _two_steps(work, *, async_save=True, second=None):
    with Checkpointer(work, async_save=async_save) as ck:
        ck.save(4, _state(1.0), force=True)
        ck.save(8, second if second is not None else _state(2.0), force=True)
    return checkpoints.checkpoint_dir(work)


def _data_file(step_dir: Path) -> Path:
    """The largest array data file of the step (OCDBT ``d/`` files)."""
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _flip(f: Path):
    b = bytearray(f.read_bytes())
    for i in range(0, len(b), max(len(b) // 32, 1))[:32]:   # 32 bytes flipped across the file
        b[i] ^= 0xFF
    f.write_bytes(bytes(b))


def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


CORRUPTIONS = {
    "bit-flipped data file": (lambda d: _flip(_data_file(d)), "does not match its SHA-256 checksum"),
    "truncated data file": (lambda d: _truncate(_data_file(d)), "bytes, "),
    "state item deleted": (lambda d: shutil.rmtree(d / "state"), "is missing"),
    "no checksum file": (lambda d: (d / MANIFEST).unlink(), f"no {MANIFEST}"),
    "garbled checksum file": (lambda d: (d / MANIFEST).write_text("{not json"), "unreadable checksum file"),
}


def test_every_saved_step_carries_the_checksums_of_its_files(tmp_path):
    ckdir = _two_steps(tmp_path)
    for step in (4, 8):
        m = json.loads((ckdir / str(step) / MANIFEST).read_text())["files"]
        on_disk = {p.relative_to(ckdir / str(step)).as_posix() for p in (ckdir / str(step)).rglob("*") if p.is_file()}
        assert set(m) == on_disk - {MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"}
        assert any(k.startswith("state/") and "/d/" in k for k in m)
        verify_step(ckdir / str(step))
    # A synchronous save is checksummed the same way.
    ckdir = _two_steps(tmp_path / "sync", async_save=False)
    verify_step(ckdir / "8")


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_latest_step_is_reported_and_the_previous_one_restored(tmp_path, case):
    damage, cause = CORRUPTIONS[case]
    ckdir = _two_steps(tmp_path)
    damage(ckdir / "8")
    lines = []
    ck = Checkpointer(tmp_path)
    step, state = ck.restore_latest(abstract_like(_state()), log=lines.append)
    ck.close()
    assert step == 4
    np.testing.assert_array_equal(np.asarray(state["params"]["a"]), np.arange(10.0))
    assert len(lines) == 2 and "\n" not in "".join(lines)
    assert lines[0].startswith(f"checkpoint rejected: {ckdir / '8'}") and cause in lines[0], lines[0]
    assert "resuming from step 4" in lines[1]
    # Kept for inspection, out of the way of the step 8 the resumed run saves again.
    assert sorted(os.listdir(ckdir)) == ["4"] and (tmp_path / "rejected_checkpoints" / "8").is_dir()


def test_a_step_holding_nan_is_rejected_though_its_checksums_hold(tmp_path):
    bad = _state(2.0)
    bad["opt"][1]["mu"] = jnp.array([1.0, jnp.nan, 1.0])
    ckdir = _two_steps(tmp_path, second=bad)
    lines = []
    step, _ = Checkpointer(tmp_path).restore_latest(abstract_like(_state()), log=lines.append)
    assert step == 4
    assert f"{ckdir / '8'}: 1 restored arrays hold NaN or inf: opt/1/mu" in lines[0]


def test_every_step_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    ckdir = _two_steps(tmp_path)
    for step in (4, 8):
        _flip(_data_file(ckdir / str(step)))
    lines = []
    with pytest.raises(CheckpointCorrupt, match=r"checkpoints: no intact checkpoint \(steps 8, 4 rejected"):
        Checkpointer(tmp_path).restore_latest(abstract_like(_state()), log=lines.append)
    assert len(lines) == 2 and sorted(os.listdir(ckdir)) == ["4", "8"]   # nothing moved, nothing lost


def test_a_state_of_another_shape_names_the_directory_and_the_keys(tmp_path):
    _two_steps(tmp_path)
    other = _state()
    other["params"]["a"] = jnp.zeros(12)
    other["params"]["z"] = jnp.zeros(1)
    with pytest.raises(CheckpointError) as e:
        Checkpointer(tmp_path).restore_latest(abstract_like(other))
    msg = str(e.value)
    assert not isinstance(e.value, CheckpointCorrupt)
    assert "checkpoints/8: cannot be restored into this run's train state" in msg
    assert "missing 1: params/z" in msg and "params/a (saved (10,), now (12,))" in msg
    assert len(msg) < 400 and "\n" not in msg


def _enospc_on(monkeypatch, step):
    """Every Python-side write into ``step``'s temporary directory fails: the disk is full."""
    cls = type(epath.Path("/"))
    orig = {name: getattr(cls, name) for name in ("write_text", "write_bytes")}

    def full(name):
        def write(self, *a, **k):
            if f"/{step}.orbax-checkpoint-tmp" in str(self):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return orig[name](self, *a, **k)
        return write
    for name in orig:
        monkeypatch.setattr(cls, name, full(name))


@pytest.mark.parametrize("async_save", [True, False])
def test_a_save_that_fills_the_disk_keeps_the_previous_step_and_says_so(tmp_path, monkeypatch, async_save):
    ck = Checkpointer(tmp_path, async_save=async_save)
    ck.save(4, _state(1.0), force=True)
    ck.wait()
    _enospc_on(monkeypatch, 8)
    with pytest.raises(CheckpointError) as e:
        with ck:
            ck.save(8, _state(2.0), force=True)
            ck.wait()
    msg = str(e.value)
    assert msg.startswith(f"cannot save step 8 to {tmp_path / 'checkpoints'}: No space left on device (ENOSPC)")
    assert f"the previous checkpoint {tmp_path / 'checkpoints' / '4'} is intact (checksums verified)" in msg
    assert "\n" not in msg
    monkeypatch.undo()
    ck = Checkpointer(tmp_path)      # the next run: step 4, verified; the partial save cleaned up
    assert ck.latest_step() == 4
    step, state = ck.restore_latest(abstract_like(_state()))
    ck.close()
    # Only step 4 is a step. (In this one process TensorStore's writers of the failed async save can
    # still recreate a file under 8.orbax-checkpoint-tmp after the cleanup; a real rerun is a new
    # process, and its Checkpointer removes the directory.)
    assert step == 4 and [d for d in sorted(os.listdir(tmp_path / "checkpoints"))
                          if not d.endswith(".orbax-checkpoint-tmp")] == ["4"]
    np.testing.assert_array_equal(np.asarray(state["params"]["a"]), np.arange(10.0))


def test_a_disk_without_room_for_another_step_stops_before_orbax_writes(tmp_path, monkeypatch):
    """Checked before the save starts (a step is about the size of the last one): no partial step,
    no background writer failing mid-way, the previous step untouched."""
    ck = Checkpointer(tmp_path)
    ck.save(4, _state(1.0), force=True)
    ck.wait()
    size = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / "4").rglob("*") if f.is_file())
    real = shutil.disk_usage
    monkeypatch.setattr(checkpoints.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=size // 2))
    with pytest.raises(CheckpointError) as e:
        with ck:
            ck.save(8, _state(2.0), force=True)
    msg = str(e.value)
    assert msg.startswith(f"cannot save step 8 to {tmp_path / 'checkpoints'}: No space left on device")
    assert "(ENOSPC)" in msg and "a step takes about" in msg and "\n" not in msg
    assert f"the previous checkpoint {tmp_path / 'checkpoints' / '4'} is intact (checksums verified)" in msg
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_a_tensorstore_disk_full_error_reads_as_enospc():
    e = ValueError('RESOURCE_EXHAUSTED: Error writing "opt.1.mu.x/0.0" in OCDBT database at local file '
                   '"/w/checkpoints/10.orbax-checkpoint-tmp/state/ocdbt.process_0/": Failed writing: '
                   '"/w/checkpoints/10.orbax-checkpoint-tmp/state/d/abc" [OS error 28: No space left on device]')
    assert checkpoints._cause(e) == ("No space left on device (ENOSPC): "
                                     "/w/checkpoints/10.orbax-checkpoint-tmp/state/ocdbt.process_0/")


def test_closed_event_loop_echoes_are_dropped_and_other_errors_printed(capsys):
    import sys
    checkpoints._drop_closed_loop_callbacks()   # what every Checkpointer installs
    sys.excepthook(RuntimeError, RuntimeError("Event loop is closed"), None)
    assert capsys.readouterr().err == ""
    sys.excepthook(KeyError, KeyError("other"), None)
    assert "KeyError" in capsys.readouterr().err
    seen = []
    hook, sys.unraisablehook = sys.unraisablehook, seen.append
    try:   # a hook installed before ours (pytest's, here) still gets every other unraisable error
        checkpoints._HOOKED["excepthook"] = None
        checkpoints._drop_closed_loop_callbacks()
        for err in (RuntimeError("Event loop is closed"), KeyError("other")):
            sys.unraisablehook(types.SimpleNamespace(exc_type=type(err), exc_value=err, exc_traceback=None,
                                                     err_msg=None, object=None))
    finally:
        sys.unraisablehook, checkpoints._HOOKED["excepthook"] = hook, None
        checkpoints._drop_closed_loop_callbacks()
    assert [type(u.exc_value) for u in seen] == [KeyError]


def test_the_non_finite_message_after_a_resume_says_a_restart_repeats_it(tmp_path):
    _two_steps(tmp_path)
    ck = Checkpointer(tmp_path)
    m = {"loss": float("nan"), "grad_norm": float("inf")}
    assert "diverged on its first step" in non_finite_message(9, m, 8, ck)
    assert "diverged" not in non_finite_message(12, m, 8, ck)
    assert "last good checkpoint (step 8)" in non_finite_message(12, m, 8, ck)
    ck.close()


# ----------------------------------------------------------------------------- the real trainer

def _config(corpus, **over):
    c = load_config("configs/demo.py")
    c.data.annotations = str(Path(corpus) / "ivcr.json")
    c.train.update(dict(steps=8, ckpt_every=4, warmup_steps=2, log_every=1, eval_every=0), **over)
    c.trainable = load_config("configs/paper.py:tiny").trainable   # LoRA over a frozen LLM: a small state
    c.mesh.update(data=2, num_devices=2)
    return c


@pytest.fixture(scope="module")
def run8(demo_corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("run8")
    out = train(Experiment.resolve(_config(demo_corpus)), work, progress=False)
    return work, [h["loss/lm"] for h in out["history"]]


def test_training_resumes_from_the_previous_step_when_the_latest_is_corrupt(demo_corpus, run8, tmp_path, capsys):
    src, losses = run8
    work = tmp_path / "run"
    shutil.copytree(src, work)
    _flip(_data_file(work / "checkpoints" / "8"))
    capsys.readouterr()
    out = train(Experiment.resolve(_config(demo_corpus)), work, progress=False)
    text = capsys.readouterr().out
    assert f"checkpoint rejected: {work / 'checkpoints' / '8'}: corrupt" in text
    assert "resuming from step 4" in text
    # Steps 5-8 again, with the losses of the uninterrupted run; step 8 is saved afresh.
    assert [h["step"] for h in out["history"]] == [5, 6, 7, 8]
    assert [h["loss/lm"] for h in out["history"]] == losses[4:]
    verify_step(work / "checkpoints" / "8")


def test_eval_refuses_a_corrupt_checkpoint_naming_it(demo_corpus, run8, tmp_path, capsys):
    src, _ = run8
    work = tmp_path / "run"
    shutil.copytree(src, work)
    _truncate(_data_file(work / "checkpoints" / "8"))
    exp = Experiment.resolve(_config(demo_corpus))
    with pytest.raises(CheckpointCorrupt, match=f"{work / 'checkpoints' / '8'}: corrupt"):
        exp.load_model(str(work))
    capsys.readouterr()
    rc = eval_main(["--config", "configs/demo.py", "--checkpoint", str(work), "--out", str(tmp_path / "e"),
                    f"--config.data.annotations={demo_corpus}/ivcr.json", "--max-samples", "1", "--no-charts"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == [err.strip()] and f"{work / 'checkpoints' / '8'}: corrupt" in err
    assert "Traceback" not in err and not (tmp_path / "e" / "metrics.json").exists()


def test_resuming_with_another_model_config_names_the_changed_keys(demo_corpus, run8, tmp_path):
    src, _ = run8
    work = tmp_path / "run"
    shutil.copytree(src, work)
    with pytest.raises(CheckpointError) as e:
        train(Experiment.resolve(_other_model(demo_corpus)), work, progress=False)
    msg = str(e.value)
    assert f"{work / 'checkpoints' / '8'}: cannot be restored" in msg
    assert "model.lora.rank (8 -> 4)" in msg and "config.json" in msg
    assert len(msg) < 1500 and "\n" not in msg


def _other_model(corpus):
    c = _config(corpus)
    c.model.lora.rank = 4
    return c


def test_eval_with_another_model_config_is_one_line_naming_the_changed_keys(demo_corpus, run8, tmp_path, capsys):
    src, _ = run8
    rc = eval_main(["--config", "configs/demo.py", "--checkpoint", str(src), "--out", str(tmp_path / "e"),
                    f"--config.data.annotations={demo_corpus}/ivcr.json", "--max-samples", "1", "--no-charts",
                    "--config.trainable=" + repr(tuple(_config(demo_corpus).trainable)), "--config.model.lora.rank=4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and err.splitlines() == [err]
    assert "does not match the model: mis-shaped keys" in err
    assert f"this config differs from {src / 'config.json'} in: model.lora.rank (8 -> 4)" in err
