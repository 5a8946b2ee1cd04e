"""Helpers for the fault suite (tests/test_faults*.py): the CLI run in this process, directory
hashes, the one check every case makes, and broken inputs (IDX files, image folders, checkpoints).

A case costs milliseconds when the CLI runs in the test's own process: torch and the data are
imported once. Subprocesses are kept for what needs a process of its own (signals, locks, users).
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "default.yaml")
# Two optimizer steps of a 4-channel CNN: a whole run in a few seconds.
TINY = ["train.max_steps=2", "train.epochs=1", "data.eval_batch_size=500", "model.width=4", "train.log_every=1"]


@dataclass
class Result:
    code: int
    out: str
    err: str


@contextmanager
def own_signals():
    """Put back the handlers a run installs (StopFlag), so that Ctrl-C still reaches pytest."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def hwr_here(capsys, *argv) -> Result:
    """`hwr ARGV...` through `hwr_dist.cli.main` in this process: exit code, stdout, stderr."""
    from hwr_dist.cli import main

    capsys.readouterr()  # only this command's output
    saved_argv, sys.argv = sys.argv, ["hwr", *map(str, argv)]
    try:
        with own_signals():
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = saved_argv
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def snapshot(*dirs: Path) -> dict[Path, str]:
    """sha256 of every file under `dirs` (a file given itself counts too). A run directory's `.lock`
    is left out: it names whoever last held the lock, and every trainer rewrites it."""
    files = []
    for d in map(Path, dirs):
        files += [d] if d.is_file() else sorted(p for p in d.rglob("*") if p.is_file()) if d.is_dir() else []
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.name != ".lock"}


def check(r: Result | subprocess.CompletedProcess, code: int, before: dict[Path, str], match: str = "") -> str:
    """The contract of every case: the exit code; exactly one `error:` line, the last one, when the
    command failed (none on success or after a Ctrl-C stop); no traceback; every file that existed
    before is byte-identical. Returns the error line ('' when there is none)."""
    out, err, got = (r.out, r.err, r.code) if isinstance(r, Result) else (r.stdout, r.stderr, r.returncode)
    assert "Traceback" not in out + err, err[-3000:]
    assert got == code, f"exit {got}, expected {code}\n{err[-3000:]}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    failed = code not in (0, 130)
    assert len(errors) == int(failed), err[-3000:]
    if failed:
        assert lines[-1] == errors[0], err[-3000:]
        assert re.search(match, errors[0]), errors[0]
    changed = [str(p) for p, digest in before.items()
               if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != digest]
    assert not changed, f"changed or removed: {changed}"
    return errors[0] if failed else ""


@contextmanager
def mounted(target: Path, *mount_args: str):
    """`mount MOUNT_ARGS TARGET` for the block (root only), always unmounted afterwards."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *mount_args, str(target)], check=True, capture_output=True)
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(target)], check=True)


def can_mount(tmp: Path) -> str:
    """'' when this process may mount a tmpfs, else why not (the reason a case is skipped for)."""
    probe = tmp / "mount-probe"
    try:
        with mounted(probe, "-t", "tmpfs", "-o", "size=64k", "tmpfs"):
            return ""
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        return f"mount is not allowed here ({e})"


# --- data ------------------------------------------------------------------------------------------


def mnist_folder(root: Path, n_train: int = 60, n_test: int = 20) -> Path:
    """A valid MNIST layout under root (random pixels, labels 0..9): torchvision's MNIST/raw."""
    from hwr_dist.data.idx import write_idx

    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=g))
        write_idx(folder / f"{split}-labels-idx1-ubyte", torch.arange(n) % 10)
    return folder


