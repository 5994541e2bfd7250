#!/usr/bin/env bash
# Kill a demo training run with SIGKILL after 30 logged steps, restart it, and compare every
# step's loss with an uninterrupted run of the same config (here: the one of `python -m ivcr_jax
# --workdir /tmp/demo_main`, whose corpus is reused).
cd /work/main
run() { python3 -m ivcr_jax.train --config configs/demo.py --workdir /tmp/kill --config.data.annotations=/tmp/demo_main/demo_corpus/ivcr.json > /tmp/kill_$1.log 2>&1; }
run a &
while true; do n=$(grep -c . /tmp/kill/metrics.jsonl 2>/dev/null || echo 0); [ "$n" -ge 30 ] && break; sleep 1; done
pkill -9 -f "ivcr_jax.train --config configs/demo.py --workdir /tmp/kill"; sleep 2
echo "killed after $(grep -c . /tmp/kill/metrics.jsonl) logged steps; checkpoints: $(ls /tmp/kill/checkpoints)"
run b
echo "restart exit $?"
