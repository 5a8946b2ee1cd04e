"""Writing files so that nothing already written is lost: every write is atomic.

A file is written to a hidden temporary sibling (`.NAME.tmpPID`), flushed, fsynced and
renamed over the target, and the rename itself is made durable: a kill or a full disk at
any moment leaves the old file or the new one, never half of one. Temporaries of a writer
that was killed are removed by `remove_stale_temporaries` on the next start.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_STALE = re.compile(r"^\..+\.(tmp\d+|link)$")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to (by any writer); renamed into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: Any) -> None:
    """str or bytes as they are; anything else through torch.save (tensors, state dicts)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            if isinstance(data, str):
                f.write(data.encode())
            elif isinstance(data, bytes):
                f.write(data)
            else:
                import torch

                try:
                    torch.save(data, f)
                except RuntimeError as e:
                    # torch's zip writer turns a failed write (a full disk) into a RuntimeError
                    # ("unexpected pos"); the file system's own error says what happened.
                    if isinstance(e.__context__, OSError):
                        raise e.__context__ from None
                    raise


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files left by writers that were killed mid-write."""
    if folder.is_dir():
        for p in folder.iterdir():
            if _STALE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)


class RunLock:
    """One writer per run directory: an exclusive `flock` on RUN_DIR/.lock, which holds the
    holder's host, pid and start time. The kernel drops the lock when its process dies, so a
    lock left by a killed trainer is simply taken over."""

    NAME = ".lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> str:
        """'' when this process now holds the lock, else who holds it (one line)."""
        import fcntl
        import json
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            return holder or "another process"
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        self._fd = fd
        return ""

    def held(self) -> bool:
        """Whether a live process holds the lock (a read-only probe: nothing is written)."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # drops the probe's shared lock

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
