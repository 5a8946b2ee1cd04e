"""Real offline wandb runs, read back from their ``run-<id>.wandb`` files.

Each wandb process runs in a subprocess with a fresh environment
(``WANDB_MODE=offline``, ``WANDB_SILENT=true``, every ``WANDB_*_DIR`` in a temp
dir) so nothing touches the network or the user's wandb state.

What an offline *resumed* run looks like on disk (checked with wandb 0.31.0):

* Every ``wandb.init`` process writes its own directory
  ``$WANDB_DIR/wandb/offline-run-<YYYYMMDD_HHMMSS>-<id>/run-<id>.wandb``; a resume
  never appends to the earlier file.  If two processes with the same id start
  within the same second, the second directory gets a ``-1`` (``-2``, ...)
  suffix, the file inside is still ``run-<id>.wandb``.  ``latest-run`` is a
  symlink to the newest directory.
* The run id is the same (``RunRecord.run_id == "abc123"``) in both files, so
  ``wandb sync`` uploads both into one W&B run.
* Offline there is no server to ask, so ``resume="allow"`` and even
  ``resume="must"`` succeed, ``run.resumed`` is False, ``RunRecord.resumed`` is
  False, ``RunRecord.starting_step`` is 0 and ``run.step`` starts at 0.  The only
  trace of the resume request in the file is ``RunRecord.resume == True``
  (``RunData.resume``; it is False without ``resume=``).
* Consequently the step counter is per process: ``wandb.log`` *without*
  ``step=`` in the resumed process starts again at ``_step`` 0, so a resumed
  training job must pass ``step=<checkpoint step>`` explicitly.
* Step monotonicity is enforced per process only: in the resumed process
  ``log(..., step=1)`` is written even though the earlier process already
  logged step 3 (what the server does with that on ``wandb sync`` cannot be
  checked offline), but a step lower than the last step logged *in the same
  process* (4 or 0 after 5) is dropped: nothing is written for it, only a
  "Tried to log to step 4 that is less than the current step 5 ... will be
  ignored" warning on stderr (suppressed by WANDB_SILENT).
* config passed to ``wandb.init`` is recorded again in every process's run
  record; the summary of each file only covers that process.

Speed: ``import wandb`` is ~1 s and ``wandb.init`` offline ~0.6 s more
(wandb-core service start).  ``wandb.Settings(x_disable_stats=True,
x_disable_meta=True, x_disable_machine_info=True, console="off",
disable_git=True, disable_code=True, save_code=False,
x_save_requirements=False)`` saves only ~0.2-0.3 s per process.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wandb_runfile import (  # noqa: E402
    BLOCK_LEN,
    WandbFileError,
    find_offline_runs,
    iter_record_bytes,
    read_run,
)

pytest.importorskip("wandb")

RUN_ID = "abc123"
CONFIG = {"a": 1, "nested": {"b": 2.5}}

# Runs in the subprocess: sys.argv[1] is a JSON job description.
CHILD = textwrap.dedent(
    """
    import json, sys
    import wandb

    job = json.loads(sys.argv[1])
    settings = wandb.Settings(
        x_disable_stats=True,
        x_disable_meta=True,
        x_disable_machine_info=True,
        console="off",
        disable_git=True,
        disable_code=True,
        save_code=False,
        x_save_requirements=False,
    )
    run = wandb.init(project="p", config=job["config"], id=job["id"],
                     settings=settings, **job.get("init", {}))
    out = {"id": run.id, "resumed": run.resumed, "start_step": run.step,
           "dir": run.dir, "steps_after": []}
    for entry in job["logs"]:
        data = dict(entry["data"])
        if data.pop("__blob__", None):
            data["blob"] = "x" * 100_000
        if "step" in entry:
            run.log(data, step=entry["step"])
        else:
            run.log(data)
        out["steps_after"].append(run.step)
    for k, v in job.get("summary", {}).items():
        run.summary[k] = v
    run.finish()
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb_offline")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(root),
        WANDB_CACHE_DIR=str(root / "cache"),
        WANDB_CONFIG_DIR=str(root / "config"),
        WANDB_DATA_DIR=str(root / "data"),
        WANDB__SERVICE_WAIT="60",
    )
    return root, env


def _run_child(wandb_env, job) -> dict:
    root, env = wandb_env
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(job)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def first_run(wandb_env):
    out = _run_child(
        wandb_env,
        {
            "id": RUN_ID,
            "config": CONFIG,
            "logs": [{"data": {"loss": 0.5}, "step": 0}, {"data": {"loss": 0.25}, "step": 1}],
            "summary": {"final_acc": 0.97},
        },
    )
    dirs = find_offline_runs(wandb_env[0])
    return out, dirs


@pytest.fixture(scope="module")
def resumed_run(wandb_env, first_run):
    out = _run_child(
        wandb_env,
        {
            "id": RUN_ID,
            "config": CONFIG,
            "init": {"resume": "allow"},
            "logs": [{"data": {"loss": 0.125}, "step": 2}, {"data": {"loss": 0.0625}, "step": 3}],
        },
    )
    return out, find_offline_runs(wandb_env[0])


