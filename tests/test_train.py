"""Training end to end on the built-in sample: accuracy, exact resume, failures handled."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, env, hwr, one_error_line, run, train_module, wait_for


def read_params(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_default_config_reaches_97_percent(default_run):
    run_dir, proc = default_run
    metrics = json.loads((run_dir / "eval_test" / "metrics.json").read_text())
    assert metrics["count"] == 1000
    assert metrics["accuracy"] >= 0.97, metrics["accuracy"]
    for f in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt",
              "eval_test/confusion.png", "eval_test/worst.png"):
        assert (run_dir / f).is_file(), f
    ckpt = read_params(run_dir / "checkpoints" / "last.pt")
    assert ckpt["config"]["model"]["name"] == "fast_cnn" and ckpt["classes"] == [str(d) for d in range(10)]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in x for x in lines) and any("test_accuracy" in x for x in lines)
    assert "test accuracy" in proc.stdout


def test_evaluate_checkpoint_matches_training(default_run, tmp_path):
    run_dir, _ = default_run
    proc = hwr("evaluate", str(run_dir), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "eval_test" / "metrics.json").read_text())
    trained = json.loads((run_dir / "eval_test" / "metrics.json").read_text())
    assert again["confusion"] == trained["confusion"]
    assert (tmp_path / "eval_test" / "confusion.png").stat().st_size > 1000
    proc = hwr("evaluate", str(run_dir), "--split", "val", "--out", str(tmp_path))
    assert proc.returncode == 0 and json.loads((tmp_path / "eval_val" / "metrics.json").read_text())["count"] == 400


def test_resume_after_sigkill_is_bit_identical(tiny, tmp_path):
    args = [*tiny, "checkpoint.every_steps=15", "train.resume=auto"]
    ref = train_module("configs/default.yaml", *args, "train.name=reference")
    assert ref.returncode == 0, ref.stderr[-2000:]

    cmd = [sys.executable, "-m", "hwr_dist.train", "configs/default.yaml", *args, "train.name=killed", "--quiet"]
    ckpts = tmp_path / "runs" / "killed" / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: (ckpts / "step-00000045.pt").exists(), 300)  # mid first epoch (113 batches)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = read_params(ckpts / "last.pt")["state"]
    assert 0 < killed_at["step"] < 226 and killed_at["batch"] > 0, killed_at  # really mid-epoch

    resumed = run([sys.executable, "-m", "hwr_dist.train", "configs/default.yaml", *args, "train.name=killed"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {ckpts / 'last.pt'} at step {killed_at['step']}" in resumed.stderr
    a = read_params(tmp_path / "runs" / "reference" / "checkpoints" / "last.pt")
    b = read_params(ckpts / "last.pt")
    assert b["state"]["tracker_run_id"] == killed_at["tracker_run_id"] != a["state"]["tracker_run_id"]  # per run
    assert {**a["state"], "tracker_run_id": ""} == {**b["state"], "tracker_run_id": ""}
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = [json.loads(x)["step"] for x in (ckpts.parent / "metrics.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(x)["step"] for x in (ckpts.parent.parent / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert steps == ref_steps  # no duplicated or missing log lines after the resume


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    args = [*tiny, "train.epochs=1", "train.name=nan"]
    assert train_module("configs/default.yaml", *args).returncode == 0
    last = tmp_path / "runs" / "nan" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    proc = train_module("configs/default.yaml", *args, "train.epochs=2", "train.resume=auto",
                        "optim.lr=1e12", "schedule.name=constant", "train.resume_changes=accept")
    assert proc.returncode == 3
    line = one_error_line(proc)
    assert "loss became nan" in line and "last good checkpoint" in line and "optim.lr" in line
    assert last.read_bytes() == before


def test_bad_checkpoints(tiny, tmp_path):
    args = [*tiny, "train.max_steps=5", "train.epochs=1", "train.name=small"]
    assert train_module("configs/default.yaml", *args).returncode == 0
    last = tmp_path / "runs" / "small" / "checkpoints" / "last.pt"

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(last.read_bytes()[:1000])
    proc = hwr("evaluate", str(corrupt))
    assert proc.returncode == 2 and "corrupt or not a checkpoint" in one_error_line(proc)

    proc = hwr("evaluate", str(tmp_path / "nope.pt"))
    assert proc.returncode == 2 and "not found" in one_error_line(proc)

    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    proc = hwr("evaluate", str(plain))
    assert proc.returncode == 2 and "not an hwr-dist checkpoint" in one_error_line(proc)

    # Another model shape (or class count) than the checkpoint's.
    proc = train_module("configs/default.yaml", *args, "train.name=other", "model.width=16", f"train.resume={last}")
    assert proc.returncode == 2 and "does not fit this model" in one_error_line(proc)

    proc = train_module("configs/default.yaml", *args, "train.name=other", "optim.name=sgd", f"train.resume={last}")
    assert proc.returncode == 2 and "trained with optim.name=adamw" in one_error_line(proc)

    # A fresh start must not overwrite an existing run.
    proc = train_module("configs/default.yaml", *args)
    assert proc.returncode == 2 and "already holds a run" in one_error_line(proc)
    assert last.exists()


def test_atomic_save_survives_a_crash_midway(tmp_path, monkeypatch):
    from hwr_dist.files import atomic_write

    path = tmp_path / "last.pt"
    atomic_write(path, {"w": torch.ones(3)})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_write(path, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
