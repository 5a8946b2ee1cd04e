"""Graceful stop on preemption: a signal handler or a stop file sets a flag; the loop acts.

Signal handlers only record the signal (saving inside a handler is unsafe). Launchers do
not forward every signal (torchrun drops SIGUSR1), so a job script can also ask for a
stop by creating `<run_dir>/STOP` on the shared file system: every rank sees it, and
the ranks agree on the step to stop at through an all-reduce at the check points.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

STOP_FILE = "STOP"
PREEMPTED_FILE = "preempted.json"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self, run_dir: Path):
        self.stop_file = run_dir / STOP_FILE
        self.signal_name = ""
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def local(self) -> bool:
        return bool(self.signal_name) or self.stop_file.exists()

    def reason(self) -> str:
        return self.signal_name or f"{self.stop_file} exists"


def write_preempted(run_dir: Path, step: int, reason: str) -> None:
    """Tell the job script that the run stopped early on purpose and wants a requeue."""
    (run_dir / PREEMPTED_FILE).write_text(json.dumps({"step": step, "reason": reason}) + "\n")
