"""Evaluation reports: metrics.json, PNG plots and a per-class table."""

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
