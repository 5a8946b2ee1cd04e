"""Graceful stop: a signal handler or a stop file sets a flag; the loop acts on it.

Signal handlers only record the signal (saving inside a handler is unsafe). Launchers do
not forward every signal (torchrun drops SIGUSR1), so a job script can also ask for a
stop by creating `<run_dir>/STOP` on the shared file system.

The ranks agree on the step to stop at: every optimizer step each rank sends its flag into an
asynchronous all-reduce on a CPU (gloo) group of its own and reads the previous step's result,
so a stop is honoured within one step, on the same step everywhere, and a GPU run never
waits for its device to decide. Ctrl-C stops like SIGTERM (checkpoint, then exit 130); a
second Ctrl-C aborts at once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch

from hwr_dist.files import atomic_write

STOP_FILE = "STOP"
PREEMPTED_FILE = "preempted.json"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FILE_CHECK_S = 0.1  # the stop file is looked for at most this often (a stat on a shared file system)


class StopFlag:
    def __init__(self, run_dir: Path):
        self.stop_file = run_dir / STOP_FILE
        self.signal_name = ""
        self._file_seen, self._file_checked = False, 0.0
        self._group = self._vote = self._work = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signal_name == "SIGINT":  # the second Ctrl-C: abort now
                raise KeyboardInterrupt
            if os.environ.get("RANK", "0") == "0":  # os.write: print is not safe inside a handler
                os.write(2, b"\nstopping after this step with a checkpoint; Ctrl-C again to abort at once\n")
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def connect(self, num_processes: int) -> None:
        """Several processes: a gloo group for the votes (needs the default group to exist)."""
        if num_processes > 1:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")

    def local(self) -> bool:
        now = time.monotonic()
        if not self._file_seen and now - self._file_checked >= FILE_CHECK_S:
            self._file_seen, self._file_checked = self.stop_file.exists(), now
        return bool(self.signal_name) or self._file_seen

    def agreed(self) -> bool:
        """Whether every rank should stop now: the vote sent one step ago (this rank's own flag
        when alone). Call once per optimizer step on every rank."""
        if self._group is None:
            return self.local()
        import torch.distributed as dist

        stop = False
        if self._work is not None:
            self._work.wait()
            stop = bool(self._vote.item() > 0)
        self._vote = torch.tensor([float(self.local())])
        self._work = dist.all_reduce(self._vote, group=self._group, async_op=True)
        return stop

    def close(self) -> None:
        """Wait for the last vote in flight, so that no collective is left behind at exit."""
        if self._work is not None:
            self._work.wait()
            self._work = None

    @property
    def interrupted(self) -> bool:
        return self.signal_name == "SIGINT"

    def reason(self) -> str:
        return self.signal_name or f"{self.stop_file} exists"


def write_preempted(run_dir: Path, step: int, reason: str) -> None:
    """Tell the job script that the run stopped early on purpose and wants a requeue."""
    atomic_write(run_dir / PREEMPTED_FILE, json.dumps({"step": step, "reason": reason}) + "\n")