@pytest.fixture(scope="module")
def third_run(wandb_env, resumed_run):
    out = _run_child(
        wandb_env,
        {
            "id": RUN_ID,
            "config": CONFIG,
            "init": {"resume": "must"},  # also accepted offline
            "logs": [
                {"data": {"nostep": 1.0}},  # no step= : restarts at _step 0
                {"data": {"loss": 0.3}, "step": 1},  # < 3 of previous process: kept
                {"data": {"loss": 0.2}, "step": 5},
                {"data": {"loss": 0.9}, "step": 4},  # < 5 in this process: dropped
                {"data": {"loss": 0.8}, "step": 0},  # dropped
                {"data": {"loss": 0.1, "__blob__": True}, "step": 6},  # 100 kB record
            ],
        },
    )
    return out, find_offline_runs(wandb_env[0])


def test_offline_run_roundtrip(first_run):
    out, dirs = first_run
    assert out["id"] == RUN_ID and out["resumed"] is False
    assert len(dirs) == 1
    d = dirs[0]
    assert d.name.startswith("offline-run-") and d.name.endswith("-" + RUN_ID)
    assert (d / f"run-{RUN_ID}.wandb").is_file()
    assert Path(out["dir"]).parent == d

    run = read_run(d)
    assert run.run_id == RUN_ID
    assert run.project == "p"
    assert run.resume is False and run.resumed is False
    assert run.config == CONFIG  # nested decoded, _wandb dropped
    assert run.steps == [0, 1]
    assert run.metric("loss") == [(0, 0.5), (1, 0.25)]
    assert all("_timestamp" in h and "_runtime" in h for h in run.history)
    assert run.summary["final_acc"] == 0.97
    assert run.summary["loss"] == 0.25 and run.summary["_step"] == 1
    assert run.exit_code == 0
    assert run.record_types[0] == "header" and run.record_types[-1] == "exit"
    # the file can also be given directly
    assert read_run(d / f"run-{RUN_ID}.wandb").history == run.history


def test_offline_resume_same_id_new_dir(first_run, resumed_run):
    out, dirs = resumed_run
    first_dir = first_run[1][0]
    assert out["id"] == RUN_ID
    assert out["resumed"] is False  # offline: no server to confirm the resume
    assert out["start_step"] == 0  # offline: previous step unknown
    assert len(dirs) == 2 and dirs[0] == first_dir
    new = dirs[1]
    assert new != first_dir and (new / f"run-{RUN_ID}.wandb").is_file()
    assert find_offline_runs(first_dir.parent, RUN_ID) == dirs

    first, second = read_run(dirs[0]), read_run(dirs[1])
    assert second.run_id == first.run_id == RUN_ID
    assert second.resume is True and second.resumed is False
    assert second.starting_step in (None, 0)
    assert second.config == CONFIG
    assert second.metric("loss") == [(2, 0.125), (3, 0.0625)]
    assert "final_acc" not in second.summary and second.summary["_step"] == 3
    # the earlier file is untouched
    assert first.steps == [0, 1]
    # what `wandb sync` would upload for this run id, in order
    assert [s for r in (first, second) for s in r.steps] == [0, 1, 2, 3]


def test_offline_resumed_step_handling(resumed_run, third_run):
    out, dirs = third_run
    assert len(dirs) == 3 and dirs[:2] == resumed_run[1]
    assert out["resumed"] is False and out["start_step"] == 0
    run = read_run(dirs[2])
    assert run.run_id == RUN_ID and run.resume is True
    # no step= -> _step 0 again; step 1 (< previous process's 3) kept;
    # steps 4 and 0 (< 5 in this process) dropped.
    assert run.steps == [0, 1, 5, 6]
    assert run.history[0]["nostep"] == 1.0
    assert run.metric("loss") == [(1, 0.3), (5, 0.2), (6, 0.1)]
    # a record larger than a 32 KiB block (FIRST/MIDDLE/LAST chunks) decodes
    assert run.history[-1]["blob"] == "x" * 100_000
    assert (dirs[2] / f"run-{RUN_ID}.wandb").stat().st_size > 3 * BLOCK_LEN


# --- framing, on synthetic files -------------------------------------------


def _write_log(path: Path, payloads: list[bytes]) -> None:
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    for p in payloads:
        first = True
        while True:
            left = BLOCK_LEN - len(out) % BLOCK_LEN
            if left < 7:
                out += b"\0" * left
                continue
            n = min(len(p), left - 7)
            chunk, p = p[:n], p[n:]
            last = not p
            ctype = (1 if last else 2) if first else (4 if last else 3)
            crc = zlib.crc32(chunk, zlib.crc32(bytes([ctype]))) & 0xFFFFFFFF
            out += struct.pack("<IHB", crc, len(chunk), ctype) + chunk
            first = False
            if last:
                break
    path.write_bytes(bytes(out))


def test_framing_block_boundaries(tmp_path):
    # first payload leaves exactly 3 bytes in block 0 -> zero padding
    p0 = b"a" * (BLOCK_LEN - 7 - 7 - 3)
    payloads = [p0, b"b" * 5, b"c" * (3 * BLOCK_LEN + 11), b"", b"d"]
    f = tmp_path / "run-x.wandb"
    _write_log(f, payloads)
    assert list(iter_record_bytes(f)) == payloads

    raw = bytearray(f.read_bytes())
    raw[20] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(WandbFileError):
        list(iter_record_bytes(f))
    assert list(iter_record_bytes(f, strict=False)) == []

    f.write_bytes(b"XXXX" + bytes(10))
    with pytest.raises(WandbFileError):
        list(iter_record_bytes(f))
