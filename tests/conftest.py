"""Shared test helpers: run the real CLI and launchers in subprocesses, small configs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
BIN = Path(sys.executable).parent


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_", "ACCELERATE_"))}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    e.update(extra)  # may override the defaults above (e.g. WANDB_MODE=offline)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wandb_env(root: Path, **extra: str) -> dict[str, str]:
    """W&B offline, silent, nothing outside `root`; WANDB_DIR only when asked (default: the run dir)."""
    e = dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CACHE_DIR=str(root / "wb_cache"),
             WANDB_CONFIG_DIR=str(root / "wb_config"), WANDB_DATA_DIR=str(root / "wb_data"),
             WANDB__SERVICE_WAIT="60")
    e.update(extra)
    return e


def run(args: list[str], cwd: Path | None = None, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd or ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def hwr(*args: str, **kw) -> subprocess.CompletedProcess:
    return run([str(BIN / "hwr"), *args], **kw)


def train_module(*args: str, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "hwr_dist.train", *args, "--quiet"], **kw)


def wait_for(condition, timeout: float, poll: float = 0.05) -> None:
    """Poll `condition` until it holds or `timeout` seconds pass; the caller's asserts say which."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(poll)


# A quick recipe: small CNN, a few hundred steps, dropout and augmentation on so that
# resuming must restore every random stream to match.
TINY = [
    "model.name=small_cnn", "model.width=8", "model.dropout=0.3", "data.batch_size=32", "train.epochs=2", "train.log_every=10",
    "schedule.name=cosine", "optim.lr=0.003",
]


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The README's main job, trained once per session: the default config on the built-in sample.

    Returns (run directory, the finished `hwr train` process)."""
    out = tmp_path_factory.mktemp("default")
    proc = hwr("train", "configs/default.yaml", f"train.out_dir={out}", "--quiet", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "default", proc


@pytest.fixture
def tiny(tmp_path):
    """Overrides for a tiny run writing under tmp_path."""
    return [*TINY, f"train.out_dir={tmp_path / 'runs'}"]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """A failed command ends with exactly one `error: ...` line on stderr, and no traceback."""
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    return errors[0]
