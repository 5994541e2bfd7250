#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker; jax.distributed discovers the slice.
#   launch/tpu_pod.sh TPU_NAME ZONE /mnt/runs/paper [--config.key=value ...]
# WORKDIR must be a directory every worker sees (checkpoints are written by all processes):
# a Filestore/NFS mount, or a GCS bucket mounted with gcsfuse on each worker. Data paths in the
# config (annotations, videos or the prepared ArrayRecord corpus) must be readable on every worker.
# Check the per-chip memory of the configuration first, from any CPU machine with libtpu:
#   python -m ivcr_jax.train.plan --config configs/paper.py --topology v5p:2x2x2 --mesh 1,-1,1
set -euo pipefail
TPU=${1:?usage: $0 TPU_NAME ZONE WORKDIR [overrides]}; ZONE=${2:?zone}; WORKDIR=${3:?workdir}; shift 3
CMD="cd ~/ivcr_jax && python3 -m ivcr_jax.train --config ${CONFIG:-configs/paper.py} --workdir $WORKDIR \
  --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 $*"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$CMD"
