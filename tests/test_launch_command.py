"""The launch command is built in one place; slurm/train.sh spells it too and must stay in step."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from hwr_dist.errors import HwrError
from hwr_dist.train.launcher import TRAIN_MODULE, accelerate_argv, build_command

ROOT = Path(__file__).resolve().parent.parent


def shell_array(script: str, guard: str) -> list[str]:
    """The NODE_CMD=( ... ) array that follows `guard` in the job script, as words."""
    start = script.index(guard)
    body = re.search(r"NODE_CMD=\((.*?)\)\n", script[start:], re.S).group(1)
    return shlex.split(body.replace("\\\n", " "))


def test_slurm_multinode_command_matches_the_builder():
    script = (ROOT / "slurm" / "train.sh").read_text()
    ours = accelerate_argv("$WORLD", ["${TRAIN[@]}"], num_machines="$NODES", machine_rank="@NODEID@",
                           main_ip="$MASTER_ADDR", main_port="$PORT",
                           launcher=["$PYTHON", "-m", "accelerate.commands.launch"])
    assert shell_array(script, 'if [ "$NODES" -gt 1 ]') == ours


def test_slurm_single_node_command_matches_the_builder():
    script = (ROOT / "slurm" / "train.sh").read_text()
    ours = accelerate_argv("$PROCS", ["${TRAIN[@]}"], main_port="$PORT",
                           launcher=["$PYTHON", "-m", "accelerate.commands.launch"])
    assert shell_array(script, 'elif [ "$PROCS" -gt 1 ]') == ours


def test_hwr_launch_uses_the_builder():
    cmd, env = build_command("configs/default.yaml", ["optim.lr=0.01"], 2, 1, 0, "127.0.0.1", 29500, "accelerate")
    assert cmd == accelerate_argv(2, [*TRAIN_MODULE, "configs/default.yaml", "optim.lr=0.01"], num_machines=1,
                                  machine_rank=0, main_ip="127.0.0.1", main_port=29500)
    assert env["ACCELERATE_USE_CPU"] == "1"  # this machine has no GPU: gloo DDP on CPU
    cmd, _ = build_command("c.yaml", [], 2, 2, 1, "10.0.0.1", 29400, "torchrun")
    assert cmd[1:] == ["--rdzv_backend", "c10d", "--rdzv_endpoint", "10.0.0.1:29400", "--rdzv_id", "hwr",
                       "--nnodes", "2", "--nproc_per_node", "2", *TRAIN_MODULE, "c.yaml"]


def test_bad_layout_is_refused():
    with pytest.raises(HwrError, match="node-rank"):
        build_command("c.yaml", [], 2, 2, 2, "127.0.0.1", 29500, "accelerate")
