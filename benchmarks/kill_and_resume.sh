#!/usr/bin/env bash
# Kill a demo training run with SIGKILL after 30 logged steps, restart it, and compare every
# step's loss with an uninterrupted run of the same config (here: the one of `python -m ivcr_jax
# --workdir /tmp/demo_main`, whose corpus is reused).
set -u
cd "$(dirname "$0")/.."
rm -rf /tmp/kill
run() { python3 -m ivcr_jax.train --config configs/demo.py --workdir /tmp/kill --config.data.annotations=/tmp/demo_main/demo_corpus/ivcr.json > /tmp/kill_$1.log 2>&1; }
run a &
while true; do n=$(cat /tmp/kill/metrics.jsonl 2>/dev/null | grep -c .); [ "${n:-0}" -ge 30 ] && break; sleep 1; done
pkill -9 -f "ivcr_jax.train --config configs/demo.py --workdir /tmp/kill"; sleep 2
echo "killed after $(grep -c . /tmp/kill/metrics.jsonl) logged steps; checkpoints: $(ls /tmp/kill/checkpoints)"
run b
echo "restart exit $?"
python3 - <<'PY'
import json
def rows(p):
    return {r["step"]: r["loss"] for r in map(json.loads, open(p))}
a, b = rows("/tmp/demo_main/train/metrics.jsonl"), rows("/tmp/kill/metrics.jsonl")
diff = [s for s in sorted(a) if a[s] != b.get(s)]
print(f"{len(a) - len(diff)} of {len(a)} step losses identical; differing steps: {diff[:10]}")
PY
