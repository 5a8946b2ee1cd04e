"""`hwr slurm submit` and `hwr slurm status`: build the sbatch line for slurm/train.sh, run it, watch jobs.

The job script does the real work (process layout, preemption, requeue, resume); see
slurm/README.md. Here: options -> one sbatch command that a user could also type.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

from hwr_dist.errors import HwrError

SCRIPT = Path(__file__).resolve().parents[1] / "launchers" / "slurm" / "train.sh"  # slurm/train.sh in a checkout
NO_SLURM = ("{cmd} not found: run this on a SLURM login node (load Slurm first if your site uses modules, "
            "e.g. `module load slurm`); `hwr slurm submit --dry-run` prints the sbatch command without it")
STATUS_KEYS = ("JobId", "JobName", "JobState", "Reason", "Restarts", "RunTime", "TimeLimit", "NumNodes",
               "NodeList", "ExitCode", "StdOut")


def _need(cmd: str) -> str:
    path = shutil.which(cmd)
    if path is None:
        raise HwrError(NO_SLURM.format(cmd=cmd))
    return path


def _env_value(name: str, value: object) -> str:
    text = str(value)
    if not text or "," in text or "=" in text or any(c.isspace() for c in text):
        raise HwrError(f"{name}: {text!r} cannot be passed to the job (no commas, '=' or spaces)")
    return text


def build_command(config: str | Path, overrides: list[str] = (), *, nodes: int | None = None,
                  gpus_per_node: int | None = None, procs_per_node: int | None = None,
                  cpus_per_task: int | None = None, time: str | None = None, partition: str | None = None,
                  job_name: str | None = None, output: str | None = None, run_name: str | None = None,
                  max_requeues: int | None = None, sbatch_opts: list[str] = (),
                  script: str | Path | None = None) -> list[str]:
    """The sbatch command line. Unset options keep the #SBATCH defaults of the script."""
    script = Path(script) if script is not None else SCRIPT
    if not script.is_file():
        raise HwrError(f"job script {script} not found; pass --script PATH to slurm/train.sh of a source checkout")
    cmd = ["sbatch"]
    for flag, value in (("--job-name", job_name), ("--nodes", nodes), ("--gpus-per-node", gpus_per_node),
                        ("--cpus-per-task", cpus_per_task), ("--time", time), ("--partition", partition),
                        ("--output", output)):
        if value is not None:
            cmd.append(f"{flag}={value}")
    env = [f"{k}={_env_value(flag, v)}" for k, v, flag in (
        ("HWR_PROCS_PER_NODE", procs_per_node, "--procs-per-node"), ("HWR_RUN_NAME", run_name, "--run-name"),
        ("HWR_MAX_REQUEUES", max_requeues, "--max-requeues")) if v is not None]
    if env:
        cmd.append("--export=" + ",".join(["ALL", *env]))
    cmd += [*sbatch_opts, str(script), str(config), *overrides]
    return cmd


def submit_config(config: Path, overrides: list[str], dry_run: bool, **options) -> None:
    """Check the config here (a bad one fails now, not in the queue), then sbatch it."""
    from hwr_dist.recipes import load

    load(config, overrides)
    job_id = submit(build_command(config, overrides, **options), dry_run)
    if job_id is not None:
        print(f"submitted job {job_id}; watch it with: hwr slurm status {job_id}")


def submit(cmd: list[str], dry_run: bool = False) -> str | None:
    """Print the command; unless dry_run, run it and return the job id."""
    print(shlex.join(cmd), flush=True)
    if dry_run:
        return None
    sbatch = _need(cmd[0])
    proc = subprocess.run([sbatch, "--parsable", *cmd[1:]], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()] or [f"exit status {proc.returncode}"]
        raise HwrError(f"sbatch refused the job: {lines[-1].strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise HwrError(f"sbatch printed no job id: {proc.stdout.strip()!r}")
    return job_id


def parse_scontrol(line: str) -> dict[str, str]:
    """One `scontrol show job -o` record -> dict (values such as Command may hold spaces)."""
    return {m.group(1): m.group(2) for m in re.finditer(
        r"(?:^|\s)([A-Za-z][\w:/.\-]*)=(.*?)(?=\s[A-Za-z][\w:/.\-]*=|$)", line.strip())}


def status(job_id: str | None = None, log_lines: int = 8) -> str:
    """squeue for your jobs; with a job id, its scontrol record and the end of its log."""
    if job_id is None:
        squeue = _need("squeue")
        proc = subprocess.run([squeue, "--me", "-O", "JobID:12,Name:20,State:12,TimeUsed:12,TimeLimit:14,"
                               "NumNodes:7,RestartCnt:15,ReasonList:40"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise HwrError(f"squeue failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        return proc.stdout.rstrip()
    if not job_id.isdigit():
        raise HwrError(f"job id must be a number, got {job_id!r}")
    scontrol = _need("scontrol")
    proc = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise HwrError(f"job {job_id} unknown to SLURM (finished jobs are forgotten after MinJobAge)")
    info = parse_scontrol(proc.stdout.strip().splitlines()[0])
    out = [f"{k:10} {info[k]}" for k in STATUS_KEYS if k in info]
    log = Path(info.get("StdOut", ""))
    if log_lines and log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-log_lines:]
        out += [f"--- last {len(tail)} lines of {log} ---", *tail]
    return "\n".join(out)
