"""Fault suite, the cases that need processes of their own: signals mid-run, two trainers on one
run directory, a lock left by a killed process, a config another user cannot read, and SIGINT or
SIGTERM to `hwr launch`. The contract is the one of tests/test_faults.py (`faults.check`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import BIN, env, wait_for
from faults import CONFIG, ROOT, TINY, check, hwr_here, snapshot

# 57 steps of 64 images, no log line before the end (log_every=1000) and a step checkpoint every
# 10 steps: the files tell how far the run is.
LONG = ["model.width=4", "data.eval_batch_size=500", "train.epochs=1", "train.log_every=1000",
        "checkpoint.every_steps=10", "checkpoint.keep_last=10"]
TOTAL = 57


@pytest.fixture
def started():
    """Processes a test starts (each in a session of its own), killed if the test left them running."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(started: list, tmp_path: Path, name: str, overrides: list[str], argv: list[str] | None = None):
    """`python -m hwr_dist.train` (or `argv`) in its own session, output to tmp_path/<name>.log."""
    cmd = argv or [sys.executable, "-m", "hwr_dist.train", CONFIG, *overrides, f"train.out_dir={tmp_path / 'runs'}",
                   f"train.name={name}"]
    with open(tmp_path / f"{name}.log", "w") as log:  # a file, not a pipe: nobody has to keep reading it
        started.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True))
    return started[-1]


