"""Tracking: one W&B run per job (offline here), continued across a kill and resume;
TensorBoard; clear errors when a backend is missing; `hwr report`; the sweep file.

W&B runs offline only, every WANDB_* directory in tmp; the offline run files are read
back with tests/wandb_runfile.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, ROOT, TINY, env, free_port, hwr, one_error_line, run, wait_for, wandb_env

pytest.importorskip("wandb")

from wandb_runfile import find_offline_runs, read_run  # noqa: E402

from hwr_dist.recipes import load as load_config  # noqa: E402
from hwr_dist.errors import HwrError  # noqa: E402


def read_torch(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def tb_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# --- a 2-process job: one offline run with config, history, final metrics, images, model ---------


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    overrides = [*TINY, "data.batch_size=64", f"train.out_dir={tmp / 'runs'}", "train.name=dist",
                 "tracking.wandb.enabled=true", "tracking.wandb.log_model=true", "tracking.wandb.tags=[test, ddp]",
                 "tracking.wandb.group=g1", "tracking.tensorboard=true"]
    from hwr_dist.train.launcher import TRAIN_MODULE, accelerate_argv

    cmd = accelerate_argv(2, [*TRAIN_MODULE, "configs/default.yaml", *overrides], main_port=free_port())
    started = time.perf_counter()
    # W&B's own variables fill what the config leaves unset; what the config sets (group, tags) wins.
    proc = run(cmd, timeout=300, ACCELERATE_USE_CPU="1", **wandb_env(
        tmp, WANDB_DIR=str(tmp / "wandb_dir"), WANDB_PROJECT="envproj", WANDB_JOB_TYPE="envjob",
        WANDB_RUN_GROUP="envgroup", WANDB_NAME="envname"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs" / "dist", tmp / "wandb_dir", proc, time.perf_counter() - started


@pytest.mark.slow
def test_two_processes_make_one_offline_run(dist_run):
    run_dir, wandb_dir, proc, _ = dist_run
    dirs = find_offline_runs(wandb_dir)
    assert len(dirs) == 1, dirs  # one run per job, not per process
    assert not (run_dir / "wandb").exists()  # WANDB_DIR wins over the run directory
    tracking = json.loads((run_dir / "tracking.json").read_text())
    wb = read_run(dirs[0])
    ckpt = read_torch(run_dir / "checkpoints" / "last.pt")
    assert wb.run_id == tracking["run_id"] == ckpt["state"]["tracker_run_id"] != ""
    assert dirs[0].name.endswith("-" + wb.run_id)
    assert wb.project == "envproj" and wb.job_type == "envjob" and wb.display_name == "envname"
    assert wb.group == "g1" and wb.tags == ["test", "ddp"]
    assert wb.resume is False and wb.exit_code == 0

    # the resolved config, with the system facts
    assert wb.config["optim"]["lr"] == 0.003 and wb.config["model"]["width"] == 8
    assert wb.config["tracking"]["wandb"]["tags"] == ["test", "ddp"]
    system = wb.config["system"]
    assert system["world_size"] == 2 and system["distributed_type"] == "MULTI_CPU"
    assert system["global_batch"] == 128 and system["grad_accum_steps"] == 1 and system["device"].startswith("cpu")
    assert tracking["system"] == system

    # per-step history: loss, lr, images/s, grad norm at every log point, explicit steps
    local = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in local if "loss" in r]
    assert train_steps == [s for s, _ in wb.metric("loss")] and len(train_steps) >= 5
    assert [v for _, v in wb.metric("loss")] == pytest.approx([r["loss"] for r in local if "loss" in r])
    assert all(s % 10 == 0 for s in train_steps[:-1])  # train.log_every=10
    for key in ("lr", "images_per_s", "grad_norm"):
        assert len(wb.metric(key)) >= 5, key
    assert wb.steps == sorted(wb.steps)
    # per-epoch validation, then the final test metrics and the plots as images
    assert len(wb.metric("val_accuracy")) == 2  # train.epochs=2
    test = json.loads((run_dir / "eval_test" / "metrics.json").read_text())
    assert wb.summary["test_accuracy"] == pytest.approx(test["accuracy"])
    assert wb.summary["outcome"] == "completed" and wb.summary["steps"] == ckpt["state"]["step"]
    assert wb.summary["test/confusion_matrix"]["_type"] == "image-file"
    assert any(f.endswith(".png") and "confusion_matrix" in f for f in wb.files)
    assert any(f.endswith(".png") and "misclassified" in f for f in wb.files)
    # the best checkpoint as a model artifact
    assert [(a["name"], a["type"]) for a in wb.artifacts] == [(f"model-{wb.run_id}", "model")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run_id"] == wb.run_id and summary["test_accuracy"] == pytest.approx(test["accuracy"])
    assert f"upload it later with: wandb sync {dirs[0]}" in proc.stderr


@pytest.mark.slow
def test_tensorboard_gets_the_same_scalars(dist_run):
    run_dir = dist_run[0]
    local = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in tb_scalars(run_dir / "tensorboard", "loss")] == [r["step"] for r in local if "loss" in r]
    assert len(tb_scalars(run_dir / "tensorboard", "val_accuracy")) == 2
    assert len(tb_scalars(run_dir / "tensorboard", "test_accuracy")) == 1


# --- kill -9 and resume: the same run id, steps go on from the checkpoint's ---------------------


@pytest.mark.slow
def test_killed_job_resumes_into_the_same_run(tmp_path):
    run_dir = tmp_path / "runs" / "killed"
    total = 4 * 57  # 4 epochs of 3600 images in batches of 64: long enough to be killed mid-run
    args = [*TINY, "train.epochs=4", "data.batch_size=64", "train.log_every=5", "checkpoint.every_steps=10", "train.resume=auto",
            f"train.out_dir={tmp_path / 'runs'}", "train.name=killed", "tracking.wandb.enabled=true",
            "tracking.tensorboard=true"]
    wenv = wandb_env(tmp_path)  # no WANDB_DIR: W&B writes into the run directory
    cmd = [sys.executable, "-m", "hwr_dist.train", "configs/default.yaml", *args]
    log = tmp_path / "killed.log"
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(**wenv), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)  # its own process group: wandb-core dies with it
    wait_for(lambda: (run_dir / "checkpoints" / "step-00000020.pt").exists() or proc.poll() is not None, 300)
    # Freeze the trainer mid-run so a fast machine cannot finish first; wandb-core, a separate process,
    # keeps flushing what it was sent to its file every second.
    os.kill(proc.pid, signal.SIGSTOP)
    assert proc.poll() is None, log.read_text()[-3000:]

    def wandb_file_written() -> bool:
        files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        return bool(files) and bool(read_run(files[0], strict=False).steps)

    wait_for(wandb_file_written, 30)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = read_torch(run_dir / "checkpoints" / "last.pt")["state"]
    killed_at, run_id = state["step"], state["tracker_run_id"]
    assert 20 <= killed_at < total and run_id, state  # killed mid-run, the id is in the checkpoint
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == run_id

    resumed = run(cmd, **wenv)  # not --quiet: the resume line is read
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {killed_at}" in resumed.stderr

    dirs = find_offline_runs(run_dir)
    assert len(dirs) == 2 and all(d.name.endswith("-" + run_id) for d in dirs), dirs
    first = read_run(dirs[0], strict=False)  # torn by the kill: read what is there
    second = read_run(dirs[1])
    assert first.run_id == second.run_id == run_id
    assert first.resume is False and second.resume is True and second.exit_code == 0
    assert first.steps == list(range(5, 5 * len(first.steps) + 1, 5))  # what was flushed before the kill
    # the resumed job starts after the checkpoint's step: no restart at step 0
    assert min(second.steps) == killed_at + 5 and second.steps == sorted(second.steps)
    assert [s for s, _ in second.metric("loss")] == list(range(killed_at + 5, total, 5)) + [total]
    assert second.summary["steps"] == total and "test_accuracy" in second.summary
    assert second.config["system"]["world_size"] == 1
    assert read_torch(run_dir / "checkpoints" / "last.pt")["state"]["tracker_run_id"] == run_id
    # TensorBoard: events after the checkpoint written by the killed job are purged
    steps = [s for s, _ in tb_scalars(run_dir / "tensorboard", "loss")]
    assert steps == list(range(5, total, 5)) + [total]


# --- missing packages ------------------------------------------------------------------------


NO_WANDB = """
import sys
import hwr_dist.cli, hwr_dist.train.run, hwr_dist.tracking, hwr_dist.commands.report
assert "wandb" not in sys.modules and "tensorboard" not in sys.modules, "imported without being asked for"
sys.modules["wandb"] = None  # as if not installed
sys.argv = ["hwr", *sys.argv[1:]]
hwr_dist.cli.main()
"""


def test_wandb_not_installed_is_one_clear_line(tmp_path):
    proc = run([sys.executable, "-c", NO_WANDB, "train", "configs/default.yaml", *TINY,
                f"train.out_dir={tmp_path}", "tracking.wandb.enabled=true"], **wandb_env(tmp_path))
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert "wandb" in line and "pip install 'hwr-dist[wandb]'" in line
    assert not any(tmp_path.iterdir())  # failed before any work


def test_tensorboard_not_installed(monkeypatch, tmp_path):
    from hwr_dist import tracking

    cfg = load_config(ROOT / "configs" / "default.yaml", ["tracking.tensorboard=true"])
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(HwrError, match=r"pip install 'hwr-dist\[tensorboard\]'"):
        tracking.check_available(cfg)
    with pytest.raises(HwrError, match=r"pip install 'hwr-dist\[tensorboard\]'"):
        tracking.Tracker(tmp_path, True, cfg).start("", None, {})
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = load_config(ROOT / "configs" / "default.yaml", ["tracking.wandb.enabled=true"])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracking.check_available(cfg)  # W&B disabled by the environment: not needed
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(HwrError, match=r"pip install 'hwr-dist\[wandb\]'"):
        tracking.Tracker(tmp_path, True, cfg).start("", None, {})


def test_mode_precedence_and_log_interval(monkeypatch):
    from hwr_dist import tracking

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    assert not tracking.wandb_enabled(load_config(None, []).tracking.wandb)  # nothing asked: off
    for given in ("tracking.wandb.mode=offline", "tracking.wandb.project=p", "tracking.wandb.tags=[a]"):
        assert tracking.wandb_enabled(load_config(None, [given]).tracking.wandb), given  # any setting: on
    w = load_config(None, ["tracking.wandb.mode=offline"]).tracking.wandb
    assert tracking.wandb_mode(w) == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.wandb_mode(w) == "offline"  # what the user wrote wins over W&B's environment
    w.mode = None
    assert tracking.wandb_mode(w) == "online"  # unset: W&B's own setting
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.wandb_mode(load_config(None, []).tracking.wandb) == "offline"  # WANDB_MODE alone: on
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(HwrError, match="WANDB_MODE=bogus"):
        tracking.wandb_mode(w)
    w.enabled = False
    assert tracking.wandb_mode(w) == "disabled"  # an explicit false wins over everything

    class FakeRun:
        def __init__(self):
            self.logged = []

        def log(self, data, step):
            self.logged.append(step)

    wb = object.__new__(tracking._Wandb)
    wb.run, wb.log_every, wb.last_train_step = FakeRun(), 50, None
    for step in range(20, 201, 20):
        wb.log({"loss": 1.0}, step)
    wb.log({"val_accuracy": 0.5}, 210)  # validation and final rows always go
    assert wb.run.logged == [20, 80, 140, 200, 210]
    with pytest.raises(HwrError, match="tracking.wandb.log_every"):
        load_config(None, ["tracking.wandb.log_every=-1"])


# --- hwr report ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_prints_table_and_writes_plots(dist_run):
    run_dir = dist_run[0]
    proc = hwr("report", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    png = run_dir / "report_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    test = json.loads((run_dir / "eval_test" / "metrics.json").read_text())
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    for text in ("test accuracy", f"{test['accuracy']:.2%}", "best val accuracy", "completed",
                 run_id, "2 on 1 node(s)", "128 = 64 x 2 x 1", str(png)):
        assert text in proc.stdout, text


def test_report_on_a_bad_directory(tmp_path):
    proc = hwr("report", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "not found" in one_error_line(proc)
    (tmp_path / "metrics.jsonl").write_text("")
    proc = hwr("report", str(tmp_path))
    assert proc.returncode == 2 and "no metrics" in one_error_line(proc)
    assert not (tmp_path / "report_curves.png").exists()


def test_report_on_an_unfinished_run(tmp_path):
    """A preempted run (no summary yet), with a line torn by a kill: still a report."""
    rows = [{"step": s, "epoch": 1, "loss": 2.0 / s, "lr": 0.001, "images_per_s": 1000.0} for s in (10, 20, 30)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 40, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    (tmp_path / "preempted.json").write_text('{"step": 30, "reason": "SIGTERM"}\n')
    proc = hwr("report", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "preempted at step 30" in proc.stdout and "30" in proc.stdout
    assert (tmp_path / "report_curves.png").stat().st_size > 10_000


# --- the sweep file -----------------------------------------------------------------------------


def test_sweep_command_gives_valid_overrides(monkeypatch, tmp_path):
    """Expand the sweep's command the way `wandb agent` does; the words must load as overrides."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    from hwr_dist import tracking

    sweep = yaml.safe_load((ROOT / "configs" / "sweeps" / "lr_sweep.yaml").read_text())
    assert sweep["metric"] == {"name": "best_val_accuracy", "goal": "maximize"}
    trial = {"args": {"optim.lr": {"value": 0.00314}, "optim.weight_decay": {"value": 0.001}}}
    values = {**create_sweep_command_args(trial), "env": ["/usr/bin/env"]}  # as wandb_agent.py fills them
    words = []
    for c in create_sweep_command(list(sweep["command"])):
        words += values[c[2:-1]] if c.startswith("${") and c.endswith("}") else [c]
    assert words[:4] == ["/usr/bin/env", "hwr", "train", "configs/default.yaml"] and "optim.lr=0.00314" in words
    overrides = [w for w in words[4:] if not w.startswith("-")]
    cfg = load_config(ROOT / words[3], overrides)
    assert cfg.optim.lr == 0.00314 and cfg.optim.weight_decay == 0.001 and cfg.tracking.wandb.enabled
    for name in sweep["parameters"]:  # every swept key is a real config key
        load_config(None, [f"{name}={sweep['parameters'][name].get('min', 0.001)}"])

    # under the agent, each trial gets its own run directory
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    tracking.apply_sweep_name(cfg)
    tracking.apply_sweep_name(cfg)
    assert cfg.train.name == "lr_sweep-abc123"
