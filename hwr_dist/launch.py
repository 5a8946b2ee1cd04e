"""`hwr launch`: the right multi-process launcher command for this machine, printed, then run."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from hwr_dist.errors import HwrError


def gpu_count() -> int:
    # nvidia-smi is far cheaper than importing torch just to count devices
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        visible = [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        if not visible:
            return 0
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    out = subprocess.run([smi, "-L"], capture_output=True, text=True)
    count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    return min(count, len(visible)) if "CUDA_VISIBLE_DEVICES" in os.environ else count


def build_command(config: str, overrides: list[str], nproc: int | None, nnodes: int, node_rank: int,
                  master_addr: str, master_port: int, launcher: str) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) for accelerate launch or torchrun."""
    gpus = gpu_count()
    nproc = nproc or gpus or 2
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise HwrError(f"need --nproc >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes "
                       f"(got {nproc}, {nnodes}, {node_rank})")
    if gpus and nproc > gpus:
        raise HwrError(f"--nproc {nproc} but this machine has {gpus} GPU(s); use --nproc {gpus} or fewer")
    env = {}
    if not gpus:
        # One thread per process on shared cores; ACCELERATE_USE_CPU makes the group gloo DDP.
        env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    bindir = os.path.dirname(sys.executable)
    train = ["-m", "hwr_dist.train", config, *overrides]
    if launcher == "torchrun":
        rdzv = (["--standalone"] if nnodes == 1 else
                ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master_addr}:{master_port}", "--rdzv_id", "hwr"])
        cmd = [os.path.join(bindir, "torchrun"), *rdzv, "--nnodes", str(nnodes), "--nproc_per_node", str(nproc), *train]
    elif launcher == "accelerate":
        cmd = [os.path.join(bindir, "accelerate"), "launch", "--multi_gpu", "--num_machines", str(nnodes),
               "--num_processes", str(nproc * nnodes), "--machine_rank", str(node_rank),
               "--main_process_ip", master_addr, "--main_process_port", str(master_port),
               "--mixed_precision", "no", "--dynamo_backend", "no", *train]
    else:
        raise HwrError(f"--launcher must be accelerate or torchrun, got {launcher!r}")
    return cmd, env


def launch(config: str, overrides: list[str], nproc: int | None, nnodes: int, node_rank: int, master_addr: str,
           master_port: int, launcher: str, dry_run: bool) -> int:
    cmd, env = build_command(config, overrides, nproc, nnodes, node_rank, master_addr, master_port, launcher)
    shown = " ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + shlex.join(cmd)
    print(shown, file=sys.stderr, flush=True)
    if dry_run:
        return 0
    return subprocess.run(cmd, env={**os.environ, **env}).returncode
