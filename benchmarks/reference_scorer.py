"""Side by side with the released scorer: the reference's own code on a generated IVCR-format corpus.

    python benchmarks/reference_scorer.py --reference DIR [--seed 0] [--dialogues 300] [--out DIR]

``DIR`` is a checkout of the reference code (``ivcr200k/ivcr200k.github.io``; only
``convert_dataset.ipynb`` and ``metrics/eval.py`` are read). The script

1. writes a corpus in the IVCR-200K format (``--seed``): test and train dialogues of 1–12 turns,
   retrieval and moment turns with answers in the dataset's form ("… video 3 … 12.5s-20.0s."),
   first-stage misses on turn 1, type-[7] and type-[0] dialogues;
2. runs the notebook's cells 1–4 and 6 on it (its test filter and samples, paths rewritten to
   a temporary directory), as the reference builds its test set;
3. writes predictions for those samples (right, wrong, unparseable and alternative-format answers)
   as ``evaluate.py`` writes them (``result.json``: ``user_q`` = the sample's last user message);
4. scores them with ``metrics/eval.py``'s ``cal_reslut`` twice — as released, and with its
   first-sample skip patched (the two ``else:`` of its dict initialisation made unconditional) —
   and with ``python -m ivcr_jax.eval``: ``--reference-bugs``, and the default ``official`` scorer;
   also from a JSONL file keyed by ``text_id``.

It prints the four numbers (R@1, R@1 IoU=0.3/0.5/0.7) of each and exits 1 when ``official``
differs from the patched reference, or ``--reference-bugs`` from the released one, by more than
0.01 points. The lenient scorer's numbers are printed beside them (a second row, not compared).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KEYS = ("R@1", "R@1 IoU=0.3", "R@1 IoU=0.5", "R@1 IoU=0.7")
QUESTIONS = ["A man throws a ball to his dog.", "Find the video where a woman slices bread.",
             "When does the crowd start cheering?", "Show me people dancing in the rain.",
             "At what point does the car turn left?", "Any other video of a cat on a sofa?",
             "When is the cake put into the oven?", "Is there a clip of kids on a trampoline?"]


# ------------------------------------------------------------------------------- the corpus ---

def _cands(rng: random.Random, source: str) -> list[str]:
    return [f"{source}/v_{rng.randrange(10**6):06d}.mp4" for _ in range(10)]


def make_corpus(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    records, tid = [], 0
    for i in range(n):
        split = "test" if rng.random() < 0.8 else "train"
        kind = rng.choices([[1, 2], [1], [7], [0]], [0.6, 0.2, 0.1, 0.1])[0]
        convs = []
        video = None
        for t in range(rng.choice([1, 2, 3, 4, 6, 8, 9, 11, 12])):
            tid += 1
            q = rng.choice(QUESTIONS) + (" " if rng.random() < 0.1 else "")   # the odd trailing space
            convs.append({"from": "human", "value": q, "text_id": f"t{tid:05d}"})
            retrieval = rng.random() < 0.75 if t == 0 else rng.random() < 0.35
            cands = _cands(rng, rng.choice(["ActivityNet", "TVQA", "DiDeMo"]))
            if retrieval:
                k = rng.randrange(10) + 1
                miss = rng.random() < 0.15
                video = f"X/v_missing_{tid}.mp4" if miss else cands[k - 1]
                ans = (f"The intent of this query is to retrieve a complete video. The video that matches it "
                       f"is video {k}.")
                convs.append({"from": "gpt", "value": ans, "gt_se": [-1, -1], "video_id": video,
                              "candidate_videos": cands})
            else:
                s = round(rng.uniform(0, 60), 1)
                e = round(s + rng.uniform(1, 40), 1)
                k = rng.randrange(10) + 1
                ans = f"The intent is to locate a moment. The query content is found in video {k} at {s}s-{e}s."
                if t == 0 and rng.random() < 0.7:
                    cands[0] = video = cands[0]          # the first stage's top-1 is the GT video
                elif t == 0:
                    video = cands[3]
                convs.append({"from": "gpt", "value": ans, "gt_se": [s, e], "video_id": video,
                              "candidate_videos": cands})
        records.append({"id": f"d{i:04d}", "split": split, "type": kind, "conversations": convs})
    return records


def predict(rng: random.Random, answer: str) -> str:
    """A plausible model answer to a GT answer: right, wrong, unparseable or in another format."""
    k = re.search(r"video (\d+)", answer)
    span = re.search(r"(\d+(?:\.\d+)?)s-(\d+(?:\.\d+)?)s", answer)
    r = rng.random()
    if span is None:   # retrieval
        n = int(k.group(1))
        if r < 0.35:
            return f"The intent is video retrieval. The matching one is video {n}."
        if r < 0.6:
            return f"The intent is video retrieval. The matching one is video {rng.randrange(10) + 1}."
        if r < 0.75:
            return f"The {['first', 'third', 'tenth'][rng.randrange(3)]} video matches."     # lenient reads some
        if r < 0.85:
            return f"Candidate {n} is the answer."
        return "I cannot tell."
    s, e = float(span.group(1)), float(span.group(2))
    j = lambda x: round(max(0.0, x + rng.uniform(-8, 8)), 1)
    if r < 0.3:
        return f"The given query happens in {s} - {e} seconds."
    if r < 0.55:
        return f"The given query happens in {j(s)} - {j(e)} seconds."
    if r < 0.7:
        return f"It starts at {j(s)} seconds and ends at {j(e)} seconds."
    if r < 0.8:
        return f"From {j(s)}s to {j(e)}s, in video {k.group(1)}."
    if r < 0.9:
        return f"The moment is {j(s)}-{j(e)}."
    return "The moment cannot be found."


# ------------------------------------------------------------------------ the reference's code ---

def notebook_samples(ref: Path, corpus: Path, work: Path) -> list:
    """convert_dataset.ipynb cells 0–4 and 6 with their paths rewritten; returns cell 6's samples."""
    cells = [c for c in json.loads((ref / "convert_dataset.ipynb").read_text())["cells"] if c["cell_type"] == "code"]
    src = {i: "".join(cells[i]["source"]) for i in (0, 1, 2, 3, 4, 6)}
    src[1] = re.sub(r'read\("[^"]*IVCR-200K\.json"\)', f'read({str(corpus)!r})', src[1])
    src[1] = src[1].replace("# write('./IVCR-200K-no-zero-test.json',new_data)", "write('./IVCR-200K-no-zero-test.json',new_data)")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        ns: dict = {}
        with contextlib.redirect_stdout(io.StringIO()):
            for i in (0, 1, 2, 3, 4, 6):
                exec(compile(src[i], f"convert_dataset.ipynb cell {i}", "exec"), ns)
        return ns["new_data"]
    finally:
        os.chdir(cwd)


