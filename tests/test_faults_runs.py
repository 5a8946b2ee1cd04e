"""Fault suite, in this process, around a trained run: broken checkpoints, resumes with other
settings, leftovers of a killed run, a full disk, read-only folders, bad images and export targets.

The contract is the one of tests/test_faults.py (`faults.check`). The cases work on copies of one
tiny run trained once for the module.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from faults import (BROKEN_CHECKPOINTS, BROKEN_FOR_LOADING, BROKEN_FOR_RESUME, CONFIG, TINY, can_mount, check,
                    digit_png, hwr_here, mounted, own_signals, snapshot, write_broken)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny finished run (two steps); cases work on copies of it."""
    from hwr_dist.recipes import load
    from hwr_dist.train.run import run_training

    out = tmp_path_factory.mktemp("trained")
    with own_signals():
        run_training(load(CONFIG, [*TINY, f"train.out_dir={out}", "train.name=run"]), quiet=True)
    return out / "run"


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "runs" / "run"))


@pytest.fixture(scope="module")
def mounts_allowed(tmp_path_factory) -> None:
    why = can_mount(tmp_path_factory.mktemp("probe"))
    if why:
        pytest.skip(why)


def train(capsys, *overrides: str):
    return hwr_here(capsys, "train", CONFIG, *TINY, *overrides)


def resume(capsys, run_dir: Path, *overrides: str):
    return train(capsys, "train.resume=auto", f"train.out_dir={run_dir.parent}", f"train.name={run_dir.name}",
                 *overrides)


def last_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]["step"]


# --- checkpoints that cannot be used ---------------------------------------------------------------


@pytest.mark.parametrize("name", [*BROKEN_CHECKPOINTS, *BROKEN_FOR_RESUME])
def test_resume_from_broken_checkpoint(capsys, tmp_path, trained, name):
    make = {**BROKEN_CHECKPOINTS, **BROKEN_FOR_RESUME}[name]
    bad = write_broken(tmp_path / "in" / f"{name}.pt", trained / "checkpoints" / "last.pt", make)
    before = snapshot(tmp_path / "in")
    r = train(capsys, f"train.resume={bad}", f"train.out_dir={tmp_path / 'runs'}", "train.name=new")
    check(r, 2, before, re.escape(bad.name))
    assert not (tmp_path / "runs" / "new" / "config.yaml").exists()


# evaluate meets every fault; predict and export read checkpoints the same way, so a sample suffices
USES = [(name, "evaluate") for name in [*BROKEN_CHECKPOINTS, *BROKEN_FOR_LOADING]] + [
    (name, command) for name in ("truncated", "no-classes", "config-not-mapping", "model-not-state-dict",
                                 "nan-weights", "std-zero") for command in ("predict", "export")]


@pytest.mark.parametrize("name,command", USES, ids=[f"{c}-{n}" for n, c in USES])
def test_use_broken_checkpoint(capsys, tmp_path, trained, name, command):
    make = {**BROKEN_CHECKPOINTS, **BROKEN_FOR_LOADING}[name]
    bad = write_broken(tmp_path / "in" / f"{name}.pt", trained / "checkpoints" / "last.pt", make)
    digit_png(tmp_path / "in" / "digit.png", seed=2)
    argv = {"evaluate": [bad], "predict": [bad, tmp_path / "in" / "digit.png"], "export": [bad]}[command]
    before = snapshot(tmp_path / "in")
    check(hwr_here(capsys, command, *argv), 2, before, re.escape(bad.name))
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == sorted(["digit.png", bad.name])  # nothing written


# --- resuming with other settings -------------------------------------------------------------------

CHANGES = [("model.width=8", "does not fit this model"), ("optim.name=sgd", "optim.name=adamw"),
           ("data.batch_size=32", "data.batch_size 64 -> 32"), ("train.epochs=3", "train.epochs 1 -> 3"),
           ("train.seed=1", "train.seed"), ("optim.lr=0.02", "optim.lr"), ("schedule.name=cosine", "schedule.name"),
           ("train.max_steps=4", "train.max_steps"), ("train.grad_accum_steps=2", "grad_accum_steps"),
           ("data.val_fraction=0.2", "data.val_fraction"), ("data.name=imagefolder", "data.name")]


@pytest.mark.parametrize("override,match", CHANGES, ids=[c[0] for c in CHANGES])
def test_resume_with_other_settings_is_refused(capsys, run_copy, override, match):
    before = snapshot(run_copy)
    check(resume(capsys, run_copy, override), 2, before, match)


def test_resume_with_accepted_changes_trains_on(capsys, run_copy):
    before = snapshot(run_copy / "checkpoints")
    r = resume(capsys, run_copy, "train.resume_changes=accept", "data.batch_size=32", "train.max_steps=4")
    check(r, 0, {})
    assert "data.batch_size 64 -> 32" in r.err and last_step(run_copy) == 4
    assert snapshot(run_copy / "checkpoints") != before


@pytest.mark.parametrize("case", ["fresh-start-over-a-run", "missing-checkpoint"])
def test_resume_source_refused(capsys, run_copy, case):
    before = snapshot(run_copy)
    source = "" if case == "fresh-start-over-a-run" else str(run_copy / "nope.pt")
    r = train(capsys, f"train.resume={source}", f"train.out_dir={run_copy.parent}", "train.name=run")
    check(r, 2, before, "already holds a run" if source == "" else "not found")


# --- what a killed run leaves behind ---------------------------------------------------------------


def test_stale_temporaries_are_removed(capsys, run_copy):
    junk = [run_copy / "checkpoints" / ".last.pt.tmp123", run_copy / "checkpoints" / ".best.pt.link",
            run_copy / ".config.yaml.tmp99"]
    for p in junk:
        p.write_bytes(bytes(4 << 20))
    before = snapshot(run_copy / "checkpoints")
    for p in junk:
        before.pop(p, None)
    check(resume(capsys, run_copy), 0, before)  # a finished run: evaluated again, checkpoints untouched
    assert not [p for p in junk if p.exists()]


