"""`hwr finetune-report`: what the pretrained weights are worth, on one data split.

From a fine-tuning config (model.name vgg, model.weights set) it trains three runs with the
same data, split, seed, schedule and steps:

* head     new head on frozen features (freeze=features, trainable_blocks=0)
* full     full fine-tuning from the same weights (freeze=none)
* scratch  the same network from random weights (weights=none, freeze=none)

and reports, for each, the test accuracy of the initial model ("before") and of the trained
one ("after", the weights picked by validation), with the best validation accuracy,
trainable parameters and wall time: a rich table and a JSON file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

from hwr_dist.config import Config
from hwr_dist.errors import HwrError

VARIANTS = {
    "head": "new head on frozen features",
    "full": "full fine-tuning",
    "scratch": "from scratch",
}


def variant_config(cfg: Config, variant: str) -> Config:
    c = copy.deepcopy(cfg)
    m = c.model
    m.trainable_blocks, m.unfreeze_after_epochs = 0, 0
    m.freeze = "features" if variant == "head" else "none"
    if variant == "scratch":
        m.weights = "none"
    if m.freeze == "none" and m.cache_features == "on":
        m.cache_features = "auto"
    c.train.name = f"{cfg.train.name}-{variant}"
    c.train.resume = ""
    return c


@torch.no_grad()
def initial_model(cfg: Config) -> tuple[float, int]:
    """(test accuracy, trainable parameters) of the model exactly as the run starts (same seed, same init)."""
    from hwr_dist.evaluate import evaluate
    from hwr_dist.models import build_model
    from hwr_dist.train import load_data, make_accelerator

    acc = make_accelerator(cfg)
    torch.manual_seed(cfg.train.seed)  # as train.setup on rank 0
    data = load_data(cfg, acc.device, cfg.train.seed)
    model = build_model(cfg.model, len(data.classes)).to(acc.device)
    model.set_input_norm(data.train.mean, data.train.std)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return evaluate(model, data.test, len(data.classes), cfg.data.eval_batch_size, acc).accuracy, trainable


def finetune_report(cfg: Config, json_out: bool = False, out: Path | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    from hwr_dist.train import run_training

    if cfg.model.name != "vgg":
        raise HwrError(f"finetune-report compares fine-tuning policies of model.name=vgg; this config has "
                       f"model.name={cfg.model.name}")
    if cfg.model.weights == "none":
        raise HwrError("finetune-report needs pretrained weights to compare with training from scratch; "
                       "set model.weights (a torchvision name such as IMAGENET1K_V1 or a checkpoint path)")
    out_dir = Path(cfg.train.out_dir)
    taken = [n for n in VARIANTS if (out_dir / f"{cfg.train.name}-{n}" / "checkpoints" / "last.pt").exists()]
    if taken:
        raise HwrError(f"{out_dir} already holds runs {', '.join(f'{cfg.train.name}-{n}' for n in taken)}; "
                       "pick another train.name or train.out_dir")
    rows = {}
    # With --json, stdout carries only the JSON: the runs' own tables go to stderr.
    quiet_stdout = contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext()
    with quiet_stdout:
        for name in VARIANTS:
            c = variant_config(cfg, name)
            before, trainable = initial_model(c)
            started = time.perf_counter()
            summary = run_training(c, quiet=True)
            rows[name] = {
                "policy": VARIANTS[name], "run_dir": str(out_dir / c.train.name),
                "weights": c.model.weights, "freeze": c.model.freeze,
                "test_accuracy_before": before, "test_accuracy_after": summary.get("test_accuracy"),
                "best_val_accuracy": summary.get("best_val_accuracy"), "steps": summary.get("steps"),
                "wall_time_s": time.perf_counter() - started,
                "trainable_parameters": trainable,
            }
    report = {"config": {"data": cfg.data.name, "variant": cfg.model.variant, "weights": cfg.model.weights,
                         "input_size": cfg.model.input_size, "head": cfg.model.head, "epochs": cfg.train.epochs,
                         "max_steps": cfg.train.max_steps, "seed": cfg.train.seed},
              "runs": rows}
    path = out or out_dir / f"{cfg.train.name}-finetune-report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if json_out:
        print(json.dumps(report, indent=2))
        return report
    t = Table(title=f"fine-tuning report: {cfg.model.variant} from {cfg.model.weights} on {cfg.data.name} "
                    "(test split, same seed and steps)", title_justify="left")
    for col in ("policy", "before", "after", "gain", "best val", "trainable params", "wall time"):
        t.add_column(col, justify="left" if col == "policy" else "right", no_wrap=col == "policy")
    for r in rows.values():
        after = r["test_accuracy_after"] or 0.0
        t.add_row(r["policy"], f"{r['test_accuracy_before']:.2%}", f"{after:.2%}",
                  f"{after - r['test_accuracy_before']:+.2%}", f"{r['best_val_accuracy']:.2%}",
                  f"{r['trainable_parameters']:,}", f"{r['wall_time_s']:.1f} s")
    console = Console()
    console.print(t)
    console.print(f"JSON: {path}")
    return report

