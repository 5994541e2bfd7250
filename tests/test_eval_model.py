"""The model-driven evaluation (``python -m ivcr_jax.eval --config ... --checkpoint ...``) and the
loading of trained checkpoints (ivcr_jax.eval.run_model, ivcr_jax.checkpoints)."""
from __future__ import annotations

import json
import time

import jax
import numpy as np
import pytest
from flax import nnx

from test_generate import random_model, tiny_experiment, tiny_flags

from ivcr_jax.data import prompts
from ivcr_jax.eval import run_model
from ivcr_jax.eval.__main__ import main as eval_main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ivcr_jax.data.demo import build_demo_corpus

    root = build_demo_corpus(tmp_path_factory.mktemp("demo"), num_generated=8, size=32)
    exp = tiny_experiment()
    return dict(root=root, config=exp, model=random_model(exp))


def _args(root, out, *extra):
    return [*tiny_flags("eval.max_new_tokens=8", "eval.video_slots=cap"), "--annotations", str(root / "ivcr.json"),
            "--out", str(out), *extra]


def test_eval_writes_predictions_metrics_report_and_timings(setup, tokenizer, tmp_path, capsys):
    out = tmp_path / "eval"
    args = _args(setup["root"], out, "--max-samples", "3")
    assert eval_main(args, model=setup["model"], tokenizer=tokenizer) == 0

    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3
    test = [d for d in json.loads((setup["root"] / "ivcr.json").read_text())
            if d["split"] == "test" and d["type"] != [0]]
    ids = [c["text_id"] for d in test for c in d["conversations"][0::2]]
    # the first 3 of the reference's test samples: dialogues (not of type [7], which the notebook
    # leaves without samples) whose first turn the first stage got right
    kept = [d for d in test if d["type"] != [7] and (
        lambda g: g["video_id"] in g["candidate_videos"] if g["gt_se"] == [-1, -1]
        else g["video_id"] == g["candidate_videos"][0])(d["conversations"][1])]
    first = [c["text_id"] for d in kept for c in d["conversations"][0:14:2]][:3]
    assert sorted(p["text_id"] for p in preds) == sorted(first)   # written in waves of equal turn index
    for p in preds:
        assert isinstance(p["answer"], str) and p["new_tokens"] <= 8
        assert p["timings"]["retrieval"] == 0.0 and p["timings"]["prefill"] > 0 and p["timings"]["decode"] > 0
        # moment turns record their decoded video's length (the random baseline's span lives in it)
        assert ("duration" in p) == (p["kind"] == "moment") and p.get("duration", 1.0) > 0
        assert "gt_in_retrieved_top10" not in p    # no --index

    metrics = json.loads((out / "metrics.json").read_text())
    for stage in ("retrieval", "prefill", "decode", "MLLM (prefill + decode)"):
        t = metrics["timings"][stage]
        assert t["n"] == 3 and t["p50"] <= t["p95"] and t["mean"] >= 0
    assert metrics["generation"]["decoding"] == "greedy" and metrics["generation"]["answered"] == 3
    assert metrics["end_to_end"]["n_turns"] == len(ids) and metrics["evaluated"]["n_answered"] == 3
    n_mom = sum(p["kind"] == "moment" for p in preds)
    assert n_mom >= 1 and metrics["baselines"]["durations"]["recorded"] == n_mom
    assert metrics["r10_candidates"] == "annotation"
    # The demo corpus's training split has moment turns: the prior-span row is there.
    assert set(metrics["baselines"]) == {"random", "first_stage", "prior_span", "durations"}
    report = (out / "report.md").read_text()
    assert "Response time per query" in report and "retrieval timing" in report
    assert (out / "per_turn.png").is_file() and (out / "latency.png").is_file()
    printed = capsys.readouterr().out
    assert "response time (s)" in printed and f"report:  {out / 'report.md'}" in printed

    # Greedy evaluation is deterministic: a second run gives the same answers.
    out2 = tmp_path / "again"
    assert eval_main(_args(setup["root"], out2, "--max-samples", "3", "--no-charts"),
                     model=setup["model"], tokenizer=tokenizer) == 0
    again = [json.loads(line)["answer"] for line in (out2 / "predictions.jsonl").read_text().splitlines()]
    assert again == [p["answer"] for p in preds]


