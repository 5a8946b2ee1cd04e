"""`hwr doctor`: what this machine offers and what a run would use, in one table.

Exit 0 when a run can start; 2 with the first problem (which is also the last line).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hwr_dist.errors import HwrError

MIN_FREE_GB = 1.0  # a few checkpoints of the small models, with room to spare


def accelerate_defaults() -> tuple[str, dict]:
    """(path, values) of the user's `accelerate config` file; values empty when there is none."""
    import yaml
    from accelerate.commands.config import default_config_file

    path = Path(os.environ.get("ACCELERATE_CONFIG_FILE", default_config_file))
    if not path.is_file():
        return str(path), {}
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise HwrError(f"the accelerate config {path} cannot be read ({e}); fix it or run `accelerate config`") from None
    return str(path), values if isinstance(values, dict) else {}


def in_effect(cfg) -> tuple[str, str]:
    """The precision and accumulation a launch from here would use, by the README's rule."""
    from hwr_dist.train.distributed import from_launcher

    path, defaults = accelerate_defaults()
    env = dict(os.environ)
    if "ACCELERATE_MIXED_PRECISION" not in env and defaults.get("mixed_precision"):
        env["ACCELERATE_MIXED_PRECISION"] = str(defaults["mixed_precision"])  # what accelerate launch would set
    precision = from_launcher("train.mixed_precision", cfg.train.mixed_precision, "ACCELERATE_MIXED_PRECISION", "no",
                              environ=env)
    accum = from_launcher("train.grad_accum_steps", cfg.train.grad_accum_steps,
                          "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1", int, environ=env)
    return precision, f"{accum} (accelerate config: {path if defaults else 'none'})"


def wandb_state() -> str:
    from hwr_dist.tracking import _installed

    if not _installed("wandb"):
        return "not installed (pip install 'hwr-dist[wandb]')"
    mode = os.environ.get("WANDB_MODE", "") or "online"
    netrc = Path.home() / ".netrc"
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return f"installed; WANDB_MODE {mode}; {'logged in' if logged_in else 'not logged in (offline works)'}"


def free_disk(out_dir: str) -> tuple[Path, float]:
    """(the nearest existing folder of the run directory, GiB free there)."""
    out = Path(out_dir)
    probe = next((p for p in (out, *out.absolute().parents) if p.exists()), Path("."))
    return probe, shutil.disk_usage(probe).free / 2**30


def rows(cfg, probe: Path, free: float) -> list[tuple[str, str]]:
    import torch

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda else "-"
    precision, accum = in_effect(cfg)
    return [("torch", torch.__version__), ("CUDA", torch.version.cuda if cuda else f"not available ({torch.version.cuda} build)"),
            ("NCCL", nccl), ("GPUs", ", ".join(gpus) or "none: training runs on CPU (gloo for several processes)"),
            ("CPU cores", str(os.cpu_count())), ("precision in effect", precision), ("accumulation in effect", accum),
            ("W&B", wandb_state()), ("SLURM client", shutil.which("sbatch") or "not found (hwr slurm needs sbatch)"),
            (f"free disk at {probe}", f"{free:.1f} GiB")]


def doctor(config: Path | None, overrides: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from hwr_dist.recipes import load

    cfg = load(config, overrides)
    table = Table(title="hwr doctor", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    probe, free = free_disk(cfg.train.out_dir)
    for k, v in rows(cfg, probe, free):
        table.add_row(k, v)
    Console(soft_wrap=True).print(table)
    if free < MIN_FREE_GB:
        raise HwrError(f"only {free:.1f} GiB free for {cfg.train.out_dir}; free space or set train.out_dir elsewhere")
