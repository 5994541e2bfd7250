"""Can the demo's LLM learn the retrieval choice at all? Its videos replaced by their descriptions.

The demo's retrieval turn shows 10 candidate videos and asks for the one matching the query; the
answer names it ("... Video 7 matches the description: ..."). This script removes the video path
from the question: every ``<VIDEOTOKEN>`` of the retrieval prompt becomes the candidate's own
description from ``videos.json`` ("a blue diamond appears on a brown background"), which is what
perfect video tokens could at best convey. Only the demo config's LLM (``configs/demo.py``: LLaMA
architecture, 4 layers x 128, random ``fan_in`` init) is trained, with the LM loss at the answer
positions, on the corpus's training retrieval turns, each step drawing a fresh candidate list (the
target plus 9 other training videos, the target at a uniform position). Every ``--eval-every``
steps it scores the held-out (test split) retrieval turns with their own candidate lists: the
chosen k is the argmax over k = 1..10 of the answer's log-probability of "k" after "Video "
(LLaMA writes 10 as "1", "0": the second digit is scored too). Chance is 10 %.

    python -m ivcr_jax.data.demo --out runs/demo_corpus
    python benchmarks/demo_text_standins.py --corpus runs/demo_corpus --steps 2000 --lr 1e-3

It prints step, train loss, held-out accuracy, the share of the most frequent answer (1.0 = a
constant answer) and the elapsed seconds. docs/demo_learning.md has the measurements.
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ivcr_jax import cli
from ivcr_jax.data.samples import SYSTEM_MESSAGE, render
from ivcr_jax.experiment import Experiment

SEQ, ANSWER = 352, 48   # the longest stand-in prompt is ~320 tokens; answers are < 48


def _turns(records, split):
    for r in records:
        if r["split"] != split:
            continue
        convs = r["conversations"]
        for i in range(0, len(convs) - 1, 2):
            a = convs[i + 1]
            if a.get("gt_se") == [-1, -1] and a.get("candidate_videos"):
                yield convs[i]["value"], a["value"], list(a["candidate_videos"]), a["video_id"]


def _prompt(desc, question, answer, cands, gt):
    blocks = [f"<VID> {j + 1} </VID> <VIDEO> {desc[c]} </VIDEO>" for j, c in enumerate(cands)]
    old = answer.split("Video ")[1].split(" ")[0]
    answer = answer.replace(f"Video {old} ", f"Video {cands.index(gt) + 1} ", 1)
    return "Candidate videos : " + ",".join(blocks) + "." + question, answer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="a demo corpus (python -m ivcr_jax.data.demo --out DIR)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = Path(args.corpus)
    exp = Experiment.resolve(cli.resolve("configs/demo.py", [f"data.annotations={root / 'ivcr.json'}"]))
    tok = exp.tokenizer
    llama = exp.build_model().llama
    desc = {v["video_id"]: v["description"] for v in json.loads((root / "videos.json").read_text())}
    records = json.loads((root / "ivcr.json").read_text())
    train, test = list(_turns(records, "train")), list(_turns(records, "test"))
    pool = sorted({c for t in train for c in t[2]})
    rng = np.random.default_rng(args.seed)
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]

    def encode(user, answer):
        prompt = tok(render(SYSTEM_MESSAGE, [user], [None]), add_special_tokens=False)["input_ids"]
        full = tok(render(SYSTEM_MESSAGE, [user], [answer]), add_special_tokens=False)["input_ids"]
        n = min(len(full), SEQ)
        ids, mask = np.zeros(SEQ, np.int32), np.zeros(SEQ, np.int32)
        ids[:n], mask[:n] = full[:n], 1
        at, labels = np.full(ANSWER, -1, np.int32), np.full(ANSWER, -100, np.int32)
        pos = np.arange(len(prompt) - 1, n - 1)[:ANSWER]
        at[: len(pos)], labels[: len(pos)] = pos, ids[pos + 1]
        return ids, mask, at, labels

    graph, params, rest = nnx.split(llama, nnx.Param, ...)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(50, args.steps // 2), max(args.steps, 2),
                                                  args.lr / 10)
    opt = optax.adamw(schedule)
    opt_state = opt.init(params)

    def loss_fn(params, ids, mask, at, labels):
        logits = nnx.merge(graph, params, rest)(ids, attention_mask=mask, logits_at=at).logits
        ok = labels >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        return (ce * ok).sum() / ok.sum()

    @jax.jit
    def step(params, opt_state, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def log_probs(params, ids, mask, at):
        return jax.nn.log_softmax(nnx.merge(graph, params, rest)(ids, attention_mask=mask, logits_at=at).logits)

    def choose(params, question, answer, cands, gt):
        # "Video 1..." teacher-forced: the first digit's distribution, then "0" after a "1".
        user, ans = _prompt(desc, question, answer, cands, cands[0])
        ids, mask, _, _ = encode(user, ans)
        one = next(i for i in range(2, int(mask.sum())) if ids[i] == digits[1] and
                   tok.decode(ids[i - 2:i]).strip().endswith("Video"))
        lp = np.asarray(log_probs(params, ids[None], mask[None], np.array([[one - 1, one]], np.int32)))[0]
        first, after_one = lp[0][digits], lp[1]
        zero = float(np.exp(after_one[digits[0]]))
        scores = [first[1] + np.log1p(-min(zero, 1 - 1e-9))] + [first[k] for k in range(2, 10)]
        scores.append(first[1] + after_one[digits[0]])
        return int(np.argmax(scores)) + 1, cands.index(gt) + 1

    print(f"{len(train)} training / {len(test)} held-out retrieval turns; batch {args.batch}, lr {args.lr}")
    t0 = time.time()
    for s in range(1, args.steps + 1):
        batch = []
        for i in rng.integers(0, len(train), args.batch):
            question, answer, _, gt = train[i]
            cands = list(rng.choice([c for c in pool if c != gt], 9, replace=False))
            cands.insert(int(rng.integers(10)), gt)
            batch.append(encode(*_prompt(desc, question, answer, cands, gt)))
        params, opt_state, loss = step(params, opt_state, *(np.stack(x) for x in zip(*batch)))
        if s % args.eval_every == 0 or s == args.steps:
            picks = [choose(params, *t) for t in test]
            acc = np.mean([k == g for k, g in picks])
            top = collections.Counter(k for k, _ in picks).most_common(1)[0][1] / len(picks)
            print(f"step {s:5d}  loss {float(loss):.3f}  held-out R@1 {100 * acc:5.1f} %  "
                  f"most frequent answer {100 * top:5.1f} %  {time.time() - t0:6.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