def test_model_history_puts_the_models_answers_into_later_prompts(setup, tokenizer, tmp_path, monkeypatch):
    seen = []
    original = prompts.PromptLoader.prompt

    def spy(self, dialogue, turn_idx, sample_id=0, **kw):
        p = original(self, dialogue, turn_idx, sample_id, **kw)
        seen.append((dialogue.id, turn_idx, p.sample.text))
        return p

    monkeypatch.setattr(prompts.PromptLoader, "prompt", spy)

    class FakeRetriever:   # stands in for ivcr_jax.retrieval.search.Retriever (--index)
        def search(self, texts, k=10):
            time.sleep(0.01)
            return [["x.mp4"] * k for _ in texts], np.zeros((len(texts), k))

    monkeypatch.setattr(run_model.Retriever, "load", staticmethod(lambda index, model=None: FakeRetriever()))
    out = tmp_path / "model_history"
    assert eval_main(_args(setup["root"], out, "--max-samples", "2", "--history", "model", "--no-charts",
                           "--index", str(tmp_path / "index")),
                     model=setup["model"], tokenizer=tokenizer) == 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    (did, t0, _), (did2, t1, second) = seen
    assert did == did2 and (t0, t1) == (0, 1)
    first_answer = prompts.clean_answer(preds[0]["answer"], tokenizer)
    gt_answer = next(d for d in json.loads((setup["root"] / "ivcr.json").read_text())
                     if d["id"] == did)["conversations"][1]["value"]
    assert f"[/INST] {first_answer} </s>" in second
    assert gt_answer not in second
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"] == "model"
    # with a retriever, retrieval turns are timed (the moment turn has no retrieval)
    assert [p["kind"] for p in preds] == ["retrieval", "moment"]
    assert preds[0]["timings"]["retrieval"] >= 0.01 and preds[1]["timings"]["retrieval"] == 0.0
    assert metrics["generation"]["retrieval_timing"].startswith("retriever search")
    # ... and R@10 is the retriever's: its top 10 ("x.mp4") never holds the GT, whatever the JSON's lists hold
    assert preds[0]["gt_in_retrieved_top10"] is False and "gt_in_retrieved_top10" not in preds[1]
    assert metrics["r10_candidates"] == "retriever" and metrics["evaluated"]["R@10"] == 0.0
    assert "R@10 (retriever top-10)" in (out / "report.md").read_text()


def test_history_both_reports_the_closed_loop_beside_teacher_forcing(setup, tokenizer, tmp_path):
    out = tmp_path / "both"
    assert eval_main(_args(setup["root"], out, "--max-samples", "4", "--history", "both", "--no-charts"),
                     model=setup["model"], tokenizer=tokenizer) == 0
    teacher = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    model = [json.loads(x) for x in (out / "predictions_model.jsonl").read_text().splitlines()]
    assert [p["text_id"] for p in teacher] == [p["text_id"] for p in model] and len(model) == 4
    # the first turns have no history: the same prompt, the same greedy answer
    firsts = {p["text_id"] for p in teacher if p["turn"] == 1}
    assert {p["text_id"]: p["answer"] for p in teacher if p["text_id"] in firsts} == \
        {p["text_id"]: p["answer"] for p in model if p["text_id"] in firsts}
    m = json.loads((out / "metrics.json").read_text())
    assert m["history"] == "teacher" and m["closed_loop"]["predictions"].endswith("predictions_model.jsonl")
    assert m["closed_loop"]["end_to_end"]["n_turns"] == m["end_to_end"]["n_turns"]
    report = (out / "report.md").read_text()
    assert "## Closed loop: the model's own history" in report and "cascade rule (end to end)" in report
    assert "| model history (closed loop) |" in report


