"""Evaluation reports: metrics.json, report.md, a terminal table and PNG charts.

The headline table has the columns of paper Table 2 (R@1, R@10, R@1 IoU=0.3/0.5/0.7, BLEU-4), the
model's rows followed, per scope, by the random-guess, first-stage-only and training-prior-span
baselines over the same turns (``metrics.baselines``), each explained in a line under the table; the R@10 header names the
candidate list it counts (the annotation's, or the retriever's top 10 with ``--index``). The
per-turn tables are paper Table 4, with the cascade variant of the older `conv_cal.py`
(reference-architecture §8.5). Response times per stage ("retrieval", "prefill", "decode") are
summarised as mean / p50 / p95 beside the paper's anchors (appendix Table 6, one RTX 4090: 0.06 s
retrieval, 0.59–0.80 s MLLM per query).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "HEADLINE_COLUMNS",
    "closed_loop_summary",
    "protocol_note",
    "timing_summary",
    "format_table",
    "markdown_report",
    "write_charts",
    "write_report",
]

HEADLINE_COLUMNS = ("R@1", "R@10", "R@1 IoU=0.3", "R@1 IoU=0.5", "R@1 IoU=0.7", "mIoU", "BLEU-4")
STAGES = ("retrieval", "prefill", "decode")
# Appendix Table 6 (average response time per query on RTX 4090, 1008–2436 test samples).
PAPER_TIMES_S = {"retrieval": "0.06", "MLLM (prefill + decode)": "0.59–0.80", "total": "0.65–0.86"}


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _headline_cols(results: Mapping) -> list[str]:
    cols = []
    for c in HEADLINE_COLUMNS:
        if c.startswith("R@1 IoU="):
            continue
        cols.append(c)
        if c == "R@10":
            cols.extend(f"R@1 IoU={t:g}" for t in results.get("thresholds", (0.3, 0.5, 0.7)))
    return cols


R10_LABELS = {"annotation": "R@10 (annotation candidates)", "retriever": "R@10 (retriever top-10)"}
R10_NOTES = {
    "annotation": "R@10 (annotation candidates): the GT video_id is in the turn's candidate_videos of the "
                  "annotation file, the list the prompt shows; the same in every row, since choosing from a "
                  "list does not change it.",
    "retriever": "R@10 (retriever top-10): the GT video_id is among the project's retriever's top 10 for the "
                 "turn's question (--index); a turn without a predictions line counts as a miss. The prompts "
                 "still show the annotation's candidates, so R@1 (model and baselines) re-ranks those.",
}
BASELINE_LABELS = {"random": "random guess", "first_stage": "first stage only", "prior_span": "training-prior span"}


def _col_label(results: Mapping, c: str) -> str:
    return R10_LABELS.get(results.get("r10_candidates", "annotation"), c) if c == "R@10" else c


SCORER_LABELS = {"official": "official parsers", "lenient": "lenient parsers",
                 "reference": "released scorer, bugs kept"}


def _headline_rows(results: Mapping, cols: Sequence[str]) -> list[list[str]]:
    """Per scope: the model's row (the headline scorer), the other scorers' rows, then each
    baseline's over the same turns."""
    cells = lambda m: [_fmt(m.get(c), 4 if c == "BLEU-4" else 2) for c in cols]
    main = results.get("scorer", "official")
    rows = []
    for scope in ("evaluated", "end_to_end"):
        m = results[scope]
        rows.append([scope, *cells(m), str(m["n_retrieval"]), str(m["n_moment"]), str(m["n_answered"])])
        for name, sc in results.get("scorers", {}).items():
            if name == main or (name == "official" and main.startswith("official (")):
                continue
            o = sc[scope]
            rows.append([f"{scope} · {SCORER_LABELS.get(name, name)}", *cells(o), str(o["n_retrieval"]),
                         str(o["n_moment"]), str(o["n_answered"])])
        for name, label in BASELINE_LABELS.items():
            b = results.get("baselines", {}).get(name, {}).get(scope)
            if b is not None:
                rows.append([f"{scope} · {label}", *cells(b), str(b["n_retrieval"]), str(b["n_moment"]), "–"])
    return rows


SCORER_NOTE = {
    "official": "scorer official: the released metrics/eval.py's parsers (the GT index and span read from the "
                "answer text; the first `a - b` of a prediction, else its fallbacks), its first-sample skip fixed",
    "lenient": "scorer lenient: the project's parsers (more answer formats; the GT from gt_se and the candidate "
               "position)",
}


