"""Metric tracking on the main process: always `metrics.jsonl` in the run directory, plus
Weights & Biases and TensorBoard when the config asks for them.

One tracker per job: only the main process (global rank 0, whatever the number of
processes and nodes) logs; the other ranks hold a disabled tracker. wandb and tensorboard
are imported only when enabled.

The run id is generated on a fresh start and kept in every checkpoint
(TrainState.tracker_run_id): a resumed job (requeue, crash) logs into the same W&B run with
resume="allow", and every call passes step= explicitly (the optimizer step), so the history
continues from the checkpoint's step. Offline, each job writes its own
`wandb/offline-run-*-<id>` directory; `wandb sync` uploads them into the one run.

Files in the run directory (main process):
  metrics.jsonl  one JSON line per log point, epoch end and final result
  tracking.json  run id, resume step, system facts, where W&B / TensorBoard write
  summary.json   final summary (written at the end; absent while running or preempted)
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any

from hwr_dist.errors import HwrError
from hwr_dist.files import atomic_write

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TRACKING_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"

# wandb.Settings for offline runs: a cheaper start (measured with wandb 0.31: ~0.2-0.3 s per
# start; system stats stay on, GPU use is worth having after a `wandb sync`), and the
# `.wandb` file flushed every second instead of every 15 s, so a job killed outright (no
# signal first) loses at most the last second of metrics. Settings unknown to the installed
# wandb are left out.
OFFLINE_SETTINGS = dict(x_disable_meta=True, x_disable_machine_info=True, console="off", disable_git=True,
                        disable_code=True, save_code=False, x_save_requirements=False,
                        x_transaction_log_flush_interval=1.0)


def _row(line: str) -> dict | None:
    """A metrics line, or None for a blank line or one torn by a crash mid-write."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint's step: they will be logged again."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    kept = [line for line, row in ((line, _row(line)) for line in path.read_text(errors="replace").splitlines())
            if row is not None and row.get("step", 0) <= step]
    atomic_write(path, "".join(line + "\n" for line in kept))


def new_run_id() -> str:
    """8 characters of [a-z0-9], like wandb's own ids (valid in W&B run and artifact names)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


WANDB_FIELDS = ("project", "entity", "group", "job_type", "tags", "notes", "mode")


def wandb_enabled(wcfg) -> bool:
    """tracking.wandb.enabled if given; else on when any W&B setting is given here or WANDB_MODE is set."""
    if wcfg.enabled is not None:
        return wcfg.enabled
    return any(getattr(wcfg, f) is not None for f in WANDB_FIELDS) or wcfg.log_model \
        or bool(os.environ.get("WANDB_MODE", "").strip())


def wandb_mode(wcfg) -> str:
    """online, offline or disabled: the config's mode > WANDB_MODE (and WANDB_DISABLED) > online."""
    if not wandb_enabled(wcfg):
        return "disabled"
    if wcfg.mode is not None:
        return wcfg.mode
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = {"dryrun": "offline", "run": "online"}.get(env, env)
    if env and env not in ("online", "offline", "disabled"):
        raise HwrError(f"WANDB_MODE={os.environ['WANDB_MODE']}: expected online, offline or disabled")
    return env or "online"


