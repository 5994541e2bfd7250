#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker; jax.distributed discovers the slice.
#   launch/tpu_pod.sh TPU_NAME ZONE gs://bucket/runs/paper [--config.key=value ...]
set -euo pipefail
TPU=${1:?usage: $0 TPU_NAME ZONE WORKDIR [overrides]}; ZONE=${2:?zone}; WORKDIR=${3:?workdir}; shift 3
CMD="cd ~/ivcr_jax && python3 -m ivcr_jax.train --config ${CONFIG:-configs/paper.py} --workdir $WORKDIR \
  --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 $*"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$CMD"
