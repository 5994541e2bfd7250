"""Fault injection for the weight converter and the converted-weights format (issue 14, class
"converter inputs"): every malformed input is one line naming the file (and the tensor), exit
status 2 from ``python -m ivcr_jax.convert``, no traceback; a corrupt converted directory is refused
with a ``CheckpointError`` naming the directory and the file."""
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from ivcr_jax.convert.__main__ import main as convert_main
from ivcr_jax.convert.store import load_into, save_flat
from ivcr_jax.models.params import CheckpointError
from test_convert_ivcr import sources  # noqa: F401  (tiny files in the reference key layouts)

REPO = Path(__file__).resolve().parent.parent


def _convert(sources, capsys, out, **files):
    d = sources["dir"]
    paths = dict(llama=d / "llama", eva_vit=d / "eva_vit_g.pth", instructblip=d / "instructblip.pth",
                 timechat=d / "timechat_7b.pth")
    paths.update(files)
    argv = ["ivcr", "--config", "configs/paper.py:tiny", "--out", str(out)]
    for k, v in paths.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    capsys.readouterr()
    rc = convert_main(argv)
    err = capsys.readouterr().err
    return rc, err


def _one_error_line(rc, err):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _llama_with(sources, tmp_path, *, raw=None, header=None, tensors=None):
    """A copy of the tiny LLaMA directory whose model.safetensors is changed."""
    d = tmp_path / "llama"
    shutil.copytree(sources["dir"] / "llama", d)
    st = d / "model.safetensors"
    if tensors is not None:
        sd = load_file(st)
        tensors(sd)
        save_file(sd, st, metadata={"format": "pt"})
    data = st.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    if header is not None:
        h = json.loads(data[8:8 + n])
        header(h)
        b = json.dumps(h).encode()
        data = struct.pack("<Q", len(b)) + b + data[8 + n:]
    if raw is not None:
        data = raw(data, n)
    st.write_bytes(data)
    return d, st


# ----------------------------------------------------------------------------- safetensors