def digit_png(path: Path, seed: int, size: int = 28) -> None:
    """A dark stroke on white paper: what `open_image` and `mnist_style` accept."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("L", (size, size), 255)
    k = size / 28
    ImageDraw.Draw(img).line([(8 * k, (6 + seed % 5) * k), (20 * k, 22 * k), (9 * k, 21 * k)], fill=0, width=int(3 * k))
    img.save(path)


def image_folder(root: Path, per_class: dict[str, int]) -> Path:
    """root/<class>/<i>.png with the given number of images per class."""
    root.mkdir(parents=True, exist_ok=True)
    for c, n in per_class.items():
        (root / c).mkdir(exist_ok=True)
        for i in range(n):
            digit_png(root / c / f"{i}.png", seed=i)
    return root


# --- checkpoints -----------------------------------------------------------------------------------


def _first_float(state: dict) -> str:
    return next(k for k, t in state.items() if t.is_floating_point())


def _with(ck: dict, **changes) -> dict:
    out = {k: v for k, v in ck.items() if k not in changes or changes[k] is not _DROP}
    out.update({k: v for k, v in changes.items() if v is not _DROP})
    return out


def _nan_weights(ck: dict) -> dict:
    model = dict(ck["model"])
    k = _first_float(model)
    model[k] = model[k].clone().fill_(float("nan"))
    return _with(ck, model=model)


def _weights_of_width(ck: dict, width: int) -> dict:
    from hwr_dist.config import config_from_dict
    from hwr_dist.models import build_model

    cfg = config_from_dict(ck["config"])
    cfg.model.width = width
    return build_model(cfg.model, len(ck["classes"]), pretrained=False).state_dict()


def _config(ck: dict, section: str, key: str, value) -> dict:
    return _with(ck, config={**ck["config"], section: {**ck["config"][section], key: value}})


_DROP = object()
# name -> what the broken file holds, made from a good checkpoint dict; bytes are written as they are.
BROKEN_CHECKPOINTS = {
    "empty-file": lambda ck, raw: b"",
    "truncated": lambda ck, raw: raw[: len(raw) // 2],
    "text-file": lambda ck, raw: b"not a checkpoint\n",
    "zip-of-garbage": lambda ck, raw: raw[:4] + bytes(200),
    "a-list": lambda ck, raw: [1, 2, 3],
    "bare-state-dict": lambda ck, raw: ck["model"],
    "pickled-object": lambda ck, raw: {"model": ck["model"], "config": Path("x")},  # needs weights_only=False
    "no-classes": lambda ck, raw: _with(ck, classes=_DROP),
    "no-config": lambda ck, raw: _with(ck, config=_DROP),
    "no-model": lambda ck, raw: _with(ck, model=_DROP),
    "no-format": lambda ck, raw: _with(ck, format=_DROP),
    "no-norm": lambda ck, raw: _with(ck, norm=_DROP),
    "config-not-mapping": lambda ck, raw: _with(ck, config="model: small_cnn"),
    "model-not-state-dict": lambda ck, raw: _with(ck, model=[1, 2]),
    "model-empty": lambda ck, raw: _with(ck, model={}),
    "model-not-tensors": lambda ck, raw: _with(ck, model={k: 1.0 for k in ck["model"]}),
    "nan-weights": lambda ck, raw: _nan_weights(ck),
    "inf-ema": lambda ck, raw: _with(ck, ema={k: t.clone().fill_(float("inf")) if t.is_floating_point() else t
                                              for k, t in ck["model"].items()}),
    "std-zero": lambda ck, raw: _with(ck, norm=[0.13, 0.0]),
    "std-negative": lambda ck, raw: _with(ck, norm=[0.13, -0.3]),
    "std-nan": lambda ck, raw: _with(ck, norm=[0.13, float("nan")]),
    "newer-format": lambda ck, raw: _with(ck, format=ck["format"] + 1),
    "older-format": lambda ck, raw: _with(ck, format=0),
    "one-class": lambda ck, raw: _with(ck, classes=["0"]),
    "classes-not-names": lambda ck, raw: _with(ck, classes=list(range(10))),
    "weights-of-another-width": lambda ck, raw: _with(ck, model=_weights_of_width(ck, 8)),
}
# Broken only for loading a model from the checkpoint's own config (a resume uses the run's).
BROKEN_FOR_LOADING = {
    "unknown-model": lambda ck, raw: _config(ck, "model", "name", "resnet9000"),
    "unknown-config-key": lambda ck, raw: _config(ck, "model", "colour", "blue"),
    "config-of-another-width": lambda ck, raw: _config(ck, "model", "width", 8),
}
# Broken only for a resume: they still evaluate.
BROKEN_FOR_RESUME = {
    "no-training-state": lambda ck, raw: _with(ck, state=_DROP),
    "optimizer-of-another-model": lambda ck, raw: _with(ck, optimizer={"state": {}, "param_groups": []}),
    "rng-not-a-list": lambda ck, raw: _with(ck, rng="none"),
}


def write_broken(path: Path, good: Path, make) -> Path:
    raw = good.read_bytes()
    ck = torch.load(good, map_location="cpu", weights_only=True)
    content = make(ck, raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path