def test_main_reports_missing_inputs(setup, tmp_path, capsys):
    args = [*tiny_flags(), "--annotations", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")]
    assert eval_main(args) == 2
    assert "no such file" in capsys.readouterr().err
    assert eval_main([*tiny_flags(), "--config.eval.max_new_tokenz=3"]) == 2
    assert "did you mean eval.max_new_tokens" in capsys.readouterr().err


def test_load_trainable_restores_a_training_checkpoint_over_the_base(setup, tmp_path):
    import optax

    from ivcr_jax.checkpoints import Checkpointer, find_step_dir, load_weights
    from ivcr_jax.models.params import CheckpointError, CheckpointMismatch, trainable_filter
    from ivcr_jax.train.step import init_state

    config = setup["config"]
    trainable = trainable_filter(config.trainable)
    _, params, _ = nnx.split(setup["model"], trainable, ...)
    params = jax.tree.map(lambda x: x + 1.0, params)        # "trained" values, unlike the model's
    ckpt = Checkpointer(tmp_path / "run", async_save=False)
    ckpt.save(7, init_state(params, optax.adam(1e-3), 0), force=True)
    ckpt.close()
    assert find_step_dir(tmp_path / "run").name == "7"

    model = nnx.clone(setup["model"])
    frozen_before = nnx.state(model, nnx.Not(trainable))
    what = load_weights(model, tmp_path / "run", trainable=config.trainable, seed=config.seed)
    assert "step 7" in what and "random initialisation" in what
    for a, b in zip(jax.tree.leaves(nnx.state(model, trainable)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Not(trainable))), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # A checkpoint that does not cover the model's trainable set is refused, naming the directory and keys.
    other = tuple(config.trainable) + (r"llama/norm/.*",)
    with pytest.raises(CheckpointMismatch, match=r"(?s)run/checkpoints/7/state.*missing keys.*llama/norm/scale"):
        load_weights(model, tmp_path / "run", trainable=other)
    with pytest.raises(CheckpointError, match="neither a converted checkpoint"):
        load_weights(model, tmp_path, trainable=config.trainable)

    # A converted directory (python -m ivcr_jax.convert) replaces every parameter.
    from ivcr_jax.models.params import flat_state
    from ivcr_jax.convert.store import save_flat

    save_flat(tmp_path / "converted", {k: np.asarray(v.get_value()) for k, v in flat_state(model).items()})
    fresh = nnx.clone(setup["model"])
    assert load_weights(fresh, tmp_path / "converted").startswith("converted weights")
    for a, b in zip(jax.tree.leaves(nnx.state(fresh, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_missing_video_skips_its_samples_and_the_run_goes_on(setup, tokenizer, tmp_path):
    import shutil

    root = tmp_path / "corpus"
    shutil.copytree(setup["root"], root)
    # One dialogue's candidate list names a missing file (every demo clip is in every list: deleting
    # one would skip every sample, and an evaluation that answers nothing exits 1).
    recs = json.loads((root / "ivcr.json").read_text())
    first = next(d for d in recs if d["split"] == "test" and d["type"] not in ([0], [7]))
    g = first["conversations"][1]
    g["candidate_videos"][next(i for i, c in enumerate(g["candidate_videos"]) if c != g["video_id"])] = "shapes/gone.mp4"
    (root / "ivcr.json").write_text(json.dumps(recs))
    out = tmp_path / "eval"
    assert eval_main(_args(root, out, "--max-samples", "3", "--no-charts"),
                     model=setup["model"], tokenizer=tokenizer) == 0
    gen = json.loads((out / "metrics.json").read_text())["generation"]
    assert gen["skipped"] >= 1 and gen["answered"] >= 1 and gen["answered"] + gen["skipped"] == 3
    assert "gone.mp4: video file not found" in (out / "report.md").read_text()