def in_sweep() -> bool:
    """True under `wandb agent`: it sets WANDB_SWEEP_ID and a fresh WANDB_RUN_ID per trial."""
    return bool(os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"))


def apply_sweep_name(cfg) -> None:
    """Under `wandb agent`, each trial gets its own run directory: out_dir/NAME-<W&B run id>."""
    if wandb_enabled(cfg.tracking.wandb) and in_sweep():
        suffix = "-" + os.environ["WANDB_RUN_ID"]
        if not cfg.train.name.endswith(suffix):
            cfg.train.name += suffix


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _missing(key: str, package: str, extra: str, why: str = "") -> HwrError:
    why = f" ({why})" if why else ""
    return HwrError(f"{key} is on but {package} cannot be imported{why}; install it with "
                    f"pip install 'hwr-dist[{extra}]', or set {key}=false")


def check_config(cfg) -> None:
    """The tracking section."""
    from hwr_dist.config import check

    check(cfg.tracking.wandb.mode in (None, "online", "offline", "disabled"), "tracking.wandb.mode",
          "online, offline, disabled or null", cfg.tracking.wandb.mode)
    check(cfg.tracking.wandb.log_every >= 0, "tracking.wandb.log_every", "an integer >= 0", cfg.tracking.wandb.log_every)


def check_available(cfg) -> None:
    """Every rank, before any work: fail at once if an enabled backend is not installed."""
    if wandb_mode(cfg.tracking.wandb) != "disabled" and not _installed("wandb"):
        raise _missing("tracking.wandb.enabled", "wandb", "wandb")
    if cfg.tracking.tensorboard and not _installed("tensorboard"):
        raise _missing("tracking.tensorboard", "tensorboard", "tensorboard")


class Tracker:
    """Writes one JSON line per logged step or epoch, and feeds W&B / TensorBoard when enabled.

    A no-op on other ranks (enabled=False). Call start() once before logging (it picks the
    run id and opens the backends) and finish() once at the end.
    """

    def __init__(self, run_dir: Path, enabled: bool, cfg=None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.cfg = cfg
        self.run_id = ""
        self.backends: list[Any] = []

    def start(self, run_id: str, resume_step: int | None, system: dict[str, Any], display=None) -> str:
        """Open the backends. `run_id` is the checkpoint's ('' on a fresh start: a new one is made);
        `resume_step` the checkpoint's step (None on a fresh start). Returns the run id."""
        if not self.enabled:
            return run_id
        resumed = resume_step is not None
        self.run_id = run_id or (os.environ.get("WANDB_RUN_ID", "") if not resumed else "") or new_run_id()
        if not resumed:  # lines left by an attempt that died before its first checkpoint
            self.path.unlink(missing_ok=True)
        (self.run_dir / SUMMARY_FILE).unlink(missing_ok=True)
        info: dict[str, Any] = {"run_id": self.run_id, "resumed_from_step": resume_step,
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "system": system}
        cfg = self.cfg
        if cfg is not None:
            config = {**cfg.to_dict(), "system": system}
            if cfg.tracking.tensorboard:
                self.backends.append(_TensorBoard(self.run_dir / TENSORBOARD_DIR, resume_step, config))
                info["tensorboard"] = str(self.run_dir / TENSORBOARD_DIR)
            if wandb_mode(cfg.tracking.wandb) != "disabled":
                wb = _Wandb(cfg, self.run_dir, self.run_id, resumed, config)
                self.backends.append(wb)
                self.run_id = wb.run.id  # the same, except under a sweep agent (its id)
                info["run_id"] = self.run_id
                info["wandb"] = {"mode": wb.mode, "dir": wb.run.dir, "project": wb.run.project,
                                 "url": wb.url}
                if display is not None:
                    display.print(wb.describe())
        atomic_write(self.run_dir / TRACKING_FILE, json.dumps(info, indent=1) + "\n")
        return self.run_id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for b in self.backends:
            b.log(metrics, step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """PNG files (confusion matrix, misclassified grid) as images; missing files are skipped."""
        if not self.enabled:
            return
        images = {k: Path(p) for k, p in images.items() if Path(p).is_file()}
        if images:
            for b in self.backends:
                b.log_images(images, step)

    def summary(self, values: dict[str, Any]) -> None:
        """The final summary: summary.json, and the W&B run summary."""
        if not self.enabled:
            return
        atomic_write(self.run_dir / SUMMARY_FILE, json.dumps({"run_id": self.run_id, **values}, indent=1) + "\n")
        for b in self.backends:
            b.summary(values)

    def log_model(self, path: Path, metadata: dict[str, Any]) -> None:
        """Upload a checkpoint as a W&B model artifact, when tracking.wandb.log_model is on."""
        if not self.enabled or self.cfg is None or not self.cfg.tracking.wandb.log_model or not Path(path).is_file():
            return
        for b in self.backends:
            b.log_model(Path(path), metadata)

    def finish(self, status: str = "completed") -> None:
        """status: completed, preempted (W&B: mark_preempting, so the run shows as preempted), diverged or
        failed; also recorded in tracking.json (`hwr runs` reads it)."""
        backends, self.backends = self.backends, []
        for b in backends:
            b.finish(status)
        info_path = self.run_dir / TRACKING_FILE
        if self.enabled and info_path.is_file():
            try:
                info = json.loads(info_path.read_text())
                info.update(status=status, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                atomic_write(info_path, json.dumps(info, indent=1) + "\n")
            except (OSError, ValueError):  # the status is a convenience; the run's files are what count
                pass


class _Wandb:
    def __init__(self, cfg, run_dir: Path, run_id: str, resumed: bool, config: dict[str, Any]):
        try:
            import wandb
        except ImportError as e:
            raise _missing("tracking.wandb.enabled", "wandb", "wandb", str(e)) from None
        self.wandb = wandb
        w = cfg.tracking.wandb
        self.mode = wandb_mode(w)
        self.log_every = w.log_every
        self.last_train_step: int | None = None
        known = getattr(wandb.Settings, "model_fields", {})
        settings = wandb.Settings(**{k: v for k, v in OFFLINE_SETTINGS.items() if k in known}
                                  if self.mode == "offline" else {})
        # Only what the config sets is passed: the rest is W&B's (its environment variables, then its
        # defaults). The run is named after the run directory unless WANDB_NAME says otherwise.
        kwargs: dict[str, Any] = dict(
            config=config, name=os.environ.get("WANDB_NAME") or cfg.train.name, mode=self.mode, settings=settings,
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
            **{f: getattr(w, f) for f in ("group", "job_type", "tags", "notes") if getattr(w, f) is not None})
        if not in_sweep():  # under an agent, wandb takes project, entity and id from the sweep
            kwargs.update(id=run_id, **{f: getattr(w, f) for f in ("project", "entity") if getattr(w, f) is not None})
        if resumed:
            kwargs["resume"] = "allow"
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:  # login, network, permissions: one line, with the way out
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise HwrError(f"W&B could not start the run ({first}); run `wandb login`, or log offline with "
                           "WANDB_MODE=offline and upload later with `wandb sync`") from None

    @property
    def url(self) -> str:
        return (self.run.url or "") if self.mode == "online" else ""

    def describe(self) -> str:
        if self.mode == "offline":
            return (f"W&B run {self.run.id} (offline) in {Path(self.run.dir).parent}; "
                    f"upload it later with: wandb sync {Path(self.run.dir).parent}")
        return f"W&B run {self.run.id}: {self.url}"

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.log_every and "loss" in metrics:  # a training row: at most one per log_every steps
            if self.last_train_step is not None and step - self.last_train_step < self.log_every:
                return
            self.last_train_step = step
        self.run.log(metrics, step=step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        self.run.log({k: self.wandb.Image(str(p)) for k, p in images.items()}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def log_model(self, path: Path, metadata: dict[str, Any]) -> None:
        art = self.wandb.Artifact(f"model-{self.run.id}", type="model", metadata=metadata)
        art.add_file(str(path), name=path.name)
        self.run.log_artifact(art, aliases=["best", "latest"])

    def finish(self, status: str) -> None:
        if status == "preempted":
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status == "completed" else 1)


class _TensorBoard:
    def __init__(self, log_dir: Path, resume_step: int | None, config: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _missing("tracking.tensorboard", "tensorboard", "tensorboard", str(e)) from None
        import yaml

        # purge_step: events at or after it, left by the job that died, are hidden on resume.
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "".join("    " + line + "\n" for line in text.splitlines()),
                             resume_step or 0)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()  # on disk before the checkpoint that follows a log point: a kill loses nothing

    def log_images(self, images: dict[str, Path], step: int) -> None:
        import matplotlib.image

        for k, p in images.items():
            self.writer.add_image(k, matplotlib.image.imread(str(p))[..., :3], step, dataformats="HWC")

    def summary(self, values: dict[str, Any]) -> None:
        rows = "".join(f"| {k} | {v} |\n" for k, v in values.items())
        self.writer.add_text("summary", "| key | value |\n|---|---|\n" + rows)

    def log_model(self, path: Path, metadata: dict[str, Any]) -> None:
        pass

    def finish(self, status: str) -> None:
        self.writer.close()
