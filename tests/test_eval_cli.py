"""`python -m ivcr_jax.eval --predictions FILE`: scores a predictions JSONL without a model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ivcr_jax.eval.__main__ import main
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


@pytest.fixture
def files(tmp_path):
    return write_annotations(tmp_path / "ivcr.json"), _write_predictions(tmp_path / "pred.jsonl"), tmp_path / "out"


def test_cli_writes_report_and_matches_hand_numbers(files, capsys):
    ann, pred, out = files
    assert main(["--annotations", str(ann), "--predictions", str(pred), "--out", str(out)]) == 0
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
    for name in ("per_turn.png", "iou_hist.png", "latency.png"):
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
    assert main(["--annotations", str(ann), "--predictions", str(pred), "--out", str(out), "--skip-bad-lines",
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
])
def test_other_malformed_lines(tmp_path, capsys, line, why):
    ann = write_annotations(tmp_path / "ivcr.json")
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"text_id": "a2", "answer": "x"}) + "\n" + line + "\n")
    assert main(["--annotations", str(ann), "--predictions", str(pred), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{pred}:2:" in err and why in err


def test_python_dash_m_entry_point(files):
    ann, pred, out = files
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "ivcr_jax.eval", "--annotations", str(ann), "--predictions",
                           str(pred), "--out", str(out), "--no-charts", "--match", "text_id"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "metrics:" in proc.stdout
    assert_metrics(json.loads((out / "metrics.json").read_text())["end_to_end"], END_TO_END)