def test_torn_metrics_line_resumes(capsys, run_copy):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')
    check(resume(capsys, run_copy, "train.resume_changes=accept", "train.max_steps=4"), 0, {})
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4] and last_step(run_copy) == 4


# --- files and folders in the way ---------------------------------------------------------------


@pytest.mark.parametrize("case", ["out-dir-is-a-file", "out-dir-below-a-file", "checkpoints-is-a-file"])
def test_file_in_the_way_of_a_run(capsys, tmp_path, case):
    blocker = tmp_path / "runs" if case != "checkpoints-is-a-file" else tmp_path / "runs" / "new" / "checkpoints"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder\n")
    out = {"out-dir-below-a-file": blocker / "sub"}.get(case, tmp_path / "runs")
    before = snapshot(tmp_path)
    check(train(capsys, f"train.out_dir={out}", "train.name=new"), 2, before)


@pytest.mark.parametrize("case", ["a-file", "below-a-file"])
def test_evaluate_out_is_a_file(capsys, tmp_path, run_copy, case):
    (tmp_path / "report").write_text("not a folder\n")
    out = tmp_path / "report" if case == "a-file" else tmp_path / "report" / "sub"
    before = snapshot(tmp_path)
    check(hwr_here(capsys, "evaluate", run_copy, "--out", out), 2, before)


# --- a full disk and read-only folders (root: tmpfs and bind mounts) ----------------------------


@pytest.mark.usefixtures("mounts_allowed")
def test_disk_full_during_a_save(capsys, tmp_path):
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=2m", "tmpfs") as disk:
        (disk / "earlier").mkdir()
        free = shutil.disk_usage(disk).free  # leave less than a checkpoint's size, whatever the model
        (disk / "earlier" / "keep.bin").write_bytes(bytes(max(0, free - (64 << 10))))
        before = snapshot(disk)
        check(train(capsys, f"train.out_dir={disk}", "train.name=new"), 2, before, "cannot write a checkpoint")
        assert not list(disk.rglob("*.tmp*")), "no temporary is left behind"


@pytest.mark.usefixtures("mounts_allowed")
def test_disk_full_during_a_resumed_save_keeps_the_checkpoints(capsys, tmp_path, trained):
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=2m", "tmpfs") as disk:
        subprocess.run(["cp", "-a", str(trained), str(disk / "run")], check=True)  # -a: best.pt stays a hard link
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(bytes(max(0, free - (400 << 10))))
        before = snapshot(disk / "run" / "checkpoints", disk / "filler")
        r = resume(capsys, disk / "run", "train.resume_changes=accept", "train.max_steps=4")
        check(r, 2, before, "cannot write|No space")
        assert last_step(disk / "run") == 2 and not list(disk.rglob("*.tmp*"))


@pytest.mark.usefixtures("mounts_allowed")
@pytest.mark.parametrize("case", ["new-run", "resume", "evaluate-out"])
def test_read_only_folder(capsys, tmp_path, trained, case):
    (tmp_path / "rw").mkdir()
    shutil.copytree(trained, tmp_path / "rw" / "run")
    with mounted(tmp_path / "ro", "--bind", str(tmp_path / "rw")) as ro:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        before = snapshot(ro)
        if case == "new-run":
            r = train(capsys, f"train.out_dir={ro}", "train.name=new")
        elif case == "resume":
            r = resume(capsys, ro / "run")
        else:
            r = hwr_here(capsys, "evaluate", tmp_path / "rw" / "run", "--out", ro / "report")
        check(r, 2, before, "Read-only|read-only|writable")


# --- images for predict, targets for export ------------------------------------------------------


def _huge(path: Path) -> None:
    from PIL import Image

    Image.new("L", (8000, 8000), 255).save(path)


IMAGES = {
    "not-an-image": (lambda p: p.with_suffix(".bin").write_bytes(bytes(range(256)) * 4), "not-an-image.bin"),
    "text-named-png": (lambda p: p.write_text("hello, not a picture\n"), "text-named-png.png"),
    "missing": (lambda p: None, "missing.png"),
    "zero-bytes": (lambda p: p.write_bytes(b""), "zero-bytes.png"),
    "truncated-png": (lambda p: [digit_png(p, seed=3), p.write_bytes(p.read_bytes()[:60])], "truncated-png.png"),
    "8000x8000": (_huge, "8000x8000.png"),
    "folder-without-images": (lambda p: [p.mkdir(), (p / "notes.txt").write_text("x")], "no image files"),
}


@pytest.mark.parametrize("name", IMAGES)
def test_predict_bad_image(capsys, tmp_path, trained, name):
    make, match = IMAGES[name]
    path = tmp_path / "in" / f"{name}.png"
    path.parent.mkdir()
    make(path)
    target = path.with_suffix(".bin") if name == "not-an-image" else path
    before = snapshot(tmp_path / "in", trained)
    check(hwr_here(capsys, "predict", trained, target), 2, before, match)


EXPORT_TARGETS = {"its-own-input": "checkpoints/best.pt", "last-checkpoint": "checkpoints/last.pt",
                  "another-file": "notes.txt", "below-a-file": "notes.txt/model.ts"}


@pytest.mark.parametrize("name", EXPORT_TARGETS)
def test_export_never_overwrites(capsys, run_copy, name):
    (run_copy / "notes.txt").write_text("the user's own notes\n")
    before = snapshot(run_copy)
    check(hwr_here(capsys, "export", run_copy, "--out", run_copy / EXPORT_TARGETS[name]), 2, before)
