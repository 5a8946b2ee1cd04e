"""The end of a multi-process run is orderly: every rank finishes the final evaluation, the tracker
(W&B, offline) is closed, the process group is destroyed, and every rank exits 0 together.

Once in about twenty 2-process runs with W&B offline, rank 1 used to die with SIGABRT
("terminate called without an active exception") right after its last epoch. CI runs the
end of a run twice; a hand run repeats it often enough to catch a 1-in-20 failure:

    HWR_STRESS_REPEATS=40 .venv/bin/python -m pytest -q tests/test_end_of_run.py
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import run
from faults import CONFIG, TINY

pytest.importorskip("wandb")

from conftest import free_port, wandb_env  # noqa: E402
from wandb_runfile import find_offline_runs, read_run  # noqa: E402

from hwr_dist.train.launcher import TRAIN_MODULE, accelerate_argv  # noqa: E402

REPEATS = int(os.environ.get("HWR_STRESS_REPEATS", "2"))
# What a rank dying at exit leaves in the launcher's output.
DEATH = ("terminate called", "SIGABRT", "Signals.SIGABRT", "ChildFailedError", "Traceback", "exitcode")


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(REPEATS))
def test_two_process_run_ends_cleanly(tmp_path, attempt):
    overrides = [*TINY, "train.max_steps=4", f"train.out_dir={tmp_path / 'runs'}", "train.name=end",
                 "tracking.wandb.enabled=true", "--quiet"]
    cmd = accelerate_argv(2, [*TRAIN_MODULE, CONFIG, *overrides], main_port=free_port())
    proc = run(cmd, timeout=300, ACCELERATE_USE_CPU="1", **wandb_env(tmp_path, WANDB_DIR=str(tmp_path / "wandb")))
    output = proc.stdout + proc.stderr
    # The launcher exits 0 only when every rank did: a rank killed by a signal fails the whole job.
    assert proc.returncode == 0, output[-4000:]
    assert not [d for d in DEATH if d in output], output[-4000:]
    summary = json.loads((tmp_path / "runs" / "end" / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["steps"] == 4
    (offline,) = find_offline_runs(tmp_path / "wandb")  # one W&B run for the job, closed with exit code 0
    assert read_run(offline).exit_code == 0
