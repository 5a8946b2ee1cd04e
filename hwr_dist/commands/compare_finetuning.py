"""`hwr compare-finetuning` (formerly `finetune-report`): what the pretrained weights are worth, on one split.

From a VGG fine-tuning config (model.name vgg, model.weights set) it trains three runs with the
same data, split, seed, schedule and steps:

* head     new head on frozen features (freeze=features, trainable_blocks=0)
* full     full fine-tuning from the same weights (freeze=none)
* scratch  the same network from random weights (weights=none, freeze=none)

and reports, for each, the test accuracy of the initial model ("before") and of the trained
one ("after", the weights picked by validation), with the best validation accuracy,
trainable parameters and wall time: a rich table and a JSON file.

From a small CNN's adaptation config (model.weights set, e.g. configs/adapt_own.yaml) it draws the
few-shot curve instead (`compare_few_shot`): the starting model as is, then adapted and trained from
scratch with K training images per class, for each K and for the whole training split.
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
from hwr_dist.files import atomic_write

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
    from hwr_dist.models import FineTunable, build_model
    from hwr_dist.train.distributed import make_accelerator
    from hwr_dist.train.setup import load_data

    acc = make_accelerator(cfg)
    torch.manual_seed(cfg.train.seed)  # as train.setup on rank 0
    data = load_data(cfg, acc.device, cfg.train.seed)
    model = build_model(cfg.model, len(data.classes)).to(acc.device)
    if isinstance(model, FineTunable):  # its weights expect their own normalisation: fold the data's in
        model.set_input_norm(data.train.mean, data.train.std)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return evaluate(model, data.test, len(data.classes), cfg.data.eval_batch_size, acc).accuracy, trainable


def refuse_taken(cfg: Config, names: list[str]) -> None:
    """Every run of a comparison starts fresh: refuse run directories that already hold a run."""
    out_dir = Path(cfg.train.out_dir)
    taken = [n for n in names if (out_dir / n / "checkpoints" / "last.pt").exists()]
    if taken:
        raise HwrError(f"{out_dir} already holds runs {', '.join(taken)}; pick another train.name or train.out_dir")


def quiet_stdout(json_out: bool):
    """With --json, stdout carries only the JSON: the runs' own tables go to stderr."""
    return contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext()


def compare_finetuning(cfg: Config, json_out: bool = False, out: Path | None = None,
                       shots: tuple[int, ...] = (1, 5, 10, 20, 50)) -> dict:
    from rich.console import Console
    from rich.table import Table

    from hwr_dist.train.run import run_training

    if cfg.model.weights == "none":
        raise HwrError("compare-finetuning needs starting weights to compare with training from scratch; set "
                       "model.weights (builtin for the small CNNs; a torchvision name such as IMAGENET1K_V1 for VGG; "
                       "or a checkpoint path)")
    if cfg.model.name != "vgg":
        return compare_few_shot(cfg, shots, json_out, out)
    out_dir = Path(cfg.train.out_dir)
    refuse_taken(cfg, [f"{cfg.train.name}-{n}" for n in VARIANTS])
    rows = {}
    with quiet_stdout(json_out):
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
    atomic_write(path, json.dumps(report, indent=2) + "\n")
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


# --- the few-shot curve (small CNNs) ------------------------------------------------------------


def parse_shots(text: str) -> tuple[int, ...]:
    """'1,5,10' -> (1, 5, 10): distinct positive integers, ascending."""
    try:
        shots = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        shots = []
    if not shots or shots[0] < 1:
        raise HwrError(f"--shots: expected positive whole numbers separated by commas, e.g. 1,5,10, got {text!r}")
    return tuple(shots)


def few_shot_config(cfg: Config, k: int | None, adapted: bool, classes: int) -> Config:
    """The config's own recipe on K images per class (None: all); `adapted=False` starts from
    random weights with nothing frozen, everything else (schedule, augmentation, steps) the same."""
    c = copy.deepcopy(cfg)
    c.data.limit_per_class = k
    if k is not None:
        held = held_out(cfg, k)
        if held == 0:  # too few images to hold any out: no validation split, no early stopping
            c.data.val_fraction, c.train.early_stopping_patience = 0.0, 0
        c.data.batch_size = min(c.data.batch_size, (k - held) * classes)  # an epoch is at least one batch
    if not adapted:
        m = c.model
        m.weights, m.freeze, m.unfreeze_after_epochs, m.backbone_lr_scale = "none", "none", 0, 1.0
    c.train.name = f"{cfg.train.name}-{'adapted' if adapted else 'scratch'}-{k or 'all'}"
    c.train.resume = ""
    return c