def protocol_note(results: Mapping) -> str | None:
    """One line: which test turns were run, and what else counts in the end-to-end denominators."""
    pr = results.get("protocol")
    if not pr:
        return None
    fo, tn = pr["dialogues_filtered_out"], pr["turns_not_run"]
    beyond = next((f"{v} beyond turn {k.rsplit('_', 1)[-1]}" for k, v in tn.items() if k.startswith("beyond")), "")
    bad = pr["malformed_record_turns"]
    line = (f"protocol (test filter {pr['test_filter']}): {pr['dialogues_run']} of {pr['dialogues']} test dialogues "
            f"run ({fo['first_stage_missed']} filtered out for a first-stage miss on turn 1, {fo['type_7']} of type "
            f"[7]), {pr['samples']} samples; end to end, the turns not run ({tn['filtered_dialogues']} of filtered "
            f"dialogues, {beyond}) and {sum(bad.values())} turns of {pr['malformed_records']} malformed records "
            f"count as failures; {pr['predictions_outside_samples']} predictions outside the samples ignored.")
    gt = pr.get("gt_read_from_record") or {}
    if gt and results.get("scorer") != "lenient":
        line += (f" GT read from the record where the answer text has none: {gt.get('retrieval', 0)} retrieval "
                 f"turns (no 'video N'), {gt.get('moment', 0)} moment turns (no 'Ns-Ms'); the released scorer "
                 "cannot score those.")
    if pr.get("not_scored_by_the_reference_bug"):
        line += f" Not scored (the released scorer's first-sample skip): {', '.join(pr['not_scored_by_the_reference_bug'])}."
    return line


def _headline_notes(results: Mapping) -> list[str]:
    """The scorer and the protocol, one line per baseline, the R@10 column, and where the random
    span's video lengths came from."""
    bl = results.get("baselines", {})
    notes = [SCORER_NOTE.get(results.get("scorer"), f"scorer {results.get('scorer')}: the released metrics/eval.py "
                             "exactly (its first-sample skip, None == None, its exceptions)")]
    if protocol_note(results):
        notes.append(protocol_note(results))
    notes += [f"{BASELINE_LABELS[k]}: {bl[k]['description']}; over the model row's turns."
              for k in BASELINE_LABELS if k in bl]
    notes.append(R10_NOTES[results.get("r10_candidates", "annotation")])
    du = bl.get("durations")
    if du and du["moment_turns"]:
        if du["gt_end_fallback"]:
            notes.append(f"random span: video length unknown for {du['gt_end_fallback']} of {du['moment_turns']} "
                         "moment turns; there it is drawn on [0, GT end] (D = max(GT end, recorded duration)), "
                         "as if the video ended with the GT, so those turns' random numbers are approximate.")
        else:
            notes.append(f"random span: on [0, duration], the durations recorded in the predictions file "
                         f"({du['moment_turns']} moment turns).")
    return notes


def _per_turn_cols(results: Mapping) -> list[str]:
    th = results.get("thresholds", (0.3, 0.5, 0.7))
    return ["n_retrieval", "R@1", "n_moment", *(f"R@1 IoU={t:g}" for t in th), "mIoU"]


def closed_loop_summary(results: Mapping, predictions: str) -> dict:
    """The parts of a closed-loop (``--history model``) evaluation shown beside the teacher-forced
    one: headline rows of each scorer and the per-turn tables (plain and cascade)."""
    keep = ("scorer", "evaluated", "end_to_end", "scorers", "per_turn", "per_turn_cascade")
    return {"predictions": predictions, **{k: results[k] for k in keep},
            "intent_accuracy": results.get("intent", {}).get("accuracy")}


def _closed_loop_rows(results: Mapping, cols: Sequence[str]) -> list[list[str]]:
    """End to end: teacher-forced and closed-loop rows, for each scorer."""
    cl = results["closed_loop"]
    cells = lambda m: [_fmt(m.get(c), 4 if c == "BLEU-4" else 2) for c in cols]
    rows = [["teacher history", *cells(results["end_to_end"])], ["model history (closed loop)", *cells(cl["end_to_end"])]]
    for name in results.get("scorers", {}):
        if name in cl["scorers"] and not (name == results.get("scorer") or results.get("scorer", "").startswith(name + " (")):
            rows.append([f"teacher history · {SCORER_LABELS.get(name, name)}", *cells(results["scorers"][name]["end_to_end"])])
            rows.append([f"model history · {SCORER_LABELS.get(name, name)}", *cells(cl["scorers"][name]["end_to_end"])])
    return rows


