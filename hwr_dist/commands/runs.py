"""`hwr runs [DIR]`: every run under a folder, with its status and figures, from its files alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hwr_dist.commands.report import load_run
from hwr_dist.errors import HwrError
from hwr_dist.files import RunLock


def status(run: dict[str, Any]) -> str:
    """running (its lock is held), preempted, completed, early-stopped, diverged or failed."""
    if RunLock(run["dir"]).held():
        return "running"
    ended = run["tracking"].get("status")
    if run["preempted"] or ended == "preempted":
        return "preempted"
    if ended in ("diverged", "failed"):
        return ended
    return run["summary"].get("outcome") or ("completed" if ended == "completed" else "failed")


def row(run_dir: Path) -> dict[str, Any]:
    run = load_run(run_dir)
    summary, tracking = run["summary"], run["tracking"]
    vals = [r["val_accuracy"] for r in run["rows"] if isinstance(r.get("val_accuracy"), (int, float))]
    return {"run": run_dir.name, "status": status(run), "steps": run["rows"][-1]["step"],
            "best_val_accuracy": summary.get("best_val_accuracy", max(vals) if vals else None),
            "test_accuracy": summary.get("test_accuracy"), "wall_time_s": summary.get("wall_time_s"),
            "wandb_run_id": tracking.get("run_id") if tracking.get("wandb") else None, "dir": str(run_dir)}


def runs(folder: Path, json_out: bool) -> list[dict[str, Any]]:
    if not folder.is_dir():
        raise HwrError(f"{folder} is not a folder; pass the runs folder (train.out_dir), e.g. runs")
    rows = [row(d) for d in sorted(folder.iterdir()) if (d / "metrics.jsonl").is_file()]
    if json_out:
        print(json.dumps(rows, indent=1))
        return rows
    from rich.console import Console
    from rich.table import Table

    pct = lambda v: f"{v:.2%}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    table = Table(title=f"runs in {folder} ({len(rows)})", title_justify="left")
    for col in ("run", "status", "steps", "best val", "test", "wall time", "W&B run"):
        table.add_column(col, justify="left" if col in ("run", "status", "W&B run") else "right")
    for r in rows:
        wall = f"{r['wall_time_s']:.1f} s" if isinstance(r["wall_time_s"], (int, float)) else "-"
        table.add_row(r["run"], r["status"], str(r["steps"]), pct(r["best_val_accuracy"]), pct(r["test_accuracy"]),
                      wall, r["wandb_run_id"] or "-")
    Console(soft_wrap=True).print(table)
    return rows