def held_out(cfg: Config, k: int) -> int:
    """Validation images per class out of K (as `hwr_dist.data.stratified_split` rounds)."""
    return round(k * cfg.data.val_fraction)


def compare_few_shot(cfg: Config, shots: tuple[int, ...], json_out: bool, out: Path | None) -> dict:
    from hwr_dist.data import load_dataset
    from hwr_dist.train.run import run_training

    bundle = load_dataset(cfg.data.name, cfg.data.root, cfg.data.download)
    smallest = int(torch.bincount(bundle.train.labels, minlength=len(bundle.classes)).min())
    usable = [k for k in shots if k <= smallest]
    skipped = [k for k in shots if k > smallest]
    sizes = [*usable, None]
    n = len(bundle.classes)
    refuse_taken(cfg, [few_shot_config(cfg, k, a, n).train.name for k in sizes for a in (True, False)])
    rows = []
    with quiet_stdout(json_out):
        as_is, _ = initial_model(few_shot_config(cfg, None, True, n))
        for k in sizes:
            row = {"per_class": k or "all", "val_per_class": None if k is None else held_out(cfg, k)}
            for name, adapted in (("adapted", True), ("scratch", False)):
                c = few_shot_config(cfg, k, adapted, n)
                started = time.perf_counter()
                summary = run_training(c, quiet=True)
                row[name] = {"test_accuracy": summary.get("test_accuracy"), "steps": summary.get("steps"),
                             "best_val_accuracy": summary.get("best_val_accuracy"),
                             "wall_time_s": time.perf_counter() - started,
                             "run_dir": str(Path(c.train.out_dir) / c.train.name)}
            rows.append(row)
    report = {"config": {"data": cfg.data.name, "root": cfg.data.root, "model": cfg.model.name,
                         "weights": cfg.model.weights, "epochs": cfg.train.epochs, "seed": cfg.train.seed,
                         "classes": len(bundle.classes), "train_images": len(bundle.train),
                         "test_images": len(bundle.test),
                         "val_fraction": cfg.data.val_fraction, "smallest_class": smallest, "skipped_shots": skipped},
              "as_is_test_accuracy": as_is, "rows": rows}
    path = out or Path(cfg.train.out_dir) / f"{cfg.train.name}-finetune-report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report["plot"] = str(plot_few_shot(report, path.with_suffix(".png")))
    atomic_write(path, json.dumps(report, indent=2) + "\n")
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        print_few_shot(report, path)
    return report


def print_few_shot(report: dict, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    c = report["config"]
    t = Table(title=f"few-shot report: {c['model']} from {c['weights']} on {c['data']} {c['root']} "
                    f"(test split, {c['test_images']} images; as is: {report['as_is_test_accuracy']:.2%})",
              title_justify="left")
    for col in ("K per class", "train + val", "adapted", "from scratch", "gain", "adapted time", "scratch time"):
        t.add_column(col, justify="right")
    for r in report["rows"]:
        a, s = r["adapted"]["test_accuracy"] or 0.0, r["scratch"]["test_accuracy"] or 0.0
        v = r["val_per_class"]
        split = f"{c['val_fraction']:.0%} val" if v is None else f"{r['per_class'] - v} + {v}"
        t.add_row(str(r["per_class"]), split, f"{a:.2%}", f"{s:.2%}", f"{a - s:+.2%}",
                  f"{r['adapted']['wall_time_s']:.1f} s", f"{r['scratch']['wall_time_s']:.1f} s")
    console = Console()
    console.print(t)
    if c["skipped_shots"]:
        console.print(f"skipped K = {', '.join(map(str, c['skipped_shots']))}: the smallest class has "
                      f"{c['smallest_class']} training images")
    console.print(f"JSON: {path}\nplot: {report['plot']}")


def plot_few_shot(report: dict, path: Path) -> Path:
    """Test accuracy against training images per class (log axis; 'all' at the mean class size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    c = report["config"]
    xs = [r["per_class"] if r["per_class"] != "all" else c["train_images"] / c["classes"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("adapted", f"adapted from {c['weights']}"), ("scratch", "from scratch")):
        ax.plot(xs, [100 * (r[name]["test_accuracy"] or 0) for r in rows], "o-", label=label)
    ax.axhline(100 * report["as_is_test_accuracy"], ls="--", c="gray", label="as is (no training)")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(xs, [str(r["per_class"]) for r in rows])
    ax.set_xlabel("training images per class (K)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{c['data']} {c['root']}" if c["data"] == "imagefolder" else c["data"], fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