CLOSED_LOOP_NOTE = ("closed loop: each test dialogue is run turn by turn with the model's own earlier answers in "
                    "the history and, on a moment turn after a retrieval turn, the video the model chose there "
                    "(what a user of the system sees); teacher: the ground-truth history, as the reference evaluates.")


def timing_summary(timings: Mapping[str, Sequence[float]] | None) -> dict[str, dict]:
    """Per stage: n, mean, p50, p95 (seconds). Stages with no samples are left out."""
    out = {}
    for stage, xs in (timings or {}).items():
        arr = np.asarray([float(x) for x in xs if x is not None], dtype=np.float64)
        if arr.size == 0:
            continue
        out[stage] = {
            "n": int(arr.size),
            "mean": float(arr.mean()),
            "p50": float(np.percentile(arr, 50)),
            "p95": float(np.percentile(arr, 95)),
        }
    if "prefill" in out and "decode" in out:
        pre, dec = timings["prefill"], timings["decode"]
        if len(pre) == len(dec):
            # Per query, MLLM time is prefill + decode (the paper's "MLLM" column).
            out["MLLM (prefill + decode)"] = timing_summary({"x": [a + b for a, b in zip(pre, dec)]})["x"]
    return out


# ----------------------------------------------------------------------------- plain text ---

def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_table(results: Mapping, timings: Mapping[str, Sequence[float]] | None = None) -> str:
    """A plain-text summary for the terminal: headline rows, per-turn tables, intent, timings."""
    cols = _headline_cols(results)
    parts = [_text_table(["scope", *(_col_label(results, c) for c in cols), "n_ret", "n_mom", "n_answered"],
                         _headline_rows(results, cols))
             + "\n" + "\n".join(_headline_notes(results))]
    ptc = _per_turn_cols(results)
    for key, title in (("per_turn", "per turn (end to end)"), ("per_turn_cascade", "per turn, cascade rule (end to end)")):
        trs = results[key]["end_to_end"]
        parts.append(title + ":\n" + _text_table(["turn", *ptc], [[r["turn"], *(_fmt(r.get(c)) for c in ptc)] for r in trs]))
    if "closed_loop" in results:
        parts.append("end to end, teacher-forced vs closed loop:\n"
                     + _text_table(["history", *(_col_label(results, c) for c in cols)], _closed_loop_rows(results, cols)))
        trs = results["closed_loop"]["per_turn_cascade"]["end_to_end"]
        parts.append("per turn, closed loop, cascade rule (end to end):\n" + _text_table(
            ["turn", *ptc], [[r["turn"], *(_fmt(r.get(c)) for c in ptc)] for r in trs]))
    it = results.get("intent", {})
    if it.get("n"):
        parts.append(f"intent accuracy: {_fmt(it['accuracy'])}% over {it['n']} answered turns")
    pf = results.get("parse_failures", {})
    pr = results.get("predictions", {})
    parts.append(f"unparseable answers: retrieval {pf.get('retrieval', 0)}, moment {pf.get('moment', 0)}; "
                 f"predictions matched {pr.get('matched', 0)}/{pr.get('n', 0)}")
    ts = timing_summary(timings)
    if ts:
        parts.append("response time (s):\n" + _text_table(
            ["stage", "n", "mean", "p50", "p95"],
            [[k, str(v["n"]), _fmt(v["mean"], 3), _fmt(v["p50"], 3), _fmt(v["p95"], 3)] for k, v in ts.items()]))
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------- markdown ---

