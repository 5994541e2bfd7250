"""Bad config values and bad command lines (issue 14, items 4 and 5): every one is a single line
``error: ...`` on stderr naming the key (or file) and what is allowed, exit status 2, before anything
is built or compiled; ``--debug`` adds the traceback; a bug keeps its traceback; chat names a bad
corpus file or ``--script`` and prints control characters from data escaped.

Nothing here compiles a model: each case fails in the config or the command line, so the file runs
in seconds (the fake 8 CPU devices of conftest.py are the devices the mesh checks count).
"""
from __future__ import annotations

import argparse
import json

import jax
import pytest

from ivcr_jax import __main__ as demo_main
from ivcr_jax import chat, cli
from ivcr_jax.eval import __main__ as eval_main
from ivcr_jax.experiment import Experiment
from ivcr_jax.retrieval import search as retrieval_search
from ivcr_jax.train import __main__ as train_main
from ivcr_jax.train import plan as plan_lib

DEMO = "configs/demo.py"
TINY = "configs/paper.py:tiny"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------ config values (item 4)

BAD_VALUES = [
    # (overrides, words the one line must hold: the key and what is allowed)
    (["train.ckpt_every=0"], ["config.train.ckpt_every", "must be positive (an integer >= 1)", "got 0"]),
    (["train.steps=-3"], ["config.train.steps", "must be positive (an integer >= 1)", "got -3"]),
    (["train.batch_size=0"], ["config.train.batch_size", "must be positive (an integer >= 1)"]),
    (["train.grad_accum=0"], ["config.train.grad_accum", "must be positive (an integer >= 1)"]),
    (["train.log_every=0"], ["config.train.log_every", "must be positive (an integer >= 1)"]),
    (["train.keep_checkpoints=0"], ["config.train.keep_checkpoints", "must be positive (an integer >= 1)"]),
    (["train.warmup_steps=900"], ["config.train.warmup_steps", "[0, train.steps=800]", "got 900"]),
    (["train.eval_every=-1"], ["config.train.eval_every", ">= 0"]),
    (["train.aux_start_step=-2"], ["config.train.aux_start_step", ">= 0"]),
    (["train.lr=0.0"], ["config.train.lr", "(0, inf)"]),
    (["train.b2=1.0"], ["config.train.b2", "[0, 1)"]),
    (["train.weight_decay=-0.1"], ["config.train.weight_decay", "[0, inf)"]),
    (["train.aux_loss_mode=faithfull"], ["config.train.aux_loss_mode", "'faithful', 'differentiable', 'off'"]),
    (["train.lm_loss_reduction=mean"], ["config.train.lm_loss_reduction", "'token_mean', 'sample_mean'"]),
    (["train.faithful_select=count"], ["config.train.faithful_select", "'videotokens', 'kind'"]),
    (["eval.batch_size=0"], ["config.eval.batch_size", "must be positive (an integer >= 1)"]),
    (["eval.max_new_tokens=0"], ["config.eval.max_new_tokens", "must be positive (an integer >= 1)"]),
    (["eval.top_p=0.0"], ["config.eval.top_p", "(0, 1]"]),
    (["eval.temperature=-1.0"], ["config.eval.temperature", "[0, inf)"]),
    (["data.max_len=2048"], ["config.data.max_len 2048", "config.data.text_buckets (512, 1024)"]),
    (["data.text_buckets=(1024, 512)"], ["config.data.text_buckets", "increasing"]),
    (["data.text_buckets=()"], ["config.data.text_buckets", "non-empty"]),
    (["data.moment_frames=0"], ["config.data.moment_frames", "must be positive (an integer >= 1)"]),
    (["data.workers=-1"], ["config.data.workers", ">= 0"]),
    (["data.frame_size=50"], ["config.data.frame_size 50", "config.model.vit.patch_size"]),
    (["mesh.data=0"], ["config.mesh.data", "-1"]),
    (["mesh.fsdp=-1"], ["config.mesh", "at most one of data, fsdp, tensor may be -1"]),
    (["mesh.num_devices=-1"], ["config.mesh.num_devices", ">= 0"]),
    (["mesh.data=4", "mesh.num_devices=2"], ["config.mesh data=4 x fsdp=1 x tensor=1 needs 4 devices",
                                             "config.mesh.num_devices is 2"]),
    (["trainable=('qformer/(',)"], ["config.trainable", "'qformer/('", "not a regular expression"]),
    # model values a module would trip over deep inside (issue 14 held-out set)
    (["model.lora.dropout=1.5"], ["config.model.lora.dropout", "[0, 1)", "got 1.5"]),
    (["model.lora.rank=0"], ["config.model.lora.rank", "must be positive (an integer >= 1)"]),
    (["model.lora.targets=('q_proj','qq_proj')"], ["config.model.lora.targets", "q_proj, k_proj", "'qq_proj'"]),
    (["model.llm.heads=3"], ["config.model.llm.hidden (128)", "multiple of config.model.llm.heads (3)"]),
    (["model.llm.kv_heads=3"], ["config.model.llm.heads (4)", "multiple of config.model.llm.kv_heads (3)"]),
    (["model.vit.patch_size=0"], ["config.model.vit.patch_size", "must be positive (an integer >= 1)"]),
    (["model.qformer.encoder_width=32"], ["config.model.qformer.encoder_width (32)", "config.model.vit.width (64)"]),
    (["model.video_qformer.dropout=-1.0"], ["config.model.video_qformer.dropout", "[0, 1)"]),
    (["model.llm.rms_eps=0.0"], ["config.model.llm.rms_eps", "(0, inf)"]),
    (["model.frozen_dtype=float33"], ["config.model.frozen_dtype", "'float32', 'bfloat16', 'float16'"]),
    (["model.remat=some"], ["config.model.remat", "'none', 'full', 'dots'"]),
    # a misspelt key: named, with the closest existing ones
    (["train.ckpt_evry=10"], ["--config.train.ckpt_evry", "no such key", "train.ckpt_every"]),
    (["eval.max_new_tokenz=3"], ["--config.eval.max_new_tokenz", "no such key", "eval.max_new_tokens"]),
]


