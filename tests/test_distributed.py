"""Several processes on the CPU (gloo): really DDP, identical replicas, exact accumulation,
one all-reduce per optimizer step, evaluation counting each sample once, elastic restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hwr_dist.train.launcher import accelerate_argv
from conftest import BIN, ROOT, TINY, env, free_port, hwr, run, wait_for

pytestmark = pytest.mark.slow
PROBE = str(Path(__file__).parent / "dist_probe.py")


def accelerate_cmd(nproc: int, script: list[str]) -> list[str]:
    return accelerate_argv(nproc, script, main_port=free_port())


def probes(out: Path, world: int) -> list[dict]:
    return [torch.load(out / f"probe-rank{r}.pt", weights_only=True) for r in range(world)]


def assert_identical_replicas(ps: list[dict], world: int) -> None:
    assert [p["world_size"] for p in ps] == [world] * world
    assert [p["accelerate_processes"] for p in ps] == [world] * world
    for p in ps[1:]:
        for k, v in ps[0]["params"].items():
            assert torch.equal(v, p["params"][k]), k


def tiny(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["configs/default.yaml", *TINY, "train.epochs=1", "train.max_steps=40", f"train.out_dir={tmp_path}",
            f"train.name={name}", *extra]


def workers_of(launcher: subprocess.Popen) -> list[int]:
    # torchrun (exec'd by the launch scripts, so the Popen's pid) is the parent of its workers
    out = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_one_worker_and_finish(launchers: list[subprocess.Popen], run_dir: Path) -> None:
    """SIGKILL the last launcher's last worker once step 30 is saved, then wait for the launchers."""
    wait_for(lambda: (run_dir / "checkpoints" / "step-00000030.pt").exists(), 300, poll=0.1)
    workers = workers_of(launchers[-1])
    assert workers, "no worker to kill"
    os.kill(workers[-1], signal.SIGKILL)
    try:
        for p in launchers:
            p.wait(timeout=150)
    except subprocess.TimeoutExpired:  # workers run in sessions of their own: kill them, then torchrun
        for p in launchers:
            for pid in workers_of(p):
                os.kill(pid, signal.SIGKILL)
            os.killpg(p.pid, signal.SIGKILL)
        raise