def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def markdown_report(results: Mapping, timings: Mapping[str, Sequence[float]] | None = None,
                    charts: Sequence[str] = (), title: str = "IVCR evaluation") -> str:
    """The Markdown report (``report.md``)."""
    cols = _headline_cols(results)
    lines = [f"# {title}", ""]
    nd = results.get("n_dialogues", {})
    lines.append(f"History: {results.get('history')} · scorer {results.get('scorer')} · matched by "
                 f"{results.get('match')} · language {results.get('lang')} · dialogues evaluated "
                 f"{nd.get('evaluated')} / test split {nd.get('end_to_end')}.")
    lines += ["", "Recalls, mIoU and intent accuracy in %; BLEU-4 as a fraction (as in paper Table 2; "
              "sacrebleu score / 100). `evaluated`: turns with a prediction; `end_to_end`: every test "
              "turn, a missing prediction counting as a failure.", ""]
    lines += ["## Headline (paper Table 2 columns)", "",
              _md_table(["scope", *(_col_label(results, c) for c in cols), "retrieval turns", "moment turns",
                         "answered"], _headline_rows(results, cols)), ""]
    lines += [f"- {n}" for n in _headline_notes(results)] + [""]
    ptc = _per_turn_cols(results)
    for key, title_ in (("per_turn", "Per turn (paper Table 4, ground-truth history)"),
                        ("per_turn_cascade", "Per turn, cascade rule (a failed retrieval turn fails every later turn)")):
        lines += [f"## {title_}", ""]
        for scope in ("end_to_end", "evaluated"):
            trs = results[key][scope]
            lines += [f"**{scope}**", "",
                      _md_table(["turn", *ptc], [[r["turn"], *(_fmt(r.get(c)) for c in ptc)] for r in trs]), ""]
    if "closed_loop" in results:
        cl = results["closed_loop"]
        lines += ["## Closed loop: the model's own history", "", CLOSED_LOOP_NOTE, "",
                  _md_table(["end to end", *(_col_label(results, c) for c in cols)], _closed_loop_rows(results, cols)),
                  "", f"Predictions: `{cl['predictions']}`.", ""]
        for key, title_ in (("per_turn", "Per turn, closed loop"),
                            ("per_turn_cascade", "Per turn, closed loop, cascade rule")):
            trs = cl[key]["end_to_end"]
            lines += [f"**{title_} (end to end)**", "",
                      _md_table(["turn", *ptc], [[r["turn"], *(_fmt(r.get(c)) for c in ptc)] for r in trs]), ""]
    it = results.get("intent", {})
    if it.get("n"):
        lines += ["## Intent", "",
                  f"Accuracy {_fmt(it['accuracy'])}% over {it['n']} answered turns "
                  f"(per kind: {', '.join(f'{k} {_fmt(v)}%' for k, v in it['per_kind'].items())}).", ""]
        kinds = sorted({p for row in it["confusion"].values() for p in row})
        lines += [_md_table(["ground truth \\ parsed", *kinds],
                            [[g, *(str(row.get(p, 0)) for p in kinds)] for g, row in it["confusion"].items()]), ""]
    pf, pr = results.get("parse_failures", {}), results.get("predictions", {})
    lines += ["## Parsing and matching", "",
              f"- unparseable answers: retrieval {pf.get('retrieval', 0)}, moment {pf.get('moment', 0)} (scored as misses)",
              f"- predictions: {pr.get('n', 0)}, matched {pr.get('matched', 0)}, unmatched {pr.get('unmatched', 0)}"
              + (f" (e.g. {', '.join(map(str, pr.get('unmatched_examples', [])))})" if pr.get("unmatched") else ""),
              f"- keys shared by several turns: {pr.get('keys_shared_by_several_turns', 0)}"]
    for k, v in results.get("input", {}).items():
        lines.append(f"- {k}: {v}")
    lines.append("")
    ts = timing_summary(timings)
    if ts:
        lines += ["## Response time per query (seconds)", "",
                  _md_table(["stage", "n", "mean", "p50", "p95"],
                            [[k, str(v["n"]), _fmt(v["mean"], 3), _fmt(v["p50"], 3), _fmt(v["p95"], 3)]
                             for k, v in ts.items()]), "",
                  "Paper anchors (appendix Table 6, one RTX 4090, mean per query): "
                  + ", ".join(f"{k} {v} s" for k, v in PAPER_TIMES_S.items()) + ".", ""]
    if charts:
        lines += ["## Charts", ""] + [f"![{Path(c).stem}]({Path(c).name})" for c in charts] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- charts ---

def _grouped_bars(ax, groups: Sequence[str], series: Mapping[str, Sequence[float | None]]) -> list[float]:
    """One bar per series in each group (None drawn as 0); returns the heights drawn."""
    x = np.arange(len(groups))
    w = 0.8 / max(len(series), 1)
    drawn = []
    for i, (name, vals) in enumerate(series.items()):
        vals = [0.0 if v is None else float(v) for v in vals]
        ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, label=name)
        drawn += vals
    ax.set_xticks(x, list(groups))
    ax.grid(axis="y", alpha=0.3)
    return drawn


def _percent_axis(ax, values: Sequence[float]) -> None:
    """A % axis from 0 (bars of 0 leave matplotlib a symmetric −0.04…0.04 axis) to a little above the
    highest bar, 100 when every bar is 0."""
    top = max(values, default=0.0)
    ax.set_ylim(0.0, min(105.0, 1.15 * top) if top > 0 else 100.0)
    ax.set_ylabel("%")


