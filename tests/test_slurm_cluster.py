"""Real-SLURM smoke tests for the test cluster fixture (two nodes, n1 and n2)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from slurm_cluster import parse_scontrol_oneliner  # noqa: E402
from slurm_fixture import slurm_cluster  # noqa: E402,F401  (fixture)

TWO_NODE_SCRIPT = """#!/bin/bash
#SBATCH -N 2
#SBATCH --ntasks-per-node=1
#SBATCH -t 2
echo "batch nodelist=$SLURM_JOB_NODELIST nnodes=$SLURM_NNODES"
srun --kill-on-bad-exit=1 bash -c 'echo "task host=$(hostname) node=$SLURMD_NODENAME nodeid=$SLURM_NODEID procid=$SLURM_PROCID nodelist=$SLURM_JOB_NODELIST"'
"""

TWO_TASK_SCRIPT = """#!/bin/bash
#SBATCH -N 1
#SBATCH --ntasks=2
#SBATCH -t 2
srun --kill-on-bad-exit=1 bash -c 'echo "task node=$SLURMD_NODENAME nodeid=$SLURM_NODEID procid=$SLURM_PROCID localid=$SLURM_LOCALID ntasks=$SLURM_NTASKS"'
"""

REQUEUE_SCRIPT = """#!/bin/bash
#SBATCH -N 1
#SBATCH -n 1
#SBATCH -t 2
READY="$1"
echo "run restart_count=${SLURM_RESTART_COUNT:-0} node=$SLURMD_NODENAME"
if [ "${SLURM_RESTART_COUNT:-0}" = "0" ]; then
  got=0
  trap 'got=1' USR1
  touch "$READY"
  for i in $(seq 1 600); do
    sleep 0.1 & wait $!
    [ "$got" = 1 ] && break
  done
  echo "got_usr1=$got; requeueing"
  scontrol requeue "$SLURM_JOB_ID"
  echo "requeue_rc=$?"
  exit 0
fi
echo "second run done restart_count=$SLURM_RESTART_COUNT"
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_parse_scontrol_oneliner():
    d = parse_scontrol_oneliner(
        "JobId=7 JobName=a b UserId=root(0) JobState=COMPLETED Reason=None "
        "Command=/x/y.sh arg1 WorkDir=/tmp StdOut=/tmp/o.out"
    )
    assert d["JobId"] == "7"
    assert d["JobName"] == "a b"
    assert d["JobState"] == "COMPLETED"
    assert d["Command"] == "/x/y.sh arg1"
    assert d["StdOut"] == "/tmp/o.out"


def test_two_node_job(slurm_cluster, tmp_path):
    script = _write(tmp_path / "two_node.sh", TWO_NODE_SCRIPT)
    out = tmp_path / "two_node.out"
    job = slurm_cluster.submit(script, sbatch_opts=["-o", str(out)], cwd=tmp_path)
    assert slurm_cluster.wait_state(job, "COMPLETED", timeout=60) == "COMPLETED"
    info = slurm_cluster.job_info(job)
    assert info["NumNodes"] == "2"
    assert info["ExitCode"] == "0:0"
    text = out.read_text()
    ids = sorted(re.findall(r"nodeid=(\d+)", text))
    assert ids == ["0", "1"], text
    assert sorted(re.findall(r"node=(n\d)", text)) == ["n1", "n2"], text
    assert "nodelist=n[1-2]" in text, text


def test_one_node_two_tasks(slurm_cluster, tmp_path):
    script = _write(tmp_path / "two_task.sh", TWO_TASK_SCRIPT)
    out = tmp_path / "two_task.out"
    job = slurm_cluster.submit(script, sbatch_opts=["-o", str(out)], cwd=tmp_path)
    slurm_cluster.wait_state(job, "COMPLETED", timeout=60)
    text = out.read_text()
    assert sorted(re.findall(r"procid=(\d)", text)) == ["0", "1"], text
    assert sorted(re.findall(r"localid=(\d)", text)) == ["0", "1"], text
    assert len(set(re.findall(r"node=(n\d)", text))) == 1, text
    assert slurm_cluster.job_info(job)["NumNodes"] == "1"


def test_requeue_on_usr1(slurm_cluster, tmp_path):
    script = _write(tmp_path / "requeue.sh", REQUEUE_SCRIPT)
    out = tmp_path / "requeue.out"
    ready = tmp_path / "ready"
    job = slurm_cluster.submit(
        script, args=[str(ready)], sbatch_opts=["-o", str(out), "--open-mode=append"], cwd=tmp_path
    )
    slurm_cluster.wait_state(job, "RUNNING", timeout=30)
    deadline = time.monotonic() + 30
    while not ready.exists():  # the trap is set once this file exists
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no output"
        time.sleep(0.05)

    slurm_cluster.signal_batch(job, "USR1")
    # After `scontrol requeue` the job goes COMPLETING -> PENDING (Reason=BeginTime).
    slurm_cluster.wait_state(job, "PENDING", timeout=30)
    info = slurm_cluster.job_info(job)
    assert info["Restarts"] == "1", info
    slurm_cluster.release(job)  # start now instead of after BeginTime
    t0 = time.monotonic()
    slurm_cluster.wait_state(job, "COMPLETED", timeout=30)
    assert time.monotonic() - t0 < 8, "release() did not start the requeued job at once"

    text = out.read_text()
    assert "run restart_count=0" in text, text
    assert "got_usr1=1; requeueing" in text, text
    assert "requeue_rc=0" in text, text
    assert "run restart_count=1" in text, text
    assert "second run done restart_count=1" in text, text
