"""Reader for wandb's offline transaction log (``run-<id>.wandb``).

wandb (checked with 0.31) ships no reader for this file, so tests parse it here.

File layout (same framing as the old ``wandb/sdk/internal/datastore.py`` and
wandb-core's ``leveldb`` package, a variant of the LevelDB log format):

* a 7-byte file header ``<4sHB``: ident ``b":W&B"``, magic ``0xBEE1``, version ``0``;
* then the file is cut into 32 KiB blocks (the file header lives at the start of
  block 0).  Each chunk has a 7-byte header ``<IHB`` = (checksum, length, type),
  followed by ``length`` bytes of data.  ``type`` is 1 FULL, 2 FIRST, 3 MIDDLE,
  4 LAST; a record larger than what is left of a block is split into
  FIRST/MIDDLE.../LAST chunks.  If fewer than 7 bytes are left in a block they are
  zero padding.  ``checksum`` is ``zlib.crc32(bytes([type]) + data)`` (IEEE CRC32,
  not LevelDB's masked CRC32C).
* each reassembled record is a serialized ``wandb_internal_pb2.Record``.

Only the standard library and ``wandb.proto`` are needed.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

HEADER_IDENT = b":W&B"
HEADER_MAGIC = 0xBEE1
HEADER_VERSION = 0
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_LEN = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4

__all__ = [
    "RunData",
    "WandbFileError",
    "find_offline_runs",
    "iter_record_bytes",
    "iter_records",
    "read_run",
    "read_runs",
]


class WandbFileError(ValueError):
    """The file is not a well-formed wandb transaction log."""


def iter_record_bytes(path: str | Path, *, strict: bool = True) -> Iterator[bytes]:
    """Yield the raw payload of each record in a ``.wandb`` file.

    With ``strict=False`` a truncated tail (e.g. a process killed mid-write) ends
    iteration quietly instead of raising.
    """
    buf = Path(path).read_bytes()
    if len(buf) < FILE_HEADER.size:
        raise WandbFileError(f"{path}: too short for a wandb header")
    ident, magic, version = FILE_HEADER.unpack_from(buf, 0)
    if ident != HEADER_IDENT or magic != HEADER_MAGIC or version != HEADER_VERSION:
        raise WandbFileError(
            f"{path}: bad header {ident!r} magic={magic:#x} version={version}"
        )
    pos = FILE_HEADER.size
    pending: bytearray | None = None
    n = len(buf)
    while pos < n:
        left_in_block = BLOCK_LEN - pos % BLOCK_LEN
        if left_in_block < CHUNK_HEADER.size:
            pos += left_in_block  # zero padding at the end of a block
            continue
        if pos + CHUNK_HEADER.size > n:
            if strict and any(buf[pos:]):
                raise WandbFileError(f"{path}: truncated chunk header at {pos}")
            return
        checksum, length, ctype = CHUNK_HEADER.unpack_from(buf, pos)
        if checksum == 0 and length == 0 and ctype == 0:
            # Zero-filled tail (preallocated / padded): nothing more to read.
            if strict and any(buf[pos:]):
                raise WandbFileError(f"{path}: zero chunk header followed by data at {pos}")
            return
        start = pos + CHUNK_HEADER.size
        end = start + length
        if end > n or length > left_in_block - CHUNK_HEADER.size:
            if strict:
                raise WandbFileError(f"{path}: truncated or oversize chunk at {pos}")
            return
        data = buf[start:end]
        if zlib.crc32(data, zlib.crc32(bytes([ctype]))) & 0xFFFFFFFF != checksum:
            if strict:
                raise WandbFileError(f"{path}: checksum mismatch in chunk at {pos}")
            return
        pos = end
        if ctype == FULL:
            if pending is not None and strict:
                raise WandbFileError(f"{path}: FULL chunk inside a split record at {pos}")
            pending = None
            yield bytes(data)
        elif ctype == FIRST:
            if pending is not None and strict:
                raise WandbFileError(f"{path}: FIRST chunk inside a split record at {pos}")
            pending = bytearray(data)
        elif ctype in (MIDDLE, LAST):
            if pending is None:
                if strict:
                    raise WandbFileError(f"{path}: chunk type {ctype} without FIRST at {pos}")
                continue
            pending += data
            if ctype == LAST:
                yield bytes(pending)
                pending = None
        else:
            raise WandbFileError(f"{path}: unknown chunk type {ctype} at {pos}")
    if pending is not None and strict:
        raise WandbFileError(f"{path}: file ends inside a split record")


def iter_records(path: str | Path, *, strict: bool = True) -> Iterator[Any]:
    """Yield each record of a ``.wandb`` file as a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in iter_record_bytes(path, strict=strict):
        rec = pb.Record()
        rec.ParseFromString(raw)
        yield rec