def write_charts(results: Mapping, out_dir: str | Path,
                 timings: Mapping[str, Sequence[float]] | None = None) -> list[Path]:
    """PNG charts: the model beside the baselines, per-turn R@1 / IoU bars (plain and cascade), IoU
    histogram, latency box plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    th = results.get("thresholds", (0.3, 0.5, 0.7))
    metrics = ["R@1", *(f"R@1 IoU={t:g}" for t in th)]

    bl = results.get("baselines", {})
    rows = {"model": results["end_to_end"], **{BASELINE_LABELS[k]: bl[k]["end_to_end"] for k in BASELINE_LABELS
                                               if k in bl}}
    shown = [*metrics, "mIoU"]
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = _grouped_bars(ax, shown, {name: [m.get(c) for c in shown] for name, m in rows.items()})
    _percent_axis(ax, drawn)
    ax.set_title("end to end: model and baselines (first stage: no moment answers; prior span: no retrieval ones)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "baselines.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    written.append(p)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    drawn = []
    for ax, key, name in zip(axes, ("per_turn", "per_turn_cascade"), ("ground-truth history", "cascade rule")):
        turns = [r for r in results[key]["end_to_end"] if r["turn"] != "all"]
        drawn += _grouped_bars(ax, [r["turn"] for r in turns], {m: [r.get(m) for r in turns] for m in metrics})
        ax.set_xlabel("turn")
        ax.set_title(f"per turn, end to end ({name})")
    _percent_axis(axes[0], drawn)  # sharey: both panels
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "per_turn.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    written.append(p)

    ious = [t["iou"] for t in results.get("turns", []) if t.get("kind") == "moment" and t.get("answered")
            and t.get("iou") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(ious, bins=np.linspace(0.0, 1.0, 21), color="tab:blue", edgecolor="white")
    for t in th:
        ax.axvline(t, color="tab:red", ls="--", lw=1)
    ax.set_xlabel("IoU (answered moment turns)")
    ax.set_ylabel("turns")
    ax.set_title(f"IoU histogram (n={len(ious)})")
    fig.tight_layout()
    p = out_dir / "iou_hist.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    written.append(p)

    timings = timings or {}
    names = [k for k in STAGES if k in timings] + [k for k in timings if k not in STAGES]
    stages = [(k, [float(x) for x in timings[k]]) for k in names if len(timings[k])]
    if stages:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.boxplot([v for _, v in stages], showfliers=True)
        ax.set_xticks(range(1, len(stages) + 1), [k for k, _ in stages])
        ax.set_ylabel("seconds per query")
        ax.set_title("response time per stage")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        p = out_dir / "latency.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written


def write_report(results: Mapping, out_dir: str | Path, *, timings: Mapping[str, Sequence[float]] | None = None,
                 charts: bool = True, title: str = "IVCR evaluation") -> dict[str, Path]:
    """Write ``metrics.json`` (everything but the per-turn records, plus the timing summary),
    ``turn_scores.jsonl`` (one scored turn per line), ``report.md`` and, with ``charts``, the PNGs.
    Returns the written paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    summary = {k: v for k, v in results.items() if k != "turns"}
    ts = timing_summary(timings)
    if ts:
        summary["timings"] = ts
    paths["metrics"] = out_dir / "metrics.json"
    paths["metrics"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["turn_scores"] = out_dir / "turn_scores.jsonl"
    with open(paths["turn_scores"], "w", encoding="utf-8") as f:
        for t in results.get("turns", []):
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
    pngs = write_charts(results, out_dir, timings) if charts else []
    for p in pngs:
        paths[p.stem] = p
    paths["report"] = out_dir / "report.md"
    paths["report"].write_text(markdown_report(results, timings, [p.name for p in pngs], title=title), encoding="utf-8")
    return paths


def publish(results: Mapping, out_dir: str | Path, *, timings: Mapping[str, Sequence[float]] | None = None,
            charts: bool = True, predictions: str | Path | None = None) -> dict[str, Path]:
    """:func:`write_report`, then the table and where everything is, on the terminal."""
    paths = write_report(results, out_dir, timings=timings, charts=charts)
    print(format_table(results, timings))
    print()
    if predictions is not None:
        print(f"predictions: {predictions}")
    print(f"metrics: {paths['metrics']}")
    print(f"report:  {paths['report']}")
    pngs = [str(v) for v in paths.values() if v.suffix == ".png"]
    if pngs:
        print("charts:  " + ", ".join(pngs))
    return paths