def finished(proc: subprocess.Popen, tmp_path: Path, name: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc.wait(timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", (tmp_path / f"{name}.log").read_text())


def log_has(tmp_path: Path, name: str, text: str) -> bool:
    return text in (tmp_path / f"{name}.log").read_text()


def saved(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]


def frozen_after_step_10(proc: subprocess.Popen, run_dir: Path) -> int:
    """Stop the trainer (SIGSTOP) as soon as its step-10 checkpoint is there; returns the newest step
    checkpoint at that moment: the trainer is then at most 9 steps past it."""
    wait_for(lambda: (run_dir / "checkpoints" / "step-00000010.pt").exists() or proc.poll() is not None, 300)
    os.kill(proc.pid, signal.SIGSTOP)
    assert proc.poll() is None, "the run ended before its step-10 checkpoint"
    return max(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))


# --- signals ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_run_saves_within_a_step(capsys, started, tmp_path, sig, code):
    name = sig.name
    proc = start(started, tmp_path, name, LONG)
    run_dir = tmp_path / "runs" / name
    newest = frozen_after_step_10(proc, run_dir)
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    check(finished(proc, tmp_path, name), code, {})
    step = saved(run_dir)["step"]
    assert newest <= step <= newest + 10 < TOTAL, (newest, step)  # at the next step, not at a log point
    assert json.loads((run_dir / "preempted.json").read_text()) == {"step": step, "reason": name}
    if sig == signal.SIGTERM:  # and the run goes on from there
        r = hwr_here(capsys, "train", CONFIG, *LONG, f"train.out_dir={tmp_path / 'runs'}", f"train.name={name}",
                     "train.resume=auto")
        check(r, 0, {})
        assert f"at step {step}" in r.err and saved(run_dir)["step"] == TOTAL
        assert not (run_dir / "preempted.json").exists()


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(started, tmp_path):
    # steps of about a second (wide model, big batches): the second Ctrl-C lands inside the first step
    proc = start(started, tmp_path, "abort",
                 ["model.width=32", "data.batch_size=1000", "train.epochs=3", "train.log_every=1000"])
    wait_for(lambda: log_has(tmp_path, "abort", "optimizer steps") or proc.poll() is not None, 300)
    os.kill(proc.pid, signal.SIGINT)
    wait_for(lambda: log_has(tmp_path, "abort", "Ctrl-C again") or proc.poll() is not None, 30)
    os.kill(proc.pid, signal.SIGINT)
    r = check(finished(proc, tmp_path, "abort", 60), 130, {})
    run_dir = tmp_path / "runs" / "abort"
    assert r == "" and not (run_dir / "preempted.json").exists() and not list(run_dir.rglob("*.tmp*"))


# --- two trainers, one run directory ---------------------------------------------------------------


@pytest.mark.slow
def test_second_trainer_on_a_busy_run_is_refused(capsys, started, tmp_path):
    first = start(started, tmp_path, "busy", LONG)
    run_dir = tmp_path / "runs" / "busy"
    frozen_after_step_10(first, run_dir)  # holds the lock, mid-run
    try:
        before = snapshot(run_dir)
        r = hwr_here(capsys, "train", CONFIG, *LONG, f"train.out_dir={tmp_path / 'runs'}", "train.name=busy")
        check(r, 2, before, f"in use by another trainer .*\"pid\": {first.pid}")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    check(finished(first, tmp_path, "busy"), 0, {})
    assert saved(run_dir)["step"] == TOTAL and (run_dir / "summary.json").exists()


def test_lock_of_a_killed_process_is_taken_over(capsys, tmp_path):
    run_dir = tmp_path / "runs" / "locked"
    hold = ("import sys, time; from hwr_dist.files import RunLock; assert RunLock(sys.argv[1]).acquire() == ''; "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        refused = hwr_here(capsys, "train", CONFIG, *TINY, f"train.out_dir={tmp_path / 'runs'}", "train.name=locked")
        check(refused, 2, {}, f"\"pid\": {holder.pid}")
    finally:
        holder.kill()  # SIGKILL: the holder gets no chance to clean up
        holder.wait()
    assert (run_dir / ".lock").exists()
    check(hwr_here(capsys, "train", CONFIG, *TINY, f"train.out_dir={tmp_path / 'runs'}", "train.name=locked"), 0, {})
    assert saved(run_dir)["step"] == 2


# --- a config this user cannot read (root reads everything: run as nobody) ------------------------


@pytest.mark.parametrize("entry", ["module", "cli"])
def test_unreadable_config(tmp_path, entry):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run as another user (root itself reads any file)")
    folder = Path(tempfile.mkdtemp(prefix="hwr-unreadable-", dir="/tmp"))  # tmp_path is private to root
    try:
        folder.chmod(0o777)
        config = folder / "secret.yaml"
        config.write_text("train:\n  epochs: 1\n")
        config.chmod(0)
        before = snapshot(folder)
        program = [sys.executable, "-m", "hwr_dist.train"] if entry == "module" else [str(BIN / "hwr"), "train"]
        proc = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *program,
                               str(config), f"train.out_dir={folder / 'runs'}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=env(HOME=str(folder), MPLCONFIGDIR=str(folder)))
        check(proc, 2, before, "cannot read config file .*Permission denied|is not readable")
    finally:
        shutil.rmtree(folder)


# --- hwr launch: a signal stops the launcher and every rank, cleanly --------------------------------


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_to_hwr_launch_stops_every_process(started, tmp_path, sig, code):
    argv = [str(BIN / "hwr"), "launch", CONFIG, "--nproc", "2", *LONG, "train.epochs=3",
            f"train.out_dir={tmp_path / 'runs'}", "train.name=launched"]
    proc = start(started, tmp_path, "launched", [], argv)
    run_dir, workers = tmp_path / "runs" / "launched", set()
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step-00000010.pt").exists() or proc.poll() is not None, 300)
        workers = descendants(proc.pid)
        assert proc.poll() is None and len(workers) >= 3, (tmp_path / "launched.log").read_text()[-3000:]
        proc.send_signal(sig)
        result = finished(proc, tmp_path, "launched", 120)
        wait_for(lambda: not any(alive(p) for p in workers), 30)
        assert not [p for p in workers if alive(p)], result.stderr[-3000:]  # the launcher and both ranks
    finally:  # the ranks run in sessions of their own: the fixture's clean-up would not reach them
        for p in workers:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    check(result, code, {})
    assert "STOP exists" in json.loads((run_dir / "preempted.json").read_text())["reason"]
    assert saved(run_dir)["step"] < 3 * 28 and not (run_dir / "STOP").exists()  # stopped mid-run, resumable