def _eval_module(ref: Path, patched: bool = False) -> dict:
    code = (ref / "metrics" / "eval.py").read_text()
    code = code.split('if __name__ == "__main__":')[0]
    if patched:   # the dict-initialisation branch scores its sample too
        code, n = re.subn(r"(reslut\['(?:vr|vmr)'\] = dict\([^)]*\)\n\s*)else:", r"\1if True:", code)
        assert n == 2, "could not patch cal_reslut's first-sample skip"
    ns: dict = {}
    exec(compile(code, "metrics/eval.py", "exec"), ns)
    return ns


def reference_scores(ref: Path, pre, gt, all_data, patched: bool) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        r = _eval_module(ref, patched)["cal_reslut"](pre, gt, all_data)
    return {"R@1": 100 * r["vr"]["right"], "R@1 IoU=0.3": 100 * r["vmr"]["r3"],
            "R@1 IoU=0.5": 100 * r["vmr"]["r5"], "R@1 IoU=0.7": 100 * r["vmr"]["r7"]}


def reference_per_turn(ref: Path, pre, all_data) -> dict:
    """``cal_multi_reslut`` per turn 1..7, None where a turn has no turn of that kind."""
    r = _eval_module(ref)["cal_multi_reslut"](pre, all_data)
    pct = lambda a, b: None if b == 0 else 100 * a / b
    return {str(k): {"R@1": pct(v["vr_right"], v["vr_all"]), "R@1 IoU=0.3": pct(v["vmr_r3"], v["vmr_all"]),
                     "R@1 IoU=0.5": pct(v["vmr_r5"], v["vmr_all"]), "R@1 IoU=0.7": pct(v["vmr_r7"], v["vmr_all"])}
            for k, v in r.items() if k <= 7}


def our_per_turn(out: Path) -> dict:
    rows = json.loads((out / "metrics.json").read_text())["per_turn"]["end_to_end"]
    return {r["turn"]: {k: r.get(k) if r.get(f"n_{'retrieval' if k == 'R@1' else 'moment'}") else None for k in KEYS}
            for r in rows if r["turn"].isdigit()}


def same_tables(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (a[t][k] is None) == (b[t][k] is None) and (a[t][k] is None or abs(a[t][k] - b[t][k]) <= 0.01)
        for t in a for k in KEYS)


# ------------------------------------------------------------------------------------- ours ---

def ours(corpus: Path, predictions: Path, out: Path, *flags: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ivcr_jax.eval", "--annotations", str(corpus), "--predictions",
                           str(predictions), "--out", str(out), "--no-charts", *flags],
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode:
        raise SystemExit(f"python -m ivcr_jax.eval {' '.join(flags)} failed:\n{proc.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"end_to_end": {k: m["end_to_end"][k] for k in KEYS},
            "lenient": {k: m["scorers"]["lenient"]["end_to_end"][k] for k in KEYS}}


