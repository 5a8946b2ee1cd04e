#!/usr/bin/env bash
# Several nodes with c10d rendezvous; run the same command on every node.
#   launch/torchrun_multinode.sh --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:PORT \
#       [--rdzv-id ID] [--max-restarts K] CONFIG [key=value ...]
# With --max-restarts, a dead worker makes torchrun restart the whole group; the training
# resumes from its last checkpoint (train.resume=auto is added for that).
set -euo pipefail
nnodes=1; nproc=1; endpoint=""; rdzv_id="hwr"; restarts=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) nnodes=$2; shift 2 ;;
    --nproc-per-node) nproc=$2; shift 2 ;;
    --rdzv-endpoint) endpoint=$2; shift 2 ;;
    --rdzv-id) rdzv_id=$2; shift 2 ;;
    --max-restarts) restarts=$2; shift 2 ;;
    --) shift; break ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ -n "$endpoint" ] && [ $# -ge 1 ] || {
  echo "usage: $0 --nnodes N --nproc-per-node P --rdzv-endpoint HOST:PORT [--rdzv-id ID] [--max-restarts K] CONFIG [key=value ...]" >&2
  exit 2
}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Each rendezvous round gets a fresh store: torch 2.14's shared store keeps the dead group's
# keys, and a restarted group reads its old gloo addresses ("connection refused", or a hang).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --nnodes "$nnodes" --nproc_per_node "$nproc" --rdzv_backend c10d --rdzv_endpoint "$endpoint" \
  --rdzv_id "$rdzv_id" --max_restarts "$restarts" -m hwr_dist.train "$@" train.resume=auto
