"""`hwr report RUN_DIR`: a finished (or running) run's summary table and its curves as PNG.

Reads only the run directory (metrics.jsonl, summary.json, tracking.json, config.yaml,
eval_test/metrics.json, preempted.json): no torch, no W&B, works on a login node or a laptop
after copying the directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hwr_dist.errors import HwrError
from hwr_dist.plots import plot_curves, series

CURVES_FILE = "report_curves.png"


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl; a torn last line (a process killed mid-write) is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def load_run(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HwrError(f"run directory {run_dir} not found; pass a training run's directory, e.g. runs/default")
    metrics = run_dir / "metrics.jsonl"
    rows = _rows(metrics) if metrics.is_file() else []
    if not rows:
        raise HwrError(f"{run_dir} holds no metrics (metrics.jsonl missing or empty): not a training run directory, "
                       "or it has not logged yet")
    config = {}
    if (run_dir / "config.yaml").is_file():
        import yaml

        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except yaml.YAMLError:
            config = {}
    return {"dir": run_dir, "rows": rows, "config": config if isinstance(config, dict) else {},
            "summary": _json(run_dir / "summary.json"), "tracking": _json(run_dir / "tracking.json"),
            "test": _json(run_dir / "eval_test" / "metrics.json"), "preempted": _json(run_dir / "preempted.json")}


def _pct(v: Any) -> str:
    return f"{v:.2%}" if isinstance(v, (int, float)) else "-"


def summary_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    rows, cfg, summ, trk, test = run["rows"], run["config"], run["summary"], run["tracking"], run["test"]
    section = lambda name: cfg.get(name) if isinstance(cfg.get(name), dict) else {}  # noqa: E731
    system = trk.get("system") or {}
    last_step = max(r["step"] for r in rows)
    if summ.get("outcome"):
        outcome = summ["outcome"]
    elif run["preempted"]:
        outcome = f"preempted at step {run['preempted'].get('step')} (continue with train.resume=auto)"
    else:
        outcome = "not finished (running, or stopped without a final summary)"
    out = [("run", str(section("train").get("name") or run["dir"].name)), ("outcome", outcome)]
    if trk.get("run_id"):
        wb = trk.get("wandb") or {}
        where = f" (W&B {wb.get('mode')}{': ' + wb['url'] if wb.get('url') else ''})" if wb else ""
        out.append(("run id", trk["run_id"] + where))
    if section("model") or section("data"):
        out.append(("model / data", f"{section('model').get('name', '?')} on {section('data').get('name', '?')}"))
    if system:
        out.append(("processes", f"{system.get('world_size')} on {system.get('nodes')} node(s), "
                                 f"{system.get('device')} ({system.get('distributed_type')})"))
        out.append(("global batch", f"{system.get('global_batch')} = {system.get('batch_per_process')} x "
                                    f"{system.get('world_size')} x {system.get('grad_accum_steps')} accumulation"))
    total = system.get("total_steps")
    out.append(("optimizer steps", f"{last_step}" + (f" of {total}" if total else "")))
    epochs = [r["epoch"] for r in rows if isinstance(r.get("epoch"), int)]
    if epochs:
        out.append(("epochs", str(max(epochs))))
    _, loss = series(rows, "loss")
    if loss:
        out.append(("last train loss", f"{loss[-1]:.4f}"))
    _, lr = series(rows, "lr")
    if lr:
        out.append(("learning rate", f"peak {max(lr):.2e}, last {lr[-1]:.2e}"))
    _, ips = series(rows, "images_per_s")
    if ips:
        out.append(("throughput", f"{sorted(ips)[len(ips) // 2]:.0f} images/s (median)"))
    vsteps, vacc = series(rows, "val_accuracy")
    if vacc:
        best = max(range(len(vacc)), key=vacc.__getitem__)
        out.append(("best val accuracy", f"{vacc[best]:.2%} (step {vsteps[best]})"))
        out.append(("last val accuracy", f"{vacc[-1]:.2%}"))
    test_acc = test.get("accuracy", summ.get("test_accuracy"))
    if test_acc is not None:
        extra = f", macro F1 {test['macro_f1']:.3f}" if isinstance(test.get("macro_f1"), (int, float)) else ""
        out.append(("test accuracy", f"{_pct(test_acc)}{extra}"))
    if isinstance(test.get("cer"), (int, float)):  # a sequence run: accuracy above is whole rows right
        out.append(("test CER / length accuracy", f"{_pct(test['cer'])} / {_pct(test.get('length_accuracy'))}"))
        touching = test.get("touching") or {}
        if touching.get("count"):
            out.append(("test, touching digits", f"{_pct(touching.get('sequence_accuracy'))} of {touching['count']}"))
    if isinstance(summ.get("test_loss"), (int, float)):
        out.append(("test loss", f"{summ['test_loss']:.4f}"))
    if isinstance(summ.get("wall_time_s"), (int, float)):
        out.append(("wall time", f"{summ['wall_time_s']:.1f} s (last job)"))
    out.append(("run directory", str(run["dir"])))
    return out


def report(run_dir: Path) -> Path:
    """Print the summary table (stdout) and write RUN_DIR/report_curves.png; returns the PNG path."""
    from rich.console import Console
    from rich.table import Table

    run = load_run(run_dir)
    table = Table(title=f"run report: {run['dir']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in summary_rows(run):
        table.add_row(k, v)
    console = Console(soft_wrap=True)
    console.print(table)
    try:
        path = plot_curves(run, run["dir"] / CURVES_FILE)
    except OSError as e:
        raise HwrError(f"cannot write {run['dir'] / CURVES_FILE}: {e.strerror or e}") from None
    console.print(f"wrote {path}", highlight=False)
    return path
