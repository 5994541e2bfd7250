"""``python -m ivcr_jax.convert export-hf``: a trained checkpoint -> HF LLaMA (merged), peft adapter,
vision safetensors; checked against transformers and peft as the references."""
from __future__ import annotations

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from ivcr_jax import cli
from ivcr_jax.checkpoints import Checkpointer
from ivcr_jax.convert.__main__ import main as convert_main
from ivcr_jax.convert import hf_export
from ivcr_jax.convert.hf_export import write_safetensors
from ivcr_jax.convert.common import read_hf_dir
from ivcr_jax.convert.store import nest_paths
from ivcr_jax.experiment import Experiment
from ivcr_jax.models.params import flat_state, trainable_filter
from ivcr_jax.train.logging import save_config

# fan_in init: unit-gain random weights, so the logits are not hidden under tiny activations
SET = ("init.random_init=fan_in", "model.frozen_dtype=float32", "model.trainable_dtype=float32",
       "model.compute_dtype=float32")
IDS = np.array([[1, 415, 2936, 9060, 285, 1142, 32000, 32004, 754, 2],
                [1, 28705, 28770, 28734, 32001, 13, 5, 7, 11, 13]])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny training workdir: config.json and one checkpoint step whose trainable parameters (LoRA
    B included) are the random init plus noise, so the adapters change the LLaMA's outputs."""
    work = tmp_path_factory.mktemp("run")
    exp = Experiment.resolve(cli.resolve("configs/paper.py:tiny", SET))
    save_config(exp.config, work / "config.json", resumed=False)
    model = exp.build_model()
    rng = np.random.default_rng(0)
    trained = {}
    for k, var in flat_state(model, trainable_filter(exp.trainable)).items():
        x = np.asarray(var.get_value())
        trained[k] = (x + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
    with Checkpointer(work, async_save=False) as ck:
        ck.save(3, {"params": nest_paths(trained), "step": np.int32(3)})
    model, _ = exp.load_model(str(work))   # what eval and chat load: the reference of the export
    return work, exp, model


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    work, _, _ = run
    out = tmp_path_factory.mktemp("export") / "hf"
    assert convert_main(["export-hf", "--checkpoint", str(work / "checkpoints" / "3"), "--out", str(out)]) == 0
    return out


def _ours(model) -> np.ndarray:
    return np.asarray(model.llama(jnp.asarray(IDS)).logits)


def _close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> float:
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err < rel, err
    return err


def test_merged_llama_loads_in_transformers_with_our_logits(run, exported):
    from transformers import AutoTokenizer, LlamaForCausalLM

    _, exp, model = run
    hf = LlamaForCausalLM.from_pretrained(exported / "llama").eval()
    assert hf.config.vocab_size == exp.model.llm.vocab_size == 32005   # the extended vocabulary
    with torch.no_grad():
        got = hf(torch.as_tensor(IDS)).logits.numpy()
    ours = _ours(model)
    _close(got, ours)
    # the merge mattered: the base alone gives other logits
    base = LlamaForCausalLM.from_pretrained(exported / "llama_base").eval()
    with torch.no_grad():
        plain = base(torch.as_tensor(IDS)).logits.numpy()
    assert np.abs(plain - ours).max() > 1e-2 * np.abs(ours).max()
    # the run's tokenizer (with the 5 IVCR tokens) sits beside the weights
    tok = AutoTokenizer.from_pretrained(exported / "llama")
    assert len(tok) == 32005 and tok.convert_tokens_to_ids("<VIDEOTOKEN>") == 32004


def test_peft_adapter_on_the_unmerged_base_gives_our_logits(run, exported):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    _, exp, model = run
    cfg = json.loads((exported / "lora_adapter" / "adapter_config.json").read_text())
    lora = exp.model.lora
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (lora.rank, lora.alpha, sorted(lora.targets))
    names = set(safetensors.numpy.load_file(exported / "lora_adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names and len(names) == 2 * 2 * 4
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(exported / "llama_base"),
                                           exported / "lora_adapter").eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.as_tensor(IDS)).logits.numpy()
    _close(got, _ours(model))


def test_vision_bundle_holds_every_other_parameter_as_its_readme_says(run, exported):
    _, _, model = run
    want = {k.replace("/", "."): np.asarray(v.get_value()) for k, v in flat_state(model).items()
            if not k.startswith("llama/")}
    got = safetensors.numpy.load_file(exported / "vision" / "vision.safetensors")
    assert set(got) == set(want)
    assert {"vit.blocks.0.attn.qkv.kernel", "qformer.query_tokens", "video_qformer.frame_position_embedding",
            "video_qformer.video_query_tokens", "llama_proj.kernel"} <= set(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    rows = re.findall(r"^\| `([^`]+)` \| \(([\d, ]*)\) \| (\w+) \| (.+) \|$",
                      (exported / "vision" / "README.md").read_text(), re.M)
    readme = {k: (tuple(int(d) for d in shape.split(",") if d.strip()), dtype, module)
              for k, shape, dtype, module in rows}
    assert {k: v[:2] for k, v in readme.items()} == {k: (a.shape, a.dtype.name) for k, a in got.items()}
    assert "ln_vision" in readme["vit.post_norm.scale"][2] and "video_query_tokens" in \
        readme["video_qformer.video_query_tokens"][2]


def test_export_refuses_a_used_out_unless_overwrite(run, exported, tmp_path, capsys):
    work, _, _ = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    assert convert_main(["export-hf", "--checkpoint", str(work), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert convert_main(["export-hf", "--checkpoint", str(work), "--out", str(out), "--overwrite",
                         "--dtype", "float32"]) == 0
    assert (out / "mine.txt").is_file()   # only the export's own directories are replaced
    for d in ("llama", "llama_base", "lora_adapter", "vision"):
        assert sorted(p.name for p in (out / d).iterdir()) == sorted(p.name for p in (exported / d).iterdir())


@pytest.mark.parametrize("case", ["not_a_checkpoint", "corrupt", "out_under_a_file", "missing"])
def test_bad_input_is_one_line_and_a_nonzero_exit(run, tmp_path, capsys, case):
    work, _, _ = run
    out = tmp_path / "out"
    ckpt = work
    if case == "not_a_checkpoint":
        ckpt = tmp_path / "empty"
        ckpt.mkdir()
        want = "neither a converted checkpoint"
    elif case == "missing":
        ckpt, want = tmp_path / "nowhere", "no such checkpoint directory"
    elif case == "corrupt":
        ckpt = tmp_path / "run"
        shutil.copytree(work, ckpt)
        data = max((p for p in (ckpt / "checkpoints" / "3" / "state").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        want = "corrupt"
    else:
        (tmp_path / "afile").write_text("x")
        out, want = tmp_path / "afile" / "sub", "cannot be created"
    rc = convert_main(["export-hf", "--checkpoint", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and want in err, err
    assert "Traceback" not in err
    assert not (out / "llama").exists()


def test_a_large_llama_is_written_in_shards_with_an_index(tmp_path):
    rng = np.random.default_rng(0)
    items = [(f"t{i}", rng.standard_normal((64, 64)).astype(np.float32)) for i in range(5)]
    files = write_safetensors(items, tmp_path, stem="model", max_shard_bytes=2 * 64 * 64 * 4)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + \
        ["model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4 and len(index["weight_map"]) == 5
    back = dict(read_hf_dir(tmp_path))   # our own HF reader follows the index
    assert set(back) == {k for k, _ in items}
    for k, v in items:
        np.testing.assert_array_equal(back[k], v)


def test_a_failed_export_leaves_nothing_behind(run, tmp_path, capsys, monkeypatch):
    work, _, _ = run

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "vision"))

    monkeypatch.setattr(hf_export, "write_vision", full_disk)
    rc = convert_main(["export-hf", "--checkpoint", str(work), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"error: {tmp_path / 'out' / 'vision'}: No space left on device"
    assert not (tmp_path / "out").exists()   # created by this call, removed with what it held
