"""slurm/train.sh and `hwr slurm` on a real SLURM cluster (one controller, nodes n1 and n2).

Covers: one node x 2 processes, 2 nodes x 1 process, preemption by USR1 to the batch shell
and by TERM (to the job's steps, as SLURM preempts; and to the batch shell), requeue, exact
resume, the requeue limit, and failures that must not requeue. Every job trains the tiny
recipe for one epoch: 57 optimizer steps with 2 processes (113 with one), stop checks every
5 steps, a step checkpoint every 10.

Set HWR_SLURM_EVIDENCE=FILE to append the squeue / scontrol records and resume lines there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, ROOT, TINY, hwr, one_error_line, train_module
from slurm_fixture import SlurmClusterError, slurm_cluster  # noqa: F401  (fixture)

SCRIPT = (ROOT / "slurm" / "train.sh").resolve()  # the packaged job script, linked from slurm/
ARGS = ["configs/default.yaml", *TINY, "train.epochs=1", "train.log_every=5", "checkpoint.every_steps=10"]
TOTAL = 57
JOB_ENV = {"HWR_VENV": str(BIN.parent), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
TWO_PROCS = dict(opts=["--cpus-per-task=2"], env={"HWR_PROCS_PER_NODE": "2"})
TWO_NODES = dict(opts=["--nodes=2", "--cpus-per-task=1"], env={"HWR_PROCS_PER_NODE": "1"})


class Job:
    def __init__(self, cluster, job_id: str, log: Path, run_dir: Path):
        self.cluster, self.id, self.log, self.run_dir = cluster, job_id, log, run_dir

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "<no job log yet>"

    def info(self) -> dict[str, str]:
        return self.cluster.job_info(self.id)

    def wait(self, states, timeout: float) -> str:
        try:
            return self.cluster.wait_state(self.id, states, timeout=timeout)
        except SlurmClusterError as e:
            pytest.fail(f"{e}\n----- full job log {self.log} -----\n{self.text()}", pytrace=False)

    def wait_for_step(self, step: int, timeout: float) -> None:
        """Until a step checkpoint >= step exists (older ones are pruned): training is under way."""
        deadline = time.monotonic() + timeout
        while True:
            done = [int(p.stem.split("-")[1]) for p in (self.run_dir / "checkpoints").glob("step-*.pt")]
            if done and max(done) >= step:
                return
            if self.info().get("JobState") != "RUNNING" or time.monotonic() > deadline:
                pytest.fail(f"job {self.id} reached no step {step}: {self.info().get('JobState')}\n{self.text()}",
                            pytrace=False)
            time.sleep(0.1)


def submit(cluster, tmp_path: Path, name: str, *overrides: str, opts=(), env=None, args=ARGS) -> Job:
    runs, log = tmp_path / "runs", tmp_path / f"{name}.out"
    job_id = cluster.submit(SCRIPT, args=[*args, f"train.out_dir={runs}", *overrides],
                            sbatch_opts=[f"--job-name={name}", f"--output={log}", "--time=10", *opts],
                            cwd=ROOT, env={**JOB_ENV, **(env or {})})
    return Job(cluster, job_id, log, runs / f"{name}-{job_id}")


def evidence(title: str, text: str) -> None:
    block = f"===== {title} =====\n{text.rstrip()}\n"
    print(block)
    if os.environ.get("HWR_SLURM_EVIDENCE"):
        with open(os.environ["HWR_SLURM_EVIDENCE"], "a") as f:
            f.write(block)


def queue_records(job: Job) -> str:
    squeue = job.cluster.run(["squeue", "-j", job.id, "-O", "JobID:8,Name:10,State:12,RestartCnt:14,Reason:20"]).stdout
    return squeue + job.cluster.run(["scontrol", "show", "job", job.id]).stdout


def params(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def assert_same_result(run_dir: Path, reference: Path, total: int = TOTAL) -> None:
    a, b = params(run_dir), params(reference)
    state_a, state_b = ({k: v for k, v in c["state"].items() if k != "tracker_run_id"} for c in (a, b))
    assert state_a == state_b and state_a["step"] == total, (state_a, state_b)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs from the uninterrupted run"


def resume_lines(job: Job) -> str:
    return "\n".join(ln for ln in job.text().splitlines()
                     if re.search(r"hwr-slurm: (job|received|resuming|requeue|training|launcher)|resumed from|stopped at", ln))


# --- without a cluster --------------------------------------------------------------------------------


def test_submit_dry_run_prints_the_sbatch_command():
    proc = hwr("slurm", "submit", "configs/default.yaml", "optim.lr=0.01", "--nodes", "2", "--gpus-per-node", "4",
               "--time", "01:00:00", "-p", "gpu", "-J", "exp", "--max-requeues", "5", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"sbatch --job-name=exp --nodes=2 --gpus-per-node=4 --time=01:00:00 --partition=gpu "
                                   f"--export=ALL,HWR_MAX_REQUEUES=5 {SCRIPT} configs/default.yaml optim.lr=0.01")


def test_submit_errors_are_one_line():
    proc = hwr("slurm", "submit", "configs/default.yaml", PATH="/nonexistent")  # no sbatch on PATH
    assert proc.returncode == 2 and "sbatch not found" in one_error_line(proc)
    proc = hwr("slurm", "submit", "configs/default.yaml", "optim.lr=oops", "--dry-run")  # checked before queueing
    assert proc.returncode == 2 and "optim.lr" in one_error_line(proc) and "sbatch" not in proc.stdout


def test_stop_request_on_the_last_step_finishes_the_run(tmp_path):
    """Stopping there would only requeue a job to run the final evaluation, and skip the last epoch end."""
    run_dir = tmp_path / "runs" / "last"
    run_dir.mkdir(parents=True)
    (run_dir / "STOP").touch()
    # A stop is honoured at the first step boundary: with one step, that boundary is the last step.
    proc = train_module(*ARGS, f"train.out_dir={tmp_path / 'runs'}", "train.name=last", "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (run_dir / "preempted.json").exists() and (run_dir / "eval_test" / "metrics.json").is_file()
    assert params(run_dir)["state"]["step"] == 1


# --- on the cluster -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory):
    """An uninterrupted job: one node, two processes. Preempted jobs must end bit-identical to it."""
    job = submit(slurm_cluster, tmp_path_factory.mktemp("reference"), "ref", **TWO_PROCS)
    job.wait("COMPLETED", 300)
    return job


@pytest.mark.slurm
def test_one_node_two_processes(reference):
    text, run_dir = reference.text(), reference.run_dir
    assert "world size 2: 1 node(s) x 2 process(es), CPU" in text, text
    assert "2 process(es), DDP over gloo" in text, text  # the training's own view: DDP over 2 ranks
    for f in ("checkpoints/last.pt", "metrics.jsonl", "eval_test/metrics.json"):
        assert (run_dir / f).is_file(), f
    assert not (run_dir / "STOP").exists() and not (run_dir / "preempted.json").exists()
    info = reference.info()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), info
    assert params(run_dir)["world_size"] == 2


@pytest.mark.slurm
def test_usr1_preemption_requeues_and_resumes_exactly(slurm_cluster, tmp_path, reference):
    job = submit(slurm_cluster, tmp_path, "usr1", **TWO_PROCS)
    job.wait("RUNNING", 60)
    job.wait_for_step(20, timeout=240)
    slurm_cluster.signal_batch(job.id, "USR1")  # what --signal=B:USR1@120 sends before the time limit
    job.wait("PENDING", 120)  # the script requeued it; it waits for its BeginTime
    stopped = json.loads((job.run_dir / "preempted.json").read_text())
    assert 20 <= stopped["step"] < TOTAL, stopped
    evidence(f"job {job.id} after USR1: requeued, pending", queue_records(job))
    job.cluster.release(job.id)
    job.wait("COMPLETED", 300)
    info = job.info()
    assert (info["Restarts"], info["ExitCode"]) == ("1", "0:0"), info
    text = job.text()
    assert "received SIGUSR1" in text and "restart count 1" in text, text
    assert f"resumed from {job.run_dir}/checkpoints/last.pt at step {stopped['step']} " in text, text
    evidence(f"job {job.id} completed", queue_records(job) + "\n" + resume_lines(job))
    assert_same_result(job.run_dir, reference.run_dir)


@pytest.mark.slurm
def test_two_nodes_term_preemption_via_hwr_slurm_submit(slurm_cluster, tmp_path, reference):
    """2 nodes x 1 process, submitted with `hwr slurm submit`; TERM as a preemption sends it."""
    log = tmp_path / "term.out"
    proc = subprocess.run([str(BIN / "hwr"), "slurm", "submit", *ARGS, f"train.out_dir={tmp_path / 'runs'}",
                           "--nodes", "2", "--procs-per-node", "1", "--cpus-per-task", "1", "-J", "term",
                           "--output", str(log), "--time", "10"],
                          cwd=ROOT, env={**slurm_cluster.env, **JOB_ENV}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--nodes=2 --cpus-per-task=1" in proc.stdout and "HWR_PROCS_PER_NODE=1" in proc.stdout, proc.stdout
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    job = Job(slurm_cluster, job_id, log, tmp_path / "runs" / f"term-{job_id}")
    job.wait("RUNNING", 60)
    job.wait_for_step(20, timeout=240)
    # As SLURM preempts: TERM to the job's steps (srun and every process in it), not to the batch shell.
    slurm_cluster.run(["scancel", "--signal=TERM", job.id])
    job.wait("PENDING", 120)
    stopped = json.loads((job.run_dir / "preempted.json").read_text())
    assert 20 <= stopped["step"] < TOTAL and stopped["reason"] == "SIGTERM", stopped
    job.cluster.release(job.id)
    job.wait("COMPLETED", 300)
    info = job.info()
    assert (info["Restarts"], info["ExitCode"], info["NodeList"]) == ("1", "0:0", "n[1-2]"), info
    text = job.text()
    assert text.count("world size 2: 2 node(s) x 1 process(es)") == 2 and "2 process(es), DDP over gloo" in text, text
    assert f"resumed from {job.run_dir}/checkpoints/last.pt at step {stopped['step']} " in text, text
    evidence(f"job {job.id} (2 nodes) after TERM", queue_records(job) + "\n" + resume_lines(job))
    assert_same_result(job.run_dir, reference.run_dir)  # same world size: same bits as 1 node x 2
    status = hwr("slurm", "status", job_id, SLURM_CONF=slurm_cluster.env["SLURM_CONF"])
    assert status.returncode == 0, status.stderr
    assert re.search(r"JobState\s+COMPLETED", status.stdout) and re.search(r"Restarts\s+1", status.stdout), status.stdout
    assert "training finished" in status.stdout, status.stdout


@pytest.mark.slurm
def test_failures_do_not_requeue(slurm_cluster, tmp_path):
    bad_config = submit(slurm_cluster, tmp_path, "badcfg", "optim.lr=oops", opts=["--cpus-per-task=1"])
    bad_data = submit(slurm_cluster, tmp_path, "baddata", "data.name=mnist", f"data.root={tmp_path / 'none'}",
                      opts=["--cpus-per-task=1"])
    for job in (bad_config, bad_data):
        job.wait("FAILED", 120)
        info = job.info()
        assert (info["Restarts"], info["ExitCode"]) == ("0", "2:0"), info
        assert "not requeueing" in job.text() and "requeueing job" not in job.text(), job.text()
    assert "error: optim.lr: expected float" in bad_config.text()
    assert "launcher exited with status 2" in bad_data.text(), bad_data.text()


@pytest.mark.slurm
def test_requeue_limit_stops_a_job_that_keeps_being_preempted(slurm_cluster, tmp_path):
    job = submit(slurm_cluster, tmp_path, "limit", opts=["--cpus-per-task=1"], env={"HWR_MAX_REQUEUES": "1"})
    job.wait("RUNNING", 60)
    job.wait_for_step(10, timeout=240)
    slurm_cluster.signal_batch(job.id, "TERM")  # TERM to the batch shell: STOP file, and TERM passed to srun
    job.wait("PENDING", 120)
    step = json.loads((job.run_dir / "preempted.json").read_text())["step"]
    job.cluster.release(job.id)
    job.wait("RUNNING", 60)
    job.wait_for_step(step + 10, timeout=240)
    slurm_cluster.signal_batch(job.id, "USR1")
    job.wait("FAILED", 120)
    info = job.info()
    assert (info["Restarts"], info["ExitCode"]) == ("1", "75:0"), info
    text = job.text()
    assert "received SIGTERM" in text and "received SIGUSR1" in text, text
    assert "already requeued 1 time(s), the limit is HWR_MAX_REQUEUES=1" in text, text
    assert f"HWR_RUN_NAME={job.run_dir.name} sbatch [the same options] slurm/train.sh configs/default.yaml" in text, text
    assert (job.run_dir / "preempted.json").exists() and (job.run_dir / "checkpoints" / "last.pt").exists()


# The sequence task (CRNN + CTC) on a digit-strings recipe, tiny: 2 processes x 8 strings, 150 steps.
STRING_ARGS = ["configs/digit_strings.yaml", "model.width=8", "model.hidden=32", "model.layers=1",
               "data.strings.train_size=2400", "data.strings.eval_size=60", "data.strings.max_length=5",
               "data.batch_size=8", "data.eval_batch_size=30", "train.epochs=1", "train.log_every=5",
               "checkpoint.every_steps=10"]
STRING_STEPS = 150


@pytest.mark.slurm
def test_sequence_run_preempted_by_usr1_resumes_exactly(slurm_cluster, tmp_path):
    """A CRNN on digit strings through the same job script: USR1, requeue, resume, and the same
    weights as an uninterrupted job (strings are drawn by (seed, epoch, index), so the resumed job
    sees exactly the strings the uninterrupted one saw)."""
    reference = submit(slurm_cluster, tmp_path, "seqref", args=STRING_ARGS, **TWO_PROCS)
    reference.wait("COMPLETED", 300)
    job = submit(slurm_cluster, tmp_path, "sequsr1", args=STRING_ARGS, **TWO_PROCS)
    job.wait("RUNNING", 60)
    job.wait_for_step(20, timeout=240)
    slurm_cluster.signal_batch(job.id, "USR1")
    job.wait("PENDING", 120)
    stopped = json.loads((job.run_dir / "preempted.json").read_text())
    assert 20 <= stopped["step"] < STRING_STEPS, stopped
    job.cluster.release(job.id)
    job.wait("COMPLETED", 300)
    text = job.text()
    assert f"resumed from {job.run_dir}/checkpoints/last.pt at step {stopped['step']} " in text, text
    assert "test sequence accuracy" in text, text
    assert_same_result(job.run_dir, reference.run_dir, STRING_STEPS)
    evidence(f"sequence job {job.id} completed", resume_lines(job))