@dataclass
class RunData:
    path: Path
    run_id: str | None = None
    project: str | None = None
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    display_name: str | None = None
    tags: list[str] = field(default_factory=list)
    # RunRecord.resumed: set only when the *server* confirmed a resume, so it is
    # always False for offline runs (wandb 0.31).
    resumed: bool | None = None
    # RunRecord.resume: True when wandb.init was called with resume="allow"/"must"
    # (what an offline file can tell about resuming).
    resume: bool | None = None
    starting_step: int | None = None  # RunRecord.starting_step, if set
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None
    record_types: list[str] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        return [h["_step"] for h in self.history if "_step" in h]

    def metric(self, key: str) -> list[tuple[int | None, Any]]:
        """``[(step, value), ...]`` for every history row that has ``key``."""
        return [(h.get("_step"), h[key]) for h in self.history if key in h]


def _item_path(item: Any) -> list[str]:
    if item.nested_key:
        return list(item.nested_key)
    return [item.key]


def _set_path(d: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = d[k] = {}
        d = nxt
    d[keys[-1]] = value


def _del_path(d: dict[str, Any], keys: list[str]) -> None:
    for k in keys[:-1]:
        d = d.get(k)
        if not isinstance(d, dict):
            return
    d.pop(keys[-1], None)


def _apply_update(target: dict[str, Any], rec: Any) -> None:
    """Apply a ConfigRecord/SummaryRecord (update + remove) to ``target``."""
    for item in rec.update:
        _set_path(target, _item_path(item), json.loads(item.value_json))
    for item in rec.remove:
        _del_path(target, _item_path(item))


def _history_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    return None


def read_run(path: str | Path, *, strict: bool = True) -> RunData:
    """Read an offline run from its directory (``offline-run-*``) or ``.wandb`` file."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("run-*.wandb"))
        if len(found) != 1:
            raise FileNotFoundError(f"expected one run-*.wandb in {p}, found {found}")
        p = found[0]
    data = RunData(path=p)
    for rec in iter_records(p, strict=strict):
        kind = rec.WhichOneof("record_type")
        data.record_types.append(kind or "")
        if kind == "run":
            r = rec.run
            data.run_id = r.run_id or data.run_id
            data.project = r.project or data.project
            data.entity = r.entity or data.entity
            data.group = r.run_group or data.group
            data.job_type = r.job_type or data.job_type
            data.display_name = r.display_name or data.display_name
            data.tags = list(r.tags) or data.tags
            data.resumed = bool(r.resumed)
            data.resume = bool(getattr(r, "resume", False))
            if r.starting_step:
                data.starting_step = r.starting_step
            if r.HasField("config"):
                _apply_update(data.config, r.config)
            if r.HasField("summary"):
                _apply_update(data.summary, r.summary)
        elif kind == "config":
            _apply_update(data.config, rec.config)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _set_path(row, _item_path(item), _history_value(item))
            if rec.history.HasField("step") and "_step" not in row:
                row["_step"] = rec.history.step.num
            data.history.append(row)
        elif kind == "summary":
            _apply_update(data.summary, rec.summary)
        elif kind == "files":
            for f in rec.files.files:
                if f.path not in data.files:
                    data.files.append(f.path)
        elif kind == "artifact":
            a = rec.artifact
            data.artifacts.append(
                {"name": a.name, "type": a.type, "digest": a.digest, "aliases": list(a.aliases)}
            )
        elif kind == "use_artifact":
            u = rec.use_artifact
            data.artifacts.append({"name": u.name, "type": u.type, "id": u.id, "used": True})
        elif kind == "exit":
            data.exit_code = rec.exit.exit_code
    data.config.pop("_wandb", None)
    return data


def find_offline_runs(wandb_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Offline run directories under ``wandb_dir``, oldest first.

    ``wandb_dir`` may be ``$WANDB_DIR`` (its ``wandb/`` subdirectory is looked
    into) or that ``wandb/`` directory itself.  Directory names are
    ``offline-run-YYYYMMDD_HHMMSS-<id>``; when that name is already taken (two
    starts of the same id within one second) wandb appends ``-1``, ``-2``, ...
    So the order is (timestamp, collision suffix).  The ``latest-run`` symlink
    is skipped.  ``run_id`` filters on the ``run-<id>.wandb`` file inside.
    """
    root = Path(wandb_dir)
    if (root / "wandb").is_dir():
        root = root / "wandb"
    pat = re.compile(r"^offline-run-(\d{8}_\d{6})-(.+)$")
    found: list[tuple[str, int, Path]] = []
    for d in root.glob("offline-run-*"):
        m = pat.match(d.name)
        if m is None or not d.is_dir() or d.is_symlink():
            continue
        ids = [f.name[len("run-"):-len(".wandb")] for f in d.glob("run-*.wandb")]
        if run_id is not None and run_id not in ids:
            continue
        rest = m.group(2)
        suffix = 0
        for rid in ids:  # "<id>" or "<id>-<n>"
            if rest.startswith(rid + "-") and rest[len(rid) + 1:].isdigit():
                suffix = int(rest[len(rid) + 1:])
        found.append((m.group(1), suffix, d))
    return [d for _, _, d in sorted(found, key=lambda t: (t[0], t[1], t[2].name))]


def read_runs(wandb_dir: str | Path, run_id: str | None = None, *, strict: bool = True) -> list[RunData]:
    """``read_run`` of every offline run dir under ``wandb_dir`` (oldest first)."""
    return [read_run(d, strict=strict) for d in find_offline_runs(wandb_dir, run_id)]