def test_truncated_safetensors_names_file_and_tensor(sources, tmp_path, capsys):
    d, st = _llama_with(sources, tmp_path, raw=lambda b, n: b[:len(b) // 2])
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", llama=d))
    assert str(st) in line and "tensor model." in line and "truncated" in line
    assert not (tmp_path / "out").exists()


def _set(key, value):
    def f(h):
        h["model.norm.weight"][key] = value
    return f


@pytest.mark.parametrize("how, change, expect", [
    ("not JSON", dict(raw=lambda b, n: b[:8] + b"[" + b[9:]), "header is not JSON"),
    ("a JSON list", dict(raw=lambda b, n: struct.pack("<Q", 8) + b"[1,2,3] " + b[8 + n:]), "JSON list"),
    ("header longer than the file", dict(raw=lambda b, n: struct.pack("<Q", len(b)) + b[8:]), "header length"),
    ("offsets past the end", dict(header=_set("data_offsets", [0, 10 ** 9])), "tensor model.norm.weight: data_offsets"),
    ("shape against offsets", dict(header=_set("shape", [65])), "tensor model.norm.weight: data_offsets"),
    ("entry without dtype", dict(header=lambda h: h["model.norm.weight"].pop("dtype")),
     "tensor model.norm.weight: header entry"),
    ("unknown dtype", dict(header=_set("dtype", "Q7")), "tensor model.norm.weight has unsupported dtype 'Q7'"),
    ("overlapping tensors", dict(header=lambda h: h["model.norm.weight"].update(
        data_offsets=[0, 256])), "not a valid safetensors file"),
])
def test_corrupt_safetensors_header_names_file_and_tensor(sources, tmp_path, capsys, how, change, expect):
    d, st = _llama_with(sources, tmp_path, **change)
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", llama=d))
    assert str(st) in line and expect in line, (how, line)


def test_mis_shaped_tensor_is_reported_once_as_mis_shaped(sources, tmp_path, capsys):
    key = "model.layers.0.self_attn.q_proj.weight"
    d, st = _llama_with(sources, tmp_path, tensors=lambda sd: sd.__setitem__(key, torch.zeros(64, 32)))
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", llama=d))
    assert str(st) in line
    assert f"mis-shaped keys (1): {key} (checkpoint (64, 32), model (64, 64))" in line
    assert "missing" not in line


def test_mis_shaped_pth_tensor_names_file_and_its_key(sources, tmp_path, capsys):
    tc = torch.load(sources["dir"] / "timechat_7b.pth", weights_only=True)
    key = "Qformer.bert.encoder.layer.0.attention.self.query.weight"
    tc["model"][key] = torch.zeros(32, 64)
    torch.save(tc, tmp_path / "tc.pth")
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", timechat=tmp_path / "tc.pth"))
    assert str(tmp_path / "tc.pth") in line
    assert f"mis-shaped keys (1): {key} (checkpoint (32, 64), model (64, 64))" in line
    assert "missing" not in line


def test_missing_tensor_is_named_with_its_file(sources, tmp_path, capsys):
    key = "model.layers.1.mlp.up_proj.weight"
    d, st = _llama_with(sources, tmp_path, tensors=lambda sd: sd.pop(key))
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", llama=d))
    assert str(st) in line and f"missing keys (1): {key}" in line

    tc = torch.load(sources["dir"] / "timechat_7b.pth", weights_only=True)
    del tc["model"]["llama_proj.bias"]
    torch.save(tc, tmp_path / "tc.pth")
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", timechat=tmp_path / "tc.pth"))
    assert str(tmp_path / "tc.pth") in line and "missing keys (1): llama_proj/bias" in line


def test_integer_tensor_where_a_weight_belongs_is_refused(sources, tmp_path, capsys):
    d, st = _llama_with(sources, tmp_path, header=_set("dtype", "I32"))
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", llama=d))
    assert f"{st}: tensor model.norm.weight has dtype int32; expected a floating-point weight" in line

    tc = torch.load(sources["dir"] / "timechat_7b.pth", weights_only=True)
    tc["model"]["llama_proj.weight"] = torch.zeros(64, 64, dtype=torch.int64)
    torch.save(tc, tmp_path / "tc.pth")
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", timechat=tmp_path / "tc.pth"))
    assert f"{tmp_path / 'tc.pth'}: tensor llama_proj.weight has dtype int64" in line


def test_non_finite_weight_is_refused(sources, tmp_path, capsys):
    ev = torch.load(sources["dir"] / "eva_vit_g.pth", weights_only=True)
    ev["blocks.1.mlp.fc1.bias"][3] = float("nan")
    torch.save(ev, tmp_path / "eva.pth")
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", eva_vit=tmp_path / "eva.pth"))
    assert f"{tmp_path / 'eva.pth'}: tensor blocks.1.mlp.fc1.bias holds 1 non-finite value(s)" in line


# ----------------------------------------------------------------------------- files and .pth


def test_missing_input_is_named_before_any_work(sources, tmp_path, capsys):
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", eva_vit=tmp_path / "nope.pth"))
    assert f"{tmp_path / 'nope.pth'}: no such file or directory (--eva-vit)" in line
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", llama=tmp_path / "nodir"))
    assert f"{tmp_path / 'nodir'}: no such file or directory (--llama)" in line
    empty = tmp_path / "empty_llama"
    empty.mkdir()
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", llama=empty))
    assert f"{empty}: no config.json" in line


def _pickled_os_system(path: Path, marker: Path):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    torch.save({"model": {"x": Payload()}}, path)


@pytest.mark.parametrize("kind, expect", [
    ("a list", "expected a state dict, found list"),
    ("truncated", "not a loadable PyTorch checkpoint"),
    ("a zip of garbage", "not a loadable PyTorch checkpoint"),
    ("plain bytes", "not a loadable PyTorch checkpoint"),
    ("a pickled os.system", "not a loadable PyTorch checkpoint (torch.load with weights_only=True refused it: "
                            "Trying to load unsupported GLOBAL posix.system"),
])
def test_bad_pth_is_one_line_naming_the_file(sources, tmp_path, capsys, kind, expect):
    bad, marker = tmp_path / "bad.pth", tmp_path / "payload_ran"
    if kind == "a list":
        torch.save([torch.zeros(3)], bad)
    elif kind == "truncated":
        bad.write_bytes((sources["dir"] / "timechat_7b.pth").read_bytes()[:100_000])
    elif kind == "a zip of garbage":
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("archive/data.pkl", b"garbage" * 10)
    elif kind == "plain bytes":
        bad.write_bytes(b"\x00not a checkpoint" * 20)
    else:
        _pickled_os_system(bad, marker)
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", timechat=bad))
    assert f"{bad}: {expect}" in line
    assert "weights_only=False" not in line  # never advise the unsafe load
    assert not marker.exists()


# ----------------------------------------------------------------------------- --out


def test_existing_out_is_refused_before_any_loading(sources, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "params").mkdir(parents=True)
    # the inputs do not even exist: --out is checked first
    line = _one_error_line(*_convert(sources, capsys, out, llama=tmp_path / "nope"))
    assert f"{out}: already holds a converted checkpoint (params)" in line
    f = tmp_path / "a_file"
    f.write_text("x")
    line = _one_error_line(*_convert(sources, capsys, f, llama=tmp_path / "nope"))
    assert f"{f}: exists and is not a directory" in line
    line = _one_error_line(*_convert(sources, capsys, f / "sub", llama=tmp_path / "nope"))
    assert f"{f / 'sub'}: cannot be created ({f} is not a directory)" in line


def test_out_the_file_system_refuses_is_refused_before_any_loading(sources, tmp_path, capsys, monkeypatch):
    """/proc or a read-only mount passes the access check and still refuses the mkdir."""
    out = tmp_path / "ro" / "out"
    real = Path.mkdir

    def mkdir(self, *a, **k):
        if self == out:
            raise OSError(30, "Read-only file system", str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    line = _one_error_line(*_convert(sources, capsys, out, llama=tmp_path / "nope"))
    assert line == f"error: {out}: cannot be created (Read-only file system)"


def test_a_model_entry_that_is_not_a_state_dict_is_named(sources, tmp_path, capsys):
    bad = tmp_path / "tc.pth"
    torch.save({"model": [1, 2, 3], "epoch": 2}, bad)
    line = _one_error_line(*_convert(sources, capsys, tmp_path / "out", timechat=bad))
    assert line == f"error: {bad}: its 'model' entry is a list, not a state dict"


def test_empty_existing_out_is_used(sources, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    rc, err = _convert(sources, capsys, out)
    assert rc == 0, err
    assert (out / "ivcr_meta.json").is_file() and "files" in json.loads((out / "ivcr_meta.json").read_text())


def test_cli_error_has_no_traceback_and_debug_shows_it(sources, tmp_path, capsys):
    d, st = _llama_with(sources, tmp_path, raw=lambda b, n: b[:len(b) // 2])
    s = sources["dir"]
    argv = [sys.executable, "-m", "ivcr_jax.convert", "ivcr", "--config", "configs/paper.py:tiny",
            "--llama", str(d), "--eva-vit", str(s / "eva_vit_g.pth"), "--instructblip", str(s / "instructblip.pth"),
            "--timechat", str(s / "timechat_7b.pth"), "--out", str(tmp_path / "out")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")] == [r.stderr.strip().splitlines()[-1]]
    assert str(st) in r.stderr
    with pytest.raises(CheckpointError, match="truncated"):
        convert_main(argv[3:] + ["--debug"])


# ----------------------------------------------------------------------------- converted directories


def _model():
    return nnx.Linear(64, 32, rngs=nnx.Rngs(0))


@pytest.fixture
def converted_dir(tmp_path):
    rng = np.random.default_rng(0)
    flat = {"kernel": rng.standard_normal((64, 32)).astype(np.float32),
            "bias": rng.standard_normal(32).astype(np.float32)}
    d = tmp_path / "conv"
    save_flat(d, flat, {"recipe": "test"})
    np.testing.assert_array_equal(np.asarray(load_into(_model(), d).kernel.get_value()), flat["kernel"])
    return d


def _largest_data_file(d: Path) -> Path:
    return max((p for p in (d / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _flip(p: Path):
    b = bytearray(p.read_bytes())
    for i in range(len(b) // 3, len(b) // 3 + 32):
        b[i] ^= 0xFF
    p.write_bytes(bytes(b))


def _drop_checksums(d: Path):
    meta = json.loads((d / "ivcr_meta.json").read_text())
    del meta["files"]
    (d / "ivcr_meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("fault, expect", [
    ("bit flips in a data file", "does not match its SHA-256 checksum"),
    ("a truncated data file", "when written (truncated or replaced)"),
    ("a deleted _METADATA", "params/_METADATA is missing"),
    ("ivcr_meta.json not JSON", "ivcr_meta.json: not valid JSON"),
    ("no ivcr_meta.json", "not a converted ivcr_jax checkpoint (no ivcr_meta.json"),
    # Without checksums only what the restore or the finite check sees is caught (flipped bytes in
    # Orbax's compressed, byte-shuffled data need not be either: docs/reliability.md says so).
    ("older dir, NaN written", "hold NaN/Inf after restoring"),
    ("older dir, truncated data", "could not be restored"),
    ("older dir, no _METADATA", "unreadable parameter metadata"),
])
def test_corrupt_converted_dir_is_refused_naming_dir_and_file(converted_dir, capfd, fault, expect):
    d = converted_dir
    if fault.startswith("older dir"):
        _drop_checksums(d)  # as written before checksums were recorded: the finite check remains
    data = _largest_data_file(d)
    if "bit flips" in fault:
        _flip(data)
    elif "NaN written" in fault:   # a directory written with a NaN (no checksum can flag it)
        shutil.rmtree(d)
        save_flat(d, {"kernel": np.full((64, 32), np.nan, np.float32), "bias": np.zeros(32, np.float32)}, {})
        _drop_checksums(d)
    elif "truncated" in fault:
        data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    elif "_METADATA" in fault:
        (d / "params" / "_METADATA").unlink()
    elif "not JSON" in fault:
        (d / "ivcr_meta.json").write_text("{oops")
    else:
        (d / "ivcr_meta.json").unlink()
    model = _model()
    before = np.asarray(model.kernel.get_value()).copy()
    capfd.readouterr()
    with pytest.raises(CheckpointError) as e:
        load_into(model, d)
    msg = str(e.value)
    assert str(d) in msg and expect in msg and "\n" not in msg, msg
    if "checksum" in expect or "truncated" in expect:
        assert str(data.relative_to(d)) in msg
    np.testing.assert_array_equal(np.asarray(model.kernel.get_value()), before)  # left untouched
    assert "Traceback" not in capfd.readouterr().err  # no Orbax/asyncio noise
