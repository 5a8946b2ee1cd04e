"""User-facing errors: one line that names the problem and the fix, exit code 2."""

from __future__ import annotations

import functools
import os
import sys


class HwrError(Exception):
    """A bad input (config, data, checkpoint, image, flag). The CLI prints it as one line."""

    exit_code = 2


class TrainingDiverged(HwrError):
    """The loss became NaN or inf; the last good checkpoint is kept."""

    exit_code = 3


def exit_on_error(fn):
    """Turn an HwrError into `error: <message>` on stderr and its exit code, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HwrError as e:
            if os.environ.get("RANK", "0") == "0":  # every rank fails alike; one line is enough
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        except OSError as e:  # the file system said no: name the file, and what to check
            if os.environ.get("RANK", "0") == "0":
                where = f"{e.filename}: " if e.filename else ""
                print(f"error: {where}{e.strerror or e}; check that the path exists, is writable and the disk "
                      "has space", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper
