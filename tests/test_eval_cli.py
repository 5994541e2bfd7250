"""`python -m ivcr_jax.eval --predictions FILE`: scores a predictions JSONL without a model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import pytest

from ivcr_jax.data.schema import load_dialogues
from ivcr_jax.eval.__main__ import main
from ivcr_jax.eval.metrics import evaluate_predictions
from ivcr_jax.eval.report import write_charts
from test_eval_metrics import END_TO_END, EVALUATED, PER_TURN_CASCADE, PREDICTIONS, assert_metrics, assert_table, write_annotations

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Per-query stage times for three lines (seconds).
TIMINGS = {"a1": {"retrieval": 0.05, "prefill": 0.4, "decode": 0.3},
           "a2": {"retrieval": 0.07, "prefill": 0.5, "decode": 0.2},
           "b1": {"retrieval": 0.06, "prefill": 0.3, "decode": 0.4}}


def _write_predictions(path, extra_lines=()):
    lines = []
    for i, (k, v) in enumerate(PREDICTIONS.items()):
        obj = {"text_id": k, ("answer" if i % 2 else "prediction"): v}  # both field names accepted
        if k in TIMINGS:
            obj["timings"] = TIMINGS[k]
        lines.append(json.dumps(obj))
        if i == 1:
            lines.append("")  # blank lines are ignored
    lines[3:3] = list(extra_lines)  # after the blank line 3
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# The hand-worked numbers of test_eval_metrics.py are the lenient scorer's over every turn.
LENIENT = ["--scorer", "lenient", "--test-filter", "none"]


@pytest.fixture
def files(tmp_path):
    return write_annotations(tmp_path / "ivcr.json"), _write_predictions(tmp_path / "pred.jsonl"), tmp_path / "out"


def test_cli_writes_report_and_matches_hand_numbers(files, capsys):
    ann, pred, out = files
    assert main(["--annotations", str(ann), "--predictions", str(pred), "--out", str(out), *LENIENT]) == 0
    printed = capsys.readouterr().out
    assert "end_to_end" in printed and "R@1 IoU=0.5" in printed and str(out / "report.md") in printed

    m = json.loads((out / "metrics.json").read_text())
    assert_metrics(m["evaluated"], EVALUATED)
    assert_metrics(m["end_to_end"], END_TO_END)
    assert_table(m["per_turn_cascade"]["end_to_end"], PER_TURN_CASCADE)
    assert "turns" not in m
    assert m["input"]["predictions_lines"] == len(PREDICTIONS)
    # retrieval times 0.05, 0.06, 0.07: mean 0.06, p50 0.06, p95 = 0.06 + 0.9·0.01 (linear interpolation)
    t = m["timings"]
    assert t["retrieval"]["n"] == 3
    assert t["retrieval"]["mean"] == pytest.approx(0.06) and t["retrieval"]["p50"] == pytest.approx(0.06)
    assert t["retrieval"]["p95"] == pytest.approx(0.069)
    # MLLM per query = prefill + decode = 0.7, 0.7, 0.7
    assert t["MLLM (prefill + decode)"]["mean"] == pytest.approx(0.7)

    turns = [json.loads(x) for x in (out / "turn_scores.jsonl").read_text().splitlines()]
    assert len(turns) == 11 and sum(x["answered"] for x in turns) == 9

    report = (out / "report.md").read_text()
    assert "| end_to_end | 20.00 | 80.00 | 60.00 | 60.00 | 40.00 |" in report
    assert "cascade" in report and "Response time" in report and "0.06 s" in report
    # The baselines beside the model, in metrics.json, report.md and the printed table: random R@1 over
    # the 5 end-to-end retrieval turns = 4 × 1/10 / 5 (c1's GT is in no list); first stage: only b1's
    # GT is candidate 1 → 1/5. Each explained in a line under the table.
    assert m["baselines"]["random"]["end_to_end"]["R@1"] == pytest.approx(8.0)
    assert m["baselines"]["first_stage"]["end_to_end"]["R@1"] == pytest.approx(20.0)
    assert "| end_to_end · random guess | 8.00 | 80.00 |" in report
    assert "| end_to_end · first stage only | 20.00 | 80.00 | – | – | – | – | – |" in report
    assert "- random guess: the expected score" in report and "- first stage only: candidate 1" in report
    assert "end_to_end · random guess" in printed and "first stage only: candidate 1" in printed
    assert "| scope | R@1 | R@10 (annotation candidates) |" in report and "R@10 (annotation candidates)" in printed
    assert "video length unknown for 5 of 5 moment turns" in report
    for name in ("baselines.png", "per_turn.png", "iou_hist.png", "latency.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in report


def test_malformed_line_is_an_error_naming_the_line(tmp_path, capsys):
    ann = write_annotations(tmp_path / "ivcr.json")
    # Line 1, 2 valid, line 3 blank, line 4 the bad one.
    pred = _write_predictions(tmp_path / "pred.jsonl", extra_lines=['{"text_id": "b4", "answer": '])
    out = tmp_path / "out"
    assert main(["--annotations", str(ann), "--predictions", str(pred), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{pred}:4:" in err and "not valid JSON" in err and "--skip-bad-lines" in err
    assert not (out / "metrics.json").exists()

    # Skipped and counted with --skip-bad-lines; the numbers are unchanged.
    assert main(["--annotations", str(ann), "--predictions", str(pred), "--out", str(out), *LENIENT, "--skip-bad-lines",
                 "--no-charts"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["input"]["predictions_bad_lines_skipped"] == 1
    assert m["input"]["predictions_bad_line_examples"][0].startswith(f"{pred}:4:")
    assert_metrics(m["end_to_end"], END_TO_END)
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("line,why", [
    ('["a1", "video 3"]', "expected a JSON object"),
    ('{"answer": "video 3"}', "missing or empty 'text_id'"),
    ('{"text_id": "a1"}', "needs a string 'answer'"),
    ('{"text_id": "a1", "answer": null}', "needs a string 'answer'"),
    ('{"text_id": "a2", "answer": "x", "duration": -3}', "'duration' must be a positive number"),
    ('{"text_id": "a1", "answer": "x", "gt_in_retrieved_top10": 1}', "'gt_in_retrieved_top10' must be true or false"),
])
def test_other_malformed_lines(tmp_path, capsys, line, why):
    ann = write_annotations(tmp_path / "ivcr.json")
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"text_id": "a2", "answer": "x"}) + "\n" + line + "\n")
    assert main(["--annotations", str(ann), "--predictions", str(pred), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{pred}:2:" in err and why in err


def test_r10_is_the_retrievers_when_the_predictions_say_so(tmp_path):
    """A predictions file written with --index carries gt_in_retrieved_top10 per retrieval turn: R@10 is
    then the retriever's recall, and the column says so; durations feed the random span."""
    ann = write_annotations(tmp_path / "ivcr.json")
    flags = {"a1": True, "a3": False, "b1": True, "e2": False}    # c1 has no line: a miss end to end
    lines = [{"text_id": k, "answer": v, **({"gt_in_retrieved_top10": flags[k]} if k in flags else {}),
              **({"duration": 20.0} if k == "b2" else {})} for k, v in PREDICTIONS.items()]
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["--annotations", str(ann), "--predictions", str(pred), "--out", str(out), "--no-charts",
                 *LENIENT]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["r10_candidates"] == "retriever"
    assert m["evaluated"]["R@10"] == pytest.approx(50.0) and m["end_to_end"]["R@10"] == pytest.approx(40.0)
    assert m["end_to_end"]["R@1"] == pytest.approx(END_TO_END["R@1"])           # the model row's R@1 is unchanged
    assert m["baselines"]["durations"]["recorded"] == 1
    report = (out / "report.md").read_text()
    assert "| scope | R@1 | R@10 (retriever top-10) |" in report and "annotation candidates" not in report
    assert "| end_to_end | 20.00 | 40.00 |" in report
    assert "still show the annotation's candidates" in report