def _raw_questions(work: Path, gt) -> list[str]:
    """Each notebook sample's last question as written in the corpus (cell 2 keeps ``text_id``)."""
    subs = json.loads((work / "IVCR_no_type0_no_zero_test.json").read_text())
    msgs = json.loads((work / "IVCR_no_type0_no_zero_dialogues_test.json").read_text())
    raw = {c["text_id"]: c["value"] for r in json.loads((work / "ivcr.json").read_text())
           for c in r["conversations"] if c["from"] == "human"}
    out = [raw[sub[-1]["text_id"]] for sub, m in zip(subs, msgs) if len(m) <= 15]
    assert len(out) == len(gt)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, type=Path, help="checkout of ivcr200k/ivcr200k.github.io")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dialogues", type=int, default=300)
    p.add_argument("--out", type=Path, help="keep the corpus, predictions and outputs here")
    args = p.parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="ivcr_refscore_"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "ivcr.json"
    records = make_corpus(args.seed, args.dialogues)
    corpus.write_text(json.dumps(records, indent=1))
    gt = notebook_samples(args.reference, corpus, work)
    all_data = json.loads(corpus.read_text())
    rng = random.Random(args.seed + 1)
    outputs = [predict(rng, s[-1]["content"]) for s in gt]
    pre = [{"user_q": s[-2]["content"], "output": o} for s, o in zip(gt, outputs)]
    (work / "result.json").write_text(json.dumps(pre, indent=1))
    # The same predictions keyed by text_id: cell 2's samples carry it, cell 4 maps them 1:1 to
    # messages, cell 6 keeps those of <= 15 messages.
    subs = json.loads((work / "IVCR_no_type0_no_zero_test.json").read_text())
    msgs = json.loads((work / "IVCR_no_type0_no_zero_dialogues_test.json").read_text())
    ids = [sub[-1]["text_id"] for sub, m in zip(subs, msgs) if len(m) <= 15]
    assert len(ids) == len(gt)
    (work / "predictions.jsonl").write_text("".join(json.dumps({"text_id": i, "answer": o}) + "\n"
                                                     for i, o in zip(ids, outputs)))
    n_test = sum(1 for r in all_data if r["split"] == "test" and r["type"] != [0])
    print(f"corpus: {len(records)} dialogues ({n_test} test, type != [0]); the notebook builds {len(gt)} samples")

    rows = {"reference, released": reference_scores(args.reference, pre, gt, all_data, patched=False),
            "reference, skip patched": reference_scores(args.reference, pre, gt, all_data, patched=True)}
    bugs = ours(corpus, work / "result.json", work / "ours_reference_bugs", "--reference-bugs")
    off = ours(corpus, work / "result.json", work / "ours_official")
    rows["ours --reference-bugs"] = bugs["end_to_end"]
    rows["ours official"] = off["end_to_end"]
    rows["ours --reference-bugs, JSONL"] = ours(corpus, work / "predictions.jsonl", work / "ours_jsonl_bugs",
                                                "--reference-bugs")["end_to_end"]
    rows["ours official, JSONL"] = ours(corpus, work / "predictions.jsonl", work / "ours_jsonl")["end_to_end"]
    rows["ours lenient (not compared)"] = off["lenient"]
    # Per-turn tables (cal_multi_reslut): on evaluate.py's result.json, whose user_q is the rendered
    # user message, and on predictions keyed by the raw question (first match wins).
    tables = {"per turn, result.json": (reference_per_turn(args.reference, pre, all_data),
                                        our_per_turn(work / "ours_reference_bugs"))}
    raw = [{"user_q": q, "output": o} for q, o in zip(_raw_questions(work, gt), outputs)]
    (work / "predictions_by_question.jsonl").write_text("".join(
        json.dumps({"question": x["user_q"], "answer": x["output"]}) + "\n" for x in raw))
    ours(corpus, work / "predictions_by_question.jsonl", work / "ours_question_bugs", "--reference-bugs",
         "--match", "question")
    tables["per turn, raw questions"] = (reference_per_turn(args.reference, raw, all_data),
                                         our_per_turn(work / "ours_question_bugs"))
    width = max(map(len, rows))
    print(f"{'':{width}}  " + "  ".join(f"{k:>12}" for k in KEYS))
    for name, r in rows.items():
        print(f"{name:{width}}  " + "  ".join(f"{r[k]:12.2f}" for k in KEYS))
    bad = [(a, b, k) for a, b in (("ours official", "reference, skip patched"),
                                  ("ours --reference-bugs", "reference, released"),
                                  ("ours official, JSONL", "reference, skip patched"),
                                  ("ours --reference-bugs, JSONL", "reference, released"))
           for k in KEYS if abs(rows[a][k] - rows[b][k]) > 0.01]
    for a, b, k in bad:
        print(f"MISMATCH {k}: {a} {rows[a][k]:.4f} vs {b} {rows[b][k]:.4f}")
    for name, (theirs, mine) in tables.items():
        ok = same_tables(theirs, mine)
        cells = lambda t: " ".join(f"{t[r]['R@1'] if t[r]['R@1'] is None else round(t[r]['R@1'], 2)}" for r in sorted(t))
        print(f"{name}: released vs ours --reference-bugs {'equal' if ok else 'DIFFERENT'}; R@1 by turn: "
              f"released {cells(theirs)} | ours {cells(mine)}")
        if not ok:
            bad.append((name, "", ""))
    print("files:", work)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
