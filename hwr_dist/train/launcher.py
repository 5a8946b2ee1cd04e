"""The launch command: the one place that knows how to start `python -m hwr_dist.train` on N processes.

`hwr launch`, the benchmarks and the tests build their commands here; a test keeps
`slurm/train.sh` in step with it.
"""

from __future__ import annotations

import os
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


TRAIN_MODULE = ["-m", "hwr_dist.train"]


def accelerate_argv(num_processes: int | str, program: list[str], *, num_machines: int | str = 1,
                    machine_rank: int | str | None = None, main_ip: str | None = None,
                    main_port: int | str | None = None, launcher: list[str] | None = None) -> list[str]:
    """`accelerate launch` for `program` (e.g. TRAIN_MODULE + config); slurm/train.sh spells the same
    flags in the same order (a test compares them). --multi_gpu also means gloo DDP on CPU."""
    bindir = os.path.dirname(sys.executable)
    # No --mixed_precision or --dynamo_backend: those stay the user's (accelerate config, environment,
    # or train.mixed_precision in the YAML; see README "Precision and accumulation").
    cmd = [*(launcher or [os.path.join(bindir, "accelerate"), "launch"]), "--multi_gpu",
           "--num_machines", str(num_machines), "--num_processes", str(num_processes)]
    for flag, value in (("--machine_rank", machine_rank), ("--main_process_ip", main_ip),
                        ("--main_process_port", main_port)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + program


def build_command(config: str, overrides: list[str], nproc: int | None, nnodes: int, node_rank: int,
                  master_addr: str, master_port: int, launcher: str) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) for accelerate launch or torchrun."""
    gpus = gpu_count()
    nproc = nproc if nproc is not None else (gpus or 2)
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise HwrError(f"need --nproc >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes "
                       f"(got {nproc}, {nnodes}, {node_rank})")
    if gpus and nproc > gpus:
        raise HwrError(f"--nproc {nproc} but this machine has {gpus} GPU(s); use --nproc {gpus} or fewer")
    env = {}
    if not gpus:
        # One thread per process on shared cores; ACCELERATE_USE_CPU makes the group gloo DDP.
        env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    train = [*TRAIN_MODULE, config, *overrides]
    if launcher == "torchrun":
        rdzv = (["--standalone"] if nnodes == 1 else
                ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master_addr}:{master_port}", "--rdzv_id", "hwr"])
        cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), *rdzv, "--nnodes", str(nnodes),
               "--nproc_per_node", str(nproc), *train]
    elif launcher == "accelerate":
        cmd = accelerate_argv(nproc * nnodes, train, num_machines=nnodes, machine_rank=node_rank,
                              main_ip=master_addr, main_port=master_port)
    else:
        raise HwrError(f"--launcher must be accelerate or torchrun, got {launcher!r}")
    return cmd, env