def test_charts_start_at_zero_when_every_value_is_zero(tmp_path, monkeypatch):
    """No prediction at all: every per-turn bar is 0; the % axes run 0…100, not −0.04…0.04."""
    limits = {}
    save = matplotlib.figure.Figure.savefig

    def spy(fig, path, *a, **kw):
        limits[Path(path).name] = [ax.get_ylim() for ax in fig.axes]
        return save(fig, path, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    dialogues, _ = load_dialogues(write_annotations(tmp_path / "ivcr.json"), split="test")
    write_charts(evaluate_predictions(dialogues, {}), tmp_path / "charts")
    assert limits["per_turn.png"] == [(0.0, 100.0), (0.0, 100.0)]
    # Baselines chart: the model's bars are 0, the random guess's are not; the axis still starts at 0.
    bottom, top = limits["baselines.png"][0]
    assert bottom == 0.0 and 0 < top <= 105


def test_python_dash_m_entry_point(files):
    ann, pred, out = files
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "ivcr_jax.eval", "--annotations", str(ann), "--predictions",
                           str(pred), "--out", str(out), "--no-charts", "--match", "text_id", *LENIENT],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "metrics:" in proc.stdout
    assert_metrics(json.loads((out / "metrics.json").read_text())["end_to_end"], END_TO_END)
