"""`hwr launch`: the right multi-process launcher command for this machine, printed, then run.

Config and flags are checked before anything starts. The launcher runs in a session of its
own, and `hwr launch` waits for it, so nothing is left running behind it. A first SIGINT or
SIGTERM becomes the run's STOP file, the stop request every rank honours: each saves a
checkpoint and exits 0, and the launcher with them. Signalling the launcher instead would not
reach the workers (torch's elastic agent starts each in a session of its own); the agent would
stop them itself and end with a traceback. A second signal goes to the launcher, which ends
its workers itself (torch's agent: SIGTERM, then SIGKILL after 30 s).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from hwr_dist.errors import HwrError
from hwr_dist.train.launcher import build_command


def launch(config: str, overrides: list[str], nproc: int | None, nnodes: int, node_rank: int,
           master_addr: str | None, master_port: int, launcher: str, dry_run: bool) -> int:
    from hwr_dist.recipes import load

    cfg = load(config, overrides)  # a bad config fails here, before any process starts
    if nnodes > 1 and not master_addr:
        raise HwrError(f"--nnodes {nnodes} needs --master-addr: the main node's address, reachable from every node "
                       "(the same on all of them, with --node-rank 0..N-1)")
    cmd, env = build_command(config, overrides, nproc, nnodes, node_rank, master_addr or "127.0.0.1",
                             master_port, launcher)
    shown = " ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + shlex.join(cmd)
    print(shown, file=sys.stderr, flush=True)
    if dry_run:
        return 0
    return run_group(cmd, {**os.environ, **env}, Path(cfg.train.out_dir) / cfg.train.name)


def run_group(cmd: list[str], env: dict[str, str], run_dir: Path) -> int:
    """Run `cmd` in a new session and wait for it; SIGINT/SIGTERM ask the run to stop (see above).
    Returns the launcher's exit status, or 130 when a Ctrl-C stopped the run."""
    from hwr_dist.train.preempt import STOP_FILE

    stop = run_dir / STOP_FILE
    child = subprocess.Popen(cmd, env=env, start_new_session=True)
    signals: list[int] = []
    wrote_stop = False

    def on_signal(signum, frame):
        nonlocal wrote_stop
        signals.append(signum)
        name = signal.Signals(signum).name
        if len(signals) == 1:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                stop.touch()
                wrote_stop = True
                print(f"{name}: the training processes stop after their current step with a checkpoint "
                      f"({stop}); {name} again to have the launcher end them now", file=sys.stderr, flush=True)
                return
            except OSError:  # no STOP file here: the launcher stops its workers itself
                pass
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if wrote_stop:
            stop.unlink(missing_ok=True)  # a resumed run must not stop at once
    return 130 if code == 0 and signals[:1] == [signal.SIGINT] else code