@pytest.mark.parametrize("overrides,words", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_a_bad_config_value_stops_training_before_anything_is_built(overrides, words, tmp_path, capsys):
    _train_stops_before_building(overrides, words, tmp_path, capsys)


def _train_stops_before_building(overrides, words, tmp_path, capsys):
    """Training with ``overrides`` exits 2 with one line holding ``words``; nothing built, compiled, written."""
    work = tmp_path / "run"
    rc = train_main.main(["--config", DEMO, *(f"--config.{o}" for o in overrides), "--workdir", str(work)])
    assert rc == 2
    line = _one_error_line(capsys)
    for w in words:
        assert w in line, line
    assert not work.exists()


@pytest.mark.parametrize("overrides,words", [
    (["mesh.data=3"], ["config.mesh data=3 x fsdp=1 x tensor=1 needs 3 devices, this run has 8",
                       "config.mesh.num_devices=3"]),
    (["mesh.data=16"], ["needs 16 devices, this run has 8"]),
    (["mesh.data=-1", "mesh.tensor=3"], ["config.mesh data=-1 x fsdp=1 x tensor=3", "do not divide the devices (this run has 8)"]),
    (["mesh.num_devices=16"], ["config.mesh.num_devices=16", "this run has 8 devices"]),
    # the batch axis is split over data x fsdp: 2 rows cannot go to 8 (demo: data=-1 on 8 devices)
    ([], ["config.train.batch_size 2 is not divisible by the data-parallel size 8", "use a multiple of 8"]),
    (["train.batch_size=3", "mesh.data=2", "mesh.num_devices=2"],
     ["config.train.batch_size 3 is not divisible by the data-parallel size 2", "data=2 x fsdp=1"]),
])
def test_the_mesh_is_checked_against_the_devices_before_compiling(overrides, words, tmp_path, capsys):
    assert jax.device_count() == 8
    _train_stops_before_building(overrides, words, tmp_path, capsys)


def test_a_mesh_that_fits_resolves_and_batches_split_evenly():
    exp = Experiment.resolve(cli.resolve(DEMO, ["mesh.data=2", "mesh.num_devices=2"]))
    assert exp.mesh_sizes(training=True) == {"data": 2, "fsdp": 1, "tensor": 1}
    exp = Experiment.resolve(cli.resolve(DEMO, ["mesh.data=-1", "mesh.tensor=4", "train.batch_size=4"]))
    assert exp.mesh_sizes(training=True) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert dict(exp.mesh().shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    # eval and chat do not need train.batch_size to split (the generator replicates what does not)
    assert Experiment.resolve(cli.resolve(DEMO)).mesh_sizes() == {"data": 8, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("key,value,message", [
    ("long_prefix", "cut", "config.data.long_prefix must be one of 'drop', 'truncate', got 'cut'"),
    ("max_sample_turns", 0, "config.data.max_sample_turns must be positive (an integer >= 1) or None, got 0"),
])
def test_keys_without_a_value_in_the_file_are_checked_too(key, value, message):
    cfg = cli.load_config(DEMO)
    cfg.data[key] = value     # a field of DataConfig that configs/demo.py leaves at its default
    with pytest.raises(cli.UsageError) as e:
        Experiment.resolve(cfg)
    assert str(e.value) == message


def test_max_steps_must_be_positive(tmp_path, capsys):
    rc = train_main.main(["--config", DEMO, "--workdir", str(tmp_path / "run"), "--max_steps", "-3"])
    assert rc == 2
    assert "--max_steps must be a positive number of steps, got -3" in _one_error_line(capsys)


# ------------------------------------------------------------------ overrides on the command line

def test_a_key_given_twice_takes_its_last_value_also_for_tuples():
    cfg = cli.resolve(DEMO, ["data.text_buckets=(1024,)", "data.text_buckets=(512, 1024)",
                             "train.lr=0.1", "train.lr=0.2"])
    assert tuple(cfg.data.text_buckets) == (512, 1024)     # not (1024, 512, 1024)
    assert cfg.train.lr == 0.2
    config, _ = cli.parse(["--config", DEMO, "--config.data.text_buckets", "(256, 512)",
                           "--config.data.text_buckets=(512, 1024, 2048)", "--config.data.max_len=2048"],
                          argparse.ArgumentParser())
    assert tuple(config.data.text_buckets) == (512, 1024, 2048)
    assert Experiment.resolve(config).data.max_len == 2048
    # what the demo passes on to train and eval: each key once, the user's value last
    assert cli.config_overrides(["--config.train.steps", "5", "--workdir", "w", "--config.train.steps=7",
                                 "--config.data.text_buckets=(512,)"]) == ["train.steps=7",
                                                                          "data.text_buckets=(512,)"]


# ------------------------------------------------------------------ one line, exit 2, --debug (item 5)

def test_debug_prints_the_traceback_as_well(tmp_path, capsys):
    rc = train_main.main(["--config", DEMO, "--config.train.ckpt_every=0", "--workdir", str(tmp_path / "r"),
                          "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and "UsageError" in err
    assert err.rstrip().splitlines()[-1] == "error: config.train.ckpt_every must be positive (an integer >= 1), got 0"


def test_debug_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("IVCR_DEBUG", "1")

    def body():
        raise cli.UsageError("a bad value")
    assert cli.run(body) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("error: a bad value")


def test_known_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    class Known(ValueError):
        pass

    def raises(e):
        def body():
            raise e
        return body
    assert cli.run(raises(Known("checkpoint /x: step 3 is corrupt")), known=(Known,)) == 2
    assert _one_error_line(capsys) == "error: checkpoint /x: step 3 is corrupt"
    # an OSError about a path or a full disk is the user's to fix
    assert cli.run(raises(FileNotFoundError(2, "No such file or directory", "/nowhere/x.json"))) == 2
    assert "/nowhere/x.json" in _one_error_line(capsys)
    assert cli.run(raises(OSError(28, "No space left on device", "/full/ckpt"))) == 2
    assert "No space left on device" in _one_error_line(capsys)
    # anything else is a bug: it propagates (Python prints the traceback, exit 1)
    with pytest.raises(ZeroDivisionError):
        cli.run(raises(ZeroDivisionError("division by zero")), known=(Known,))
    with pytest.raises(ValueError):
        cli.run(raises(ValueError("some internal invariant")))
    assert cli.run(raises(KeyboardInterrupt())) == 130
    assert _one_error_line(capsys) == "error: interrupted"


def test_control_characters_in_an_error_are_escaped(capsys):
    def body():
        raise cli.UsageError("record 3: field 'value': bad \x1b[2J\x1b[31mtext\x07")
    assert cli.run(body) == 2
    line = _one_error_line(capsys)
    assert "\x1b" not in line and "\x07" not in line
    assert line == "error: record 3: field 'value': bad \\x1b[2J\\x1b[31mtext\\x07"


@pytest.mark.parametrize("argv,words", [
    ([], ["the following arguments are required: --workdir", "python -m ivcr_jax.train --help"]),
    (["--workdir", "w", "--max_steps", "many"], ["--max_steps", "invalid int value: 'many'"]),
    (["--workdir", "w", "--wrokdir", "w"], ["unrecognized arguments: --wrokdir"]),
])
def test_argparse_errors_are_one_line(argv, words, capsys):
    assert train_main.main(["--config", DEMO, *argv]) == 2
    line = _one_error_line(capsys)
    for w in words:
        assert w in line, line


def test_every_program_reports_a_bad_key_in_one_line(tmp_path, capsys):
    bad = "--config.eval.max_new_tokenz=3"
    programs = [
        lambda: demo_main.main([bad, "--workdir", str(tmp_path / "demo")]),
        lambda: eval_main.main(["--config", TINY, bad, "--checkpoint", str(tmp_path)]),
        lambda: chat.main(["--config", TINY, bad, "--corpus", str(tmp_path)]),
        lambda: plan_lib.main(["--config", TINY, bad]),
    ]
    for program in programs:
        assert program() == 2
        line = _one_error_line(capsys)
        assert "eval.max_new_tokenz" in line and "did you mean eval.max_new_tokens?" in line, line
    assert retrieval_search.main(["--config.search.top_kk=3", "--index", "i", "--annotations", "a", "--out", "o"]) == 2
    assert "--config.search.top_kk: the config has no such key (did you mean search.top_k" in _one_error_line(capsys)
    assert not (tmp_path / "demo").exists()   # the demo checks the config before building its corpus


def test_the_demo_checks_values_before_building_its_corpus(tmp_path, capsys):
    rc = demo_main.main(["--config.train.steps=0", "--workdir", str(tmp_path / "demo")])
    assert rc == 2 and "config.train.steps must be positive" in _one_error_line(capsys)
    assert not (tmp_path / "demo").exists()


def test_plan_names_a_mesh_that_does_not_fit(capsys):
    assert plan_lib.main(["--config", TINY, "--mesh", "3,1,1"]) == 2
    assert "--mesh 3,1,1: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices, have 8" in _one_error_line(capsys)
    assert plan_lib.main(["--config", TINY, "--mesh", "a,b"]) == 2
    assert "--mesh a,b: give data,fsdp,tensor sizes" in _one_error_line(capsys)


def test_retrieval_names_a_missing_index(tmp_path, capsys):
    rc = retrieval_search.main(["--index", str(tmp_path), "--annotations", "a.json", "--out", "o.json"])
    assert rc == 2 and f"{tmp_path}: not a video index (no manifest.json)" in _one_error_line(capsys)


# ------------------------------------------------------------------ chat: files and control characters

def _corpus(tmp_path, ivcr: bytes | None = None, videos: bytes | None = None):
    root = tmp_path / "corpus"
    (root / "videos").mkdir(parents=True)
    (root / "videos.json").write_bytes(videos if videos is not None else
                                       json.dumps([{"video_id": "a.mp4", "description": "a cat"}]).encode())
    if ivcr is not None:
        (root / "ivcr.json").write_bytes(ivcr)
    return root


@pytest.mark.parametrize("ivcr,videos,words", [
    (b'[{"id": 1, "conversations": [', None, ["ivcr.json", "not valid JSON at line 1"]),
    (b'[{"id": "caf\xe9"}]', None, ["ivcr.json", "not valid UTF-8 at byte offset 12"]),
    (b'{"not": "a list"}', None, ["ivcr.json", "list"]),
    (None, b"[\"a.mp4\", ", ["videos.json", "not valid JSON"]),
    (None, b"\xff\xfe[]", ["videos.json", "UTF-8"]),
])
def test_chat_names_a_broken_corpus_file(ivcr, videos, words, tmp_path, capsys):
    root = _corpus(tmp_path, ivcr, videos)
    assert chat.main(["--config", TINY, "--corpus", str(root)]) == 2
    line = _one_error_line(capsys)
    assert str(root) in line, line
    for w in words:
        assert w in line, line


def test_chat_names_a_script_that_is_not_utf8_before_loading_the_model(tmp_path, capsys, monkeypatch):
    root = _corpus(tmp_path)
    script = tmp_path / "script.txt"
    script.write_bytes(b"# questions\nwhere is the cat?\nand the caf\xe9?\n")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the script was read")
    monkeypatch.setattr(Experiment, "load_model", no_model)
    assert chat.main(["--config", TINY, "--corpus", str(root), "--script", str(script)]) == 2
    line = _one_error_line(capsys)
    assert f"--script {script}: not valid UTF-8 at byte offset 41 (line 3: 0xe9)" in line, line
    assert chat.main(["--config", TINY, "--corpus", str(root), "--script", str(tmp_path / "none.txt")]) == 2
    assert "none.txt: no such file" in _one_error_line(capsys)
    assert chat.main(["--config", TINY, "--corpus", str(root), "--json-out", str(tmp_path)]) == 2
    assert "--json-out" in _one_error_line(capsys)


def test_read_script_skips_comments_and_blank_lines(tmp_path):
    script = tmp_path / "s.txt"
    script.write_bytes("\ufeff# c\n\n  first?  \n/video 2\n".encode("utf-8"))
    assert chat.read_script(script) == ["first?", "/video 2"]


ESC = "\x1b[2J\x1b]0;owned\x07"   # clear the screen, retitle the terminal, bell


def test_chat_prints_control_characters_from_data_escaped():
    rec = {"turn": 1, "question": f"where{ESC}?", "kind": "retrieval", "answer": f"Video 1{ESC}\x9b31m.",
           "intent": "retrieval", "candidates": [f"v{ESC}.mp4", "b.mp4"], "candidate_source": "annotations",
           "candidates_shown": True, "video_index": 1, "video_id": f"v{ESC}.mp4", "video_path": f"/c/v{ESC}.mp4",
           "moment": None, "passes": [{"kind": "retrieval"}],
           "current_video": {"video_id": f"v{ESC}.mp4", "path": "/c/v.mp4", "number": 1, "chosen_by": "model",
                             "after_turn": 1},
           "timings": {"retrieval": 0.0, "prefill": 0.0, "decode": 0.0, "compile": 0.0}}
    out = chat.format_turn(rec)
    assert not any(c in out for c in "\x1b\x07\x9b")
    assert "where\\x1b[2J\\x1b]0;owned\\x07?" in out and "Video 1\\x1b[2J" in out and "\\x9b31m" in out
    assert out.count("\n") == 6   # the layout's own newlines are kept
    err = chat.format_turn({"turn": 2, "question": "q\r", "error": f"VideoError: v{ESC}.mp4 cannot be decoded"})
    assert "\r" not in err and "\x1b" not in err and "q\\x0d" in err


def test_printable_keeps_text_and_escapes_controls():
    assert cli.printable("caf\u00e9 \u4e2d\u6587 a\tb\nc") == "caf\u00e9 \u4e2d\u6587 a\tb\nc"
    assert cli.printable("a\x00b\x7fc\x85d\u202ee") == "a\\x00b\\x7fc\\x85d\\u202ee"
    assert cli.printable("a\nb\tc", newlines=False) == "a\\nb\\tc"


def test_a_workdir_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "run"
    f.write_text("not a directory")
    assert train_main.main(["--config", DEMO, "--config.mesh.num_devices=1", "--workdir", str(f)]) == 2
    assert _one_error_line(capsys) == f"error: workdir {f}: exists and is not a directory"


def test_eval_out_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "out"
    f.write_text("x")
    assert eval_main.main(["--annotations", str(f), "--predictions", str(f), "--out", str(f)]) == 2
    assert _one_error_line(capsys) == f"error: --out {f}: exists and is not a directory"


def test_chat_checks_json_out_before_loading_the_model(tmp_path, capsys, monkeypatch):
    root = _corpus(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(Experiment, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert chat.main(["--config", TINY, "--corpus", str(root), "--json-out", str(blocker / "t.json")]) == 2
    line = _one_error_line(capsys)
    assert f"--json-out {blocker / 't.json'}: its directory {blocker}: exists and is not a directory" in line
