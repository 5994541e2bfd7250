#!/usr/bin/env bash
# One GPU node (e.g. 8×H100): one process drives all local GPUs; FSDP over them.
#   launch/gpu_single_node.sh runs/paper --config.init.converted=/w/ivcr_init --config.data.annotations=...
set -euo pipefail
WORKDIR=${1:?usage: $0 WORKDIR [--config.key=value ...]}; shift
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Latency-hiding scheduler overlaps FSDP all-gathers with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
# Input workers (Grain processes, one decoder thread each): docs/benchmarks.md "Input pipeline".
# From a prepared dataset or a ViT feature cache 8 keep 8 GPUs fed; raw-video decoding cannot
# (it needs ~4 CPU-s per sample: hundreds of cores per node), so prepare the data first.
exec python3 -m ivcr_jax.train --config "${CONFIG:-configs/paper.py}" --workdir "$WORKDIR" \
  --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 \
  --config.data.workers="${DATA_WORKERS:-8}" "$@"
