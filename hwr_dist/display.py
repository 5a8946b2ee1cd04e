"""What the main process shows: a progress bar on a terminal, plain log lines elsewhere (a file, a
pipe, a job log), and with --quiet only the final summary line."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class Display:
    def __init__(self, enabled: bool, quiet: bool):
        self.enabled = enabled and not quiet  # quiet: nothing but `final`
        self.main = enabled
        self.bar = not quiet and sys.stderr.isatty()
        self.console = Console(stderr=True, soft_wrap=True)
        self.progress = None

    def start(self, total_steps: int, start_step: int) -> None:
        if self.enabled and self.bar:
            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[ips]} img/s"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               epoch="-", loss="-", lr="-", ips="-")
            self.progress.start()

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def step(self, step: int, epoch: int, metrics: dict | None = None) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            fields = {}
            if metrics:
                fields = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
                          "ips": f"{metrics['images_per_s']:.0f}"}
            self.progress.update(self.task, completed=step, epoch=epoch + 1, **fields)
        elif metrics:
            self.print(f"step {step} epoch {epoch + 1} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                       f"{metrics['images_per_s']:.0f} img/s")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def final(self, text: str) -> None:
        """The one line that --quiet keeps: how the job ended (stdout, main process)."""
        if self.main:
            print(text, flush=True)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        if not self.enabled:
            return
        t = Table(title=title, show_header=False, title_justify="left")
        t.add_column(style="bold")
        t.add_column(justify="right")
        for k, v in rows:
            t.add_row(k, v)
        Console().print(t)


def per_class_table(summary: dict, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("class", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="right" if col != "class" else "left")
    for name, m in summary["per_class"].items():
        t.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    t.add_row("[bold]macro", f"{summary['macro_precision']:.3f}", f"{summary['macro_recall']:.3f}",
              f"{summary['macro_f1']:.3f}", str(summary["count"]))
    return t
