#!/usr/bin/env bash
# One node, N processes (default: one per GPU, or 2 on a machine without GPUs).
#   launch/torchrun.sh [-n N] [--max-restarts K] CONFIG [key=value ...]
# With --max-restarts, a dead worker restarts the group, which resumes from its last
# checkpoint (train.resume=auto is added for that).
set -euo pipefail
nproc=""; restarts=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n) nproc=$2; shift 2 ;;
    --max-restarts) restarts=$2; shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: $0 [-n NPROC] [--max-restarts K] CONFIG [key=value ...]" >&2; exit 2; }
if [ -z "$nproc" ]; then
  nproc=$(python -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
# Processes share the cores: one thread each unless the user says otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Each rendezvous round gets a fresh store: torch 2.14's shared store keeps the dead group's
# keys, and a restarted group reads its old gloo addresses ("connection refused", or a hang).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
resume=()
[ "$restarts" -gt 0 ] && resume=(train.resume=auto)
exec torchrun --standalone --nnodes 1 --nproc_per_node "$nproc" --max_restarts "$restarts" -m hwr_dist.train "$@" "${resume[@]}"
