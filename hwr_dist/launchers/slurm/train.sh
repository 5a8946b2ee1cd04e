#!/bin/bash
# hwr-dist on SLURM: one node or many, with preemption, requeue and automatic resume.
#
#   sbatch slurm/train.sh CONFIG [section.key=value ...]
#   sbatch --nodes=2 --gpus-per-node=4 slurm/train.sh configs/default.yaml optim.lr=0.01
#   hwr slurm submit configs/default.yaml --nodes 2 --gpus-per-node 4      (builds the line above)
#
# The #SBATCH lines are defaults: options on the sbatch command line win. GPUs are not
# requested here, so the script also runs on CPU-only partitions; ask for them with
# --gpus-per-node=G. Details, environment variables and the preemption design: slurm/README.md.
#
#SBATCH --job-name=hwr
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append

set -uo pipefail  # no -e: the launcher's exit status is examined below

log() { printf '[%s] hwr-slurm: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*"; }
fail() { local code=$1; shift; log "error: $*"; exit "$code"; }

# --- signals: set at once, so that a preemption during set-up is not lost -----------------
# USR1 (--signal=B:USR1@120, before the time limit) and TERM (preemption, scancel) reach
# this shell. torchrun does not forward USR1 to its workers, so the stop request travels as
# the file $RUN_DIR/STOP on the shared file system: every rank on every node sees it and
# they agree at the next check point to save checkpoints/last.pt, write preempted.json and
# exit 0. TERM (the end is near) is also passed on to every process of the job's steps with
# `scancel --signal=TERM` (the training processes only set a flag on it); not with
# `kill -TERM <srun>`: srun takes TERM as "terminate the step" and SIGKILLs it after KillWait.
SIGNALLED=""
RUN_DIR=""
LAUNCHER_PID=""
FORWARDED=""
on_signal() {
  [ -n "$SIGNALLED" ] || SIGNALLED=$1
  log "received SIG$1: asking training to save a checkpoint and stop"
  [ -n "$RUN_DIR" ] && touch "$RUN_DIR/STOP"
  if [ "$1" = TERM ] && [ -n "$LAUNCHER_PID" ] && [ -z "$FORWARDED" ]; then
    FORWARDED=1
    scancel --signal=TERM "$SLURM_JOB_ID" && log "passed SIGTERM on to the training processes"
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

[ -n "${SLURM_JOB_ID:-}" ] || fail 2 "not inside a SLURM job; submit with: sbatch slurm/train.sh CONFIG [overrides]"
[ $# -ge 1 ] || fail 2 "usage: sbatch slurm/train.sh CONFIG [section.key=value ...]"
CONFIG=$1
shift
printf -v AGAIN ' %q' "$CONFIG" "$@"
AGAIN="sbatch [the same options] slurm/train.sh$AGAIN"  # to continue by hand

RESTARTS=${SLURM_RESTART_COUNT:-0}
MAX_REQUEUES=${HWR_MAX_REQUEUES:-3}
[[ "$MAX_REQUEUES" =~ ^[0-9]+$ ]] || fail 2 "HWR_MAX_REQUEUES=$MAX_REQUEUES is not an integer >= 0"
log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) starting on ${SLURM_JOB_NODELIST:-?}: restart count $RESTARTS, at most $MAX_REQUEUES requeues"

# --- environment: a hook users set once ---------------------------------------------------
# HWR_ENV_SETUP=FILE is sourced if set, else slurm/env.sh in the submit directory if present
# (module loads, conda activate, ...); then HWR_VENV=DIR activates a virtual environment.
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
if [ -n "${HWR_ENV_SETUP:-}" ]; then
  [ -f "$HWR_ENV_SETUP" ] || fail 2 "HWR_ENV_SETUP=$HWR_ENV_SETUP is not a file"
  log "sourcing $HWR_ENV_SETUP"
  # shellcheck disable=SC1090
  source "$HWR_ENV_SETUP" || fail 2 "sourcing $HWR_ENV_SETUP failed"
elif [ -f "$SUBMIT_DIR/slurm/env.sh" ]; then
  log "sourcing $SUBMIT_DIR/slurm/env.sh"
  # shellcheck disable=SC1091
  source "$SUBMIT_DIR/slurm/env.sh" || fail 2 "sourcing $SUBMIT_DIR/slurm/env.sh failed"
fi
if [ -n "${HWR_VENV:-}" ]; then
  [ -f "$HWR_VENV/bin/activate" ] || fail 2 "HWR_VENV=$HWR_VENV has no bin/activate"
  # shellcheck disable=SC1091
  source "$HWR_VENV/bin/activate"
fi
PYTHON=${HWR_PYTHON:-python3}
"$PYTHON" -c 'import hwr_dist, importlib.util as u; assert u.find_spec("accelerate")' 2>/dev/null ||
  fail 2 "$PYTHON cannot import hwr_dist and accelerate; set HWR_VENV=/path/to/venv or HWR_ENV_SETUP=/path/to/setup.sh"

# --- run directory: stable across requeues, so train.resume=auto finds last.pt ------------
RUN_NAME=${HWR_RUN_NAME:-${SLURM_JOB_NAME:-hwr}-$SLURM_JOB_ID}
# train.name before the user's overrides (an explicit train.name=... wins); resume=auto last.
ARGS=("$CONFIG" "train.name=$RUN_NAME" "$@" "train.resume=auto")
DIR=$("$PYTHON" -m hwr_dist.cli config run-dir "${ARGS[@]}") || fail 2 "bad config or overrides (see the error above); not requeueing"
mkdir -p "$DIR" || fail 2 "cannot create run directory $DIR"
rm -f "$DIR/STOP" "$DIR/preempted.json"  # left over from the previous run of this job
RUN_DIR=$DIR
[ -n "$SIGNALLED" ] && touch "$RUN_DIR/STOP"  # a signal came during set-up
log "run directory $RUN_DIR"
if [ -f "$RUN_DIR/checkpoints/last.pt" ]; then
  log "resuming from $RUN_DIR/checkpoints/last.pt (train.resume=auto)"
else
  log "no checkpoint yet: starting fresh"
fi

# --- processes per node: HWR_PROCS_PER_NODE, else one per allocated GPU, else one (CPU) ---
GPUS=${SLURM_GPUS_ON_NODE:-}
if [ -z "$GPUS" ] && [ -n "${SLURM_JOB_GPUS:-}" ]; then GPUS=$(awk -F, '{print NF}' <<<"$SLURM_JOB_GPUS"); fi
GPUS=${GPUS:-0}
[[ "$GPUS" =~ ^[0-9]+$ ]] || GPUS=0
PROCS=${HWR_PROCS_PER_NODE:-}
if [ -z "$PROCS" ]; then
  if [ "$GPUS" -gt 0 ]; then PROCS=$GPUS; else PROCS=1; fi
fi
[[ "$PROCS" =~ ^[1-9][0-9]*$ ]] || fail 2 "HWR_PROCS_PER_NODE=$PROCS is not a positive integer"
NODES=${SLURM_NNODES:-1}
WORLD=$((NODES * PROCS))
if [ "$GPUS" -eq 0 ]; then
  export ACCELERATE_USE_CPU=1  # CPU processes: DDP over gloo
  KIND=CPU
else
  KIND="$GPUS GPU(s) per node"
fi
CPUS=${SLURM_CPUS_PER_TASK:-1}
THREADS=$((CPUS / PROCS))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((THREADS > 0 ? THREADS : 1))}
log "world size $WORLD: $NODES node(s) x $PROCS process(es), $KIND, OMP_NUM_THREADS=$OMP_NUM_THREADS"

# --- launch: one srun task per node, in the background, and wait (so the traps run) ------
# srun even on one node: SLURM delivers a preemption's TERM (and `scancel --signal=TERM`) to
# the job's steps, not to this batch shell, so training must run in a step to hear it.
PORT=${HWR_MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 16 + RESTARTS) % 40000))}
TRAIN=(-m hwr_dist.train "${ARGS[@]}")
if [ "$NODES" -gt 1 ]; then
  FIRST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  # NodeAddr: how SLURM itself reaches that node (its host name on most clusters).
  ADDR=$(scontrol show node -o "$FIRST" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  MASTER_ADDR=${HWR_MASTER_ADDR:-${ADDR:-$FIRST}}
  log "rendezvous at $MASTER_ADDR:$PORT (node $FIRST)"
  # The same flags as hwr_dist.train.launcher.accelerate_argv (tests/test_launch_command.py).
  NODE_CMD=("$PYTHON" -m accelerate.commands.launch --multi_gpu
            --num_machines "$NODES" --num_processes "$WORLD" --machine_rank @NODEID@
            --main_process_ip "$MASTER_ADDR" --main_process_port "$PORT" "${TRAIN[@]}")
elif [ "$PROCS" -gt 1 ]; then
  NODE_CMD=("$PYTHON" -m accelerate.commands.launch --multi_gpu
            --num_machines 1 --num_processes "$PROCS" --main_process_port "$PORT" "${TRAIN[@]}")
else
  NODE_CMD=("$PYTHON" "${TRAIN[@]}")
fi
# Per node: put in the node's rank, run the launcher, pass its status on. torchrun exits
# non-zero after a TERM even when its workers stopped cleanly; rank 0 (on another node) may
# still be writing the checkpoint then, and srun --kill-on-bad-exit would cut it short: so
# after a TERM, a non-zero status counts as success once preempted.json shows up (60 s).
# shellcheck disable=SC2016
NODE_SH='args=(); for a in "$@"; do args+=("${a//@NODEID@/${SLURM_NODEID:-0}}"); done
term=""; trap "term=1" TERM
"${args[@]}" & pid=$!
while :; do wait $pid; rc=$?; [ $rc -gt 128 ] || break; kill -0 $pid 2>/dev/null || { wait $pid; rc=$?; break; }; done
if [ $rc -ne 0 ] && [ -n "$term" ]; then
  for i in $(seq 600); do [ -f "$HWR_RUN_DIR/preempted.json" ] && exit 0; sleep 0.1; done
fi
exit $rc'
export HWR_RUN_DIR=$RUN_DIR
CMD=(srun --kill-on-bad-exit=1 --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --cpus-per-task="$CPUS"
     bash -c "$NODE_SH" hwr-node "${NODE_CMD[@]}")
log "launch: srun ... ${NODE_CMD[*]}"
"${CMD[@]}" &
LAUNCHER_PID=$!
while :; do
  wait "$LAUNCHER_PID"
  RC=$?
  [ "$RC" -gt 128 ] || break  # a real exit status
  kill -0 "$LAUNCHER_PID" 2>/dev/null || { wait "$LAUNCHER_PID"; RC=$?; break; }
  # still running: a trap cut the wait short; keep waiting
done
rm -f "$RUN_DIR/STOP"
log "launcher exited with status $RC"

# --- requeue when training stopped for a preemption, up to HWR_MAX_REQUEUES times ----------
requeue() {
  if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
    log "error: not requeueing: this job was already requeued $RESTARTS time(s), the limit is HWR_MAX_REQUEUES=$MAX_REQUEUES."
    log "error: continue from its checkpoint with: HWR_RUN_NAME=$(basename "$RUN_DIR") $AGAIN"
    exit 75
  fi
  trap - USR1 TERM
  log "requeueing job $SLURM_JOB_ID (restart $((RESTARTS + 1)) of at most $MAX_REQUEUES); it will resume from $RUN_DIR/checkpoints/last.pt"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
  fi
  fail 1 "scontrol requeue $SLURM_JOB_ID failed; continue with: HWR_RUN_NAME=$(basename "$RUN_DIR") $AGAIN"
}
if [ -f "$RUN_DIR/preempted.json" ]; then
  log "training stopped early to be preempted: $(tr -d '\n' <"$RUN_DIR/preempted.json")"
  requeue
elif [ "$RC" -ne 0 ] && [ -n "$SIGNALLED" ]; then
  # Killed before a clean stop (e.g. a signal during start-up, or torchrun's 30 s kill after
  # TERM): the last checkpoint on disk is still good, so go on from it.
  log "training exited with status $RC after SIG$SIGNALLED without a clean stop"
  requeue
elif [ "$RC" -ne 0 ]; then
  fail "$RC" "training failed with status $RC; not requeueing"
fi
log "training finished"
