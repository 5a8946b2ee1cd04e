"""Evaluation reports: metrics.json, PNG plots and a per-class table; `hwr evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

from hwr_dist.data.loader import DeviceData
from hwr_dist.evaluate import EvalResult, save_plots


def write_eval_report(result: EvalResult, data: DeviceData, classes: list[str], out_dir: Path, split: str,
                      display) -> dict:
    from hwr_dist.display import per_class_table

    summary = {"split": split, **result.summary(classes),
               "worst": [{"index": i, "true": classes[y], "predicted": classes[p], "loss": loss}
                         for loss, i, y, p in result.worst]}
    out_dir = out_dir / f"eval_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    plots = save_plots(result, data, classes, out_dir, split)
    if display.enabled:
        display.console.print(per_class_table(summary, f"{split}: accuracy {result.accuracy:.2%} "
                                                       f"on {result.count} images"))
        display.print(f"wrote {path} and {', '.join(str(p) for p in plots)}")
    return summary


def evaluate_checkpoint(checkpoint: Path, split: str, out: Path | None, data_root: str | None) -> dict:
    """Re-evaluate a checkpoint on the split it was trained against, on one process or under a launcher."""
    import torch
    from accelerate import Accelerator

    from hwr_dist.data import load_dataset, stratified_split
    from hwr_dist.display import Display
    from hwr_dist.errors import HwrError
    from hwr_dist.evaluate import evaluate
    from hwr_dist.inference import load_trained

    trained = load_trained(checkpoint)
    cfg = trained.cfg
    acc = Accelerator(cpu=not torch.cuda.is_available())
    bundle = load_dataset(cfg.data.name, data_root or cfg.data.root, download=False)
    if bundle.classes != trained.classes:
        raise HwrError(f"{trained.path} was trained on other classes than data set {cfg.data.name} has now")
    if split == "val":
        _, chosen = stratified_split(bundle.train, cfg.data.val_fraction, cfg.train.seed)
        if len(chosen) == 0:
            raise HwrError("this run had no validation split (data.val_fraction=0); use --split test")
    else:
        chosen = bundle.test
    data = DeviceData.from_split(chosen, acc.device, trained.mean, trained.std)
    model = trained.model.to(acc.device)
    result = evaluate(model, data, len(trained.classes), cfg.data.eval_batch_size, acc, worst_k=32)
    display = Display(acc.is_main_process, quiet=True)
    if acc.is_main_process:
        return write_eval_report(result, data, trained.classes, out or trained.run_dir, split, display)
    return {}