def start_logged(cmd: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
    # A file, not a pipe: a pipe nobody reads yet can fill and stall torchrun's agent.
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env(**extra_env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def resume_step(log: str) -> int:
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert resumed, log[-3000:]
    return int(resumed[0].split(" at step ")[1].split()[0])


ELASTIC = ["train.max_steps=0", "train.epochs=2", "checkpoint.every_steps=10"]


def test_accelerate_launch_two_processes(tmp_path):
    out = tmp_path / "probe"
    proc = run(accelerate_cmd(2, [PROBE, *tiny(tmp_path, "acc")]), HWR_PROBE_OUT=str(out))  # no ACCELERATE_USE_CPU: not needed
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), DDP over gloo" in proc.stderr
    ps = probes(out, 2)
    assert_identical_replicas(ps, 2)
    # Each rank trained on its own shard, yet the replicas agree: gradients were all-reduced.
    # Evaluating the saved checkpoint on one process gives the same counts as on two.
    two = json.loads((tmp_path / "acc" / "eval_test" / "metrics.json").read_text())
    proc = hwr("evaluate", str(tmp_path / "acc"), "--out", str(tmp_path / "one"))
    assert proc.returncode == 0, proc.stderr
    one = json.loads((tmp_path / "one" / "eval_test" / "metrics.json").read_text())
    assert one["count"] == two["count"] == 1000  # 1000 test images, none padded or dropped
    assert one["confusion"] == two["confusion"]


def test_torchrun_standalone_two_processes(tmp_path):
    out = tmp_path / "probe"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", PROBE, *tiny(tmp_path, "tr")]
    proc = run(cmd, HWR_PROBE_OUT=str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical_replicas(probes(out, 2), 2)


def test_torchrun_two_nodes_on_one_host(tmp_path):
    out = tmp_path / "probe"
    port = free_port()
    cmds = [[str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
             "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes", PROBE, *tiny(tmp_path, "nodes")]
            for _ in range(2)]
    procs = [start_logged(c, tmp_path / f"node{i}.log", HWR_PROBE_OUT=str(out)) for i, c in enumerate(cmds)]
    for p in procs:
        p.wait(timeout=600)
    assert all(p.returncode == 0 for p in procs), "\n".join((tmp_path / f"node{i}.log").read_text()[-2000:]
                                                            for i in range(2))
    assert_identical_replicas(probes(out, 2), 2)


def test_accumulation_equals_large_batch_and_syncs_once_per_step(tmp_path):
    """2 processes x batch 30 x accumulation 2 == 1 process x batch 120, same data order.

    The 1-process run takes steps of 120 images, the 2-process run windows of 2 x 30 per
    rank, covering exactly the same images per optimizer step. No dropout and no
    augmentation, so the only difference is summation order (1.5e-8 after one step; it
    grows with training, so compare after a few steps).
    """
    common = ["model.dropout=0", "data.augment.enabled=false", "optim.name=sgd", "optim.lr=0.02",
              "schedule.name=constant", "train.max_steps=8", "train.log_every=4"]
    one = run([sys.executable, PROBE, *tiny(tmp_path, "one", *common, "data.batch_size=120")],
              HWR_PROBE_OUT=str(tmp_path / "p1"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(accelerate_cmd(2, [PROBE, *tiny(tmp_path, "two", *common, "data.batch_size=30",
                                               "train.grad_accum_steps=2")]),
              ACCELERATE_USE_CPU="1", HWR_PROBE_OUT=str(tmp_path / "p2"), HWR_PROBE_COMM_HOOK="1")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "batch 30 per process x 2 processes x 2 accumulation = 120 global" in two.stderr
    (p1,) = probes(tmp_path / "p1", 1)
    p2 = probes(tmp_path / "p2", 2)
    assert p1["steps"] == p2[0]["steps"] == 8
    for k, v in p1["params"].items():
        torch.testing.assert_close(p2[0]["params"][k], v, rtol=1e-5, atol=1e-6)
    # The model fits one DDP bucket: one all-reduce per optimizer step, none on the
    # non-sync micro-steps (a sync on every micro-step would give 16).
    assert [p["allreduce_calls"] for p in p2] == [8, 8]


def test_elastic_restart_resumes_from_checkpoint(tmp_path):
    """Kill one worker mid-run: torchrun restarts the group once, and it resumes from last.pt."""
    cmd = ["bash", "launch/torchrun.sh", "-n", "2", "--max-restarts", "1", *tiny(tmp_path, "elastic"), *ELASTIC]
    proc = start_logged(cmd, tmp_path / "torchrun.log")
    kill_one_worker_and_finish([proc], tmp_path / "elastic")
    log = (tmp_path / "torchrun.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert resume_step(log) >= 30
    assert (tmp_path / "elastic" / "eval_test" / "metrics.json").exists()


def test_elastic_restart_across_two_nodes(tmp_path):
    """Two "nodes" with c10d rendezvous: a worker dies on one, both restart and resume from last.pt."""
    cmd = ["bash", "launch/torchrun_multinode.sh", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint",
           f"127.0.0.1:{free_port()}", "--max-restarts", "1", *tiny(tmp_path, "nodes"), *ELASTIC]
    nodes = [start_logged(cmd, tmp_path / f"node{i}.log") for i in range(2)]
    kill_one_worker_and_finish(nodes, tmp_path / "nodes")
    logs = [(tmp_path / f"node{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert resume_step("\n".join(logs)) >= 30
    assert (tmp_path / "nodes" / "eval_test" / "metrics.json").exists()


def test_refuses_when_launcher_and_training_disagree(monkeypatch):
    """A launcher that started 2 processes while the training sees 1 must stop the run."""
    import accelerate

    from hwr_dist.config import Config
    from hwr_dist.errors import HwrError
    from hwr_dist.train.distributed import make_accelerator

    class Single:
        num_processes = 1

        def __init__(self, **kw):
            pass

    monkeypatch.setattr(accelerate, "Accelerator", Single)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(HwrError, match="launcher started 2 processes but training sees 1"):
        make_accelerator(Config())


def test_restarts_with_the_shared_store_are_refused(tmp_path):
    """Raw torchrun --max_restarts keeps torch's shared store, where a restarted group hangs."""
    shared = {k: v for k, v in env().items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "1", "--max_restarts", "1",
                           "-m", "hwr_dist.train", *tiny(tmp_path, "shared")],
                          cwd=ROOT, env=shared, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun" in proc.stderr + proc.stdout
    assert not (tmp_path / "shared").exists()  # refused before any work
