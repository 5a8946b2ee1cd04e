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
# With the agent's store, gloo process groups of a restarted group hang in their set-up
# (seen with torch 2.14); workers keeping their own store restart cleanly.
export TORCHELASTIC_USE_AGENT_STORE=${TORCHELASTIC_USE_AGENT_STORE:-False}
resume=()
[ "$restarts" -gt 0 ] && resume=(train.resume=auto)
exec torchrun --standalone --nnodes 1 --nproc_per_node "$nproc" --max_restarts "$restarts" -m hwr_dist.train "$@" "${resume[@]}"
