"""Multi-host evaluation: ``python -m ivcr_jax.eval`` as two ``jax.distributed`` CPU processes gives the
predictions and metrics of one process (ivcr_jax.models.generate with a mesh over processes).

Both runs shard the model over a mesh ``data=2`` of two CPU devices: one process holding two (fake)
devices, or two processes holding one each (gloo collectives; the launch follows
tests/test_distributed.py). Every process runs every sample with the same full batches; the
generator agrees the text length and checks the batches (one all-gather per batch), puts them on
the mesh as global arrays and brings the tokens back to every process. Decoding is sampled
(temperature 1, top-p 0.8), so the PRNG keys must agree too.
"""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from test_distributed import ROOT, _env, run_processes
from test_generate import random_model, tiny_experiment, tiny_flags

# The tiny model with one LLM layer (a smaller graph: three processes compile it).
MODEL = ("model.llm.layers=1",)
FLAGS = (*MODEL, "eval.max_new_tokens=8", "eval.video_slots=cap", "eval.batch_size=2",
         "eval.temperature=1.0", "eval.top_p=0.8",
         "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=1")
SAMPLES = 4

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small demo corpus and the tiny model's random weights as a converted checkpoint."""
    from ivcr_jax.convert.store import save_flat
    from ivcr_jax.data.demo import build_demo_corpus
    from ivcr_jax.models.params import flat_state

    tmp = tmp_path_factory.mktemp("eval_distributed")
    root = build_demo_corpus(tmp / "demo", num_generated=8, size=32)
    model = random_model(tiny_experiment(*MODEL))
    save_flat(tmp / "converted", {k: np.asarray(v.get_value()) for k, v in flat_state(model).items()})
    return dict(root=root, checkpoint=tmp / "converted")


def _cmd(setup, out):
    return [sys.executable, "-m", "ivcr_jax.eval", *tiny_flags(*FLAGS), "--annotations", str(setup["root"] / "ivcr.json"),
            "--checkpoint", str(setup["checkpoint"]), "--max-samples", str(SAMPLES), "--mesh", "--no-charts",
            "--out", str(out)]


def _outputs(out):
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    return {p["text_id"]: p["answer"] for p in preds}, metrics


def _headline(metrics):
    """The scores (no timings, paths or compile seconds)."""
    keep = {k: v for k, v in metrics.items() if k not in ("timings", "generation", "input")}
    gen = {k: metrics["generation"][k] for k in ("decoding", "seed", "samples", "answered", "skipped",
                                                 "compiled_shapes")}
    return json.dumps({**keep, "generation": gen}, sort_keys=True, default=str)


def test_two_processes_evaluate_like_one_process(setup, tmp_path):
    one = tmp_path / "one"
    r = subprocess.run(_cmd(setup, one), cwd=ROOT, text=True, capture_output=True, timeout=600,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    expected, expected_metrics = _outputs(one)
    assert len(expected) == SAMPLES and expected_metrics["generation"]["decoding"] == "sampled"
    assert len(set(expected.values())) > 1          # the random model says different things

    # Two processes; their logs go to files (a full pipe would stall a process inside a collective).
    # Both are given the same --out: process 0 writes it, process 1 writes nothing.
    outs = [tmp_path / "two", tmp_path / "two"]
    logs = [tmp_path / f"two_p{i}.log" for i in range(2)]
    run_processes([_cmd(setup, out) for out in outs], logs)

    answers, metrics = _outputs(outs[0])
    assert answers == expected
    assert _headline(metrics) == _headline(expected_metrics)
    assert "report:" in logs[0].read_text() and "report:" not in logs[1].read_text()


def test_a_mesh_generator_returns_the_tokens_of_the_local_one(tokenizer, tmp_path_factory):
    """In one process: inputs as global arrays on a data=2 mesh (batch axis sharded), the tokens back
    replicated as host numpy — the same tokens as without a mesh, greedy and sampled."""
    from ivcr_jax import sharding
    from ivcr_jax.data.demo import build_demo_corpus
    from ivcr_jax.data.prompts import PromptLoader
    from ivcr_jax.data.samples import enumerate_samples
    from ivcr_jax.data.schema import load_dialogues
    from ivcr_jax.models.generate import Generator

    exp = tiny_experiment(*MODEL)
    root = build_demo_corpus(tmp_path_factory.mktemp("demo"), num_generated=8, size=32)
    dialogues, _ = load_dialogues(root / "ivcr.json", split="test")
    pcfg = exp.pipeline(2, video_root=exp.video_root(dialogues, str(root / "ivcr.json")))
    refs = enumerate_samples(dialogues, pcfg.sample)[:2]
    loader = PromptLoader(pcfg, tokenizer, video_slots="cap")
    batch = loader.batch([loader.prompt(r.dialogue, r.turn_idx, r.sample_id) for r in refs], 2)

    model = random_model(exp)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
    sharded = nnx.clone(model)
    state = nnx.state(sharded)
    nnx.update(sharded, jax.device_put(state, sharding.state_shardings(state, mesh)))
    local = Generator(model, max_new_tokens=6, buckets=pcfg.buckets)
    meshed = Generator(sharded, max_new_tokens=6, buckets=pcfg.buckets, mesh=mesh)
    assert not meshed.multiprocess
    for kw in ({}, {"temperature": 1.0, "top_p": 0.8, "key": jax.random.key(3)}):
        a, b = local(batch, **kw), meshed(batch, **kw)
        assert isinstance(b.tokens, np.ndarray)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.lengths, b.lengths)
        assert a.steps == b.steps and a.bucket == b.bucket


def test_a_mesh_over_processes_agrees_the_text_length_and_refuses_different_batches(monkeypatch):
    """The all-gather of a multi-process generator, simulated: the text bucket is the longest of the
    processes' lengths; a process holding a different batch stops the run with an error."""
    from ivcr_jax import distributed
    from ivcr_jax.models.generate import Generator

    gen = Generator(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), max_new_tokens=2, buckets=(8, 16))
    gen.multiprocess = True           # as under a mesh holding devices of two processes
    mask = np.zeros((2, 16), np.int32)
    mask[:, :5] = 1
    batch = {"input_ids": mask * 7, "attention_mask": mask}
    others = []
    monkeypatch.setattr(distributed, "allgather", lambda x: np.stack([x, *[o(x) for o in others]]))
    assert gen.prepare(batch)["input_ids"].shape == (2, 8)

    others.append(lambda x: np.array([12, *x[1:]], x.dtype))     # another process's longer text
    assert gen.prepare(batch)["input_ids"].shape == (2, 16)

    others[0] = lambda x: np.array([x[0], x[1], x[2] + 1], x.dtype)  # the same shapes, other values
    with pytest.raises(ValueError, match=r"process\(es\) \[1\] hold a different batch.*values differ"):
        gen.prepare(batch)
