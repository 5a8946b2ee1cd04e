"""Everything the loop needs, built in order: accelerator, checks, data, model, optimizer, resume.

Nothing is written to the run directory until every check has passed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from hwr_dist import checkpoint
from hwr_dist.allocator import keep_freed_memory
from hwr_dist.checkpoint import TrainState
from hwr_dist.config import Config, check, one_of, to_yaml
from hwr_dist.data import load_dataset, training_splits
from hwr_dist.data.loader import Data, DeviceData, ShardedBatches, pixel_stats
from hwr_dist.display import Display
from hwr_dist.errors import HwrError
from hwr_dist.files import RunLock, atomic_write, remove_stale_temporaries
from hwr_dist.tasks import Task, task_for, task_name
from hwr_dist.models import FineTunable, build_model, load_model_state, preflight
from hwr_dist.tracking import Tracker, apply_sweep_name, check_available, truncate_metrics
from hwr_dist.train.distributed import make_accelerator
from hwr_dist.train.feature_cache import FeatureCache, build_feature_cache
from hwr_dist.train.optim import EMA, build_optimizer
from hwr_dist.train.preempt import PREEMPTED_FILE, StopFlag


@dataclass
class Hooks:
    """Points where tools and benchmarks attach to the loop, instead of replacing its functions."""

    epoch_end: list[Callable[["Run", int], None]] = field(default_factory=list)
    """After an epoch's validation and checkpoint: (run, epoch)."""
    checkpoint_saved: list[Callable[["Run", float], None]] = field(default_factory=list)
    """After the main process wrote a checkpoint: (run, seconds the save took)."""


@dataclass
class Run:
    cfg: Config
    acc: "accelerate.Accelerator"  # noqa: F821
    run_dir: Path
    task: Task
    data: Data
    batches: ShardedBatches
    model: torch.nn.Module  # as trained: wrapped by DDP (several processes) and torch.compile (model.compile)
    bare: torch.nn.Module  # the same module unwrapped: checkpoints and the EMA use its parameter names
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    gen: torch.Generator  # augmentation randomness, one stream per rank
    state: TrainState
    tracker: Tracker
    display: Display
    stop: StopFlag
    lock: RunLock
    features: FeatureCache | None = None  # the train split as cached backbone features
    hooks: Hooks = field(default_factory=Hooks)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.batches) // self.cfg.train.grad_accum_steps)

    @property
    def total_steps(self) -> int:
        full = self.steps_per_epoch * self.cfg.train.epochs
        return min(full, self.cfg.train.max_steps) if self.cfg.train.max_steps else full


def load_data(cfg: Config, device, seed: int, world: int = 1) -> Data:
    if task_name(cfg.data.name) == "sequence":
        from hwr_dist.tasks.sequence import load_data as load_sequences

        return load_sequences(cfg, device, seed, world)
    name = cfg.data.name
    bundle = load_dataset(name, cfg.data.root, cfg.data.download)
    train, val = training_splits(bundle, cfg.data, seed)
    present = int((bundle.train.labels.bincount(minlength=len(bundle.classes)) > 0).sum())
    if present < 2:
        raise HwrError(f"data set {name} has training images of {present} class(es); a classifier needs at "
                       "least two (an image folder needs one sub-folder per class)")
    if cfg.data.val_fraction > 0 and len(val) == 0:
        raise HwrError(f"data set {name} has too few training images ({len(bundle.train)}) for a validation split "
                       f"of {cfg.data.val_fraction}; add images, raise data.val_fraction, or set it to 0")
    if len(bundle.test) == 0:
        raise HwrError(f"data set {name} has no test images; add a test/ part (or more images per class)")
    if cfg.data.batch_size * world > len(train):
        raise HwrError(f"data.batch_size={cfg.data.batch_size} per process x {world} process(es) is more than the "
                       f"{len(train)} training images; use data.batch_size={max(1, len(train) // world)} or less")
    mean, std = pixel_stats(train.images)
    return Data(bundle.classes, *(DeviceData.from_split(s, device, mean, std) for s in (train, val, bundle.test)))


def build_model_and_optimizer(cfg: Config, acc, data: Data, pretrained: bool):
    """The model as trained, the bare module inside it, the optimizer and the EMA."""
    model = build_model(cfg.model, len(data.classes), pretrained=pretrained).to(acc.device)
    if isinstance(model, FineTunable):  # models that fold the input normalisation into their weights
        model.set_input_norm(data.train.mean, data.train.std)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bare = model
    optimizer = build_optimizer(model, cfg.optim)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    if cfg.model.compile:
        model = torch.compile(model)
    # Built on its device already: Accelerate's placement would first look for sharded (DTensor)
    # parameters, an import of torch.distributed.tensor and sympy that costs a second.
    model, optimizer = acc.prepare(model, optimizer, device_placement=[False, False])
    return model, bare, optimizer, ema


def setup(cfg: Config, quiet: bool = False) -> Run:
    check_available(cfg)  # W&B / TensorBoard asked for but not installed: fail before any work
    apply_sweep_name(cfg)
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    stop = StopFlag(run_dir)  # first: a TERM/USR1 during the set-up below must not kill the process
    acc = make_accelerator(cfg)
    stop.connect(acc.num_processes)
    lock = take_lock(acc, run_dir)
    keep_freed_memory()
    try:
        return build_run(cfg, quiet, acc, run_dir, stop, lock)
    except BaseException:
        lock.release()
        raise


def take_lock(acc, run_dir: Path) -> RunLock:
    """The main process locks the run directory; every rank learns whether it may go on."""
    lock = RunLock(run_dir)
    holder = ""
    if acc.is_main_process:
        try:
            holder = lock.acquire()
        except OSError as e:
            holder = f"!cannot create {lock.path} ({e.strerror}); set train.out_dir to a writable folder"
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        holder = broadcast_object_list([holder])[0]
    if holder.startswith("!"):
        raise HwrError(holder[1:])
    if holder:
        raise HwrError(f"{run_dir} is in use by another trainer ({holder}); wait for it to end or stop it, "
                       "or train into another directory with train.name=NEW_NAME")
    return lock


def check_config(cfg: Config) -> None:
    """The train and checkpoint sections."""
    t = cfg.train
    check(t.epochs > 0, "train.epochs", "a positive integer", t.epochs)
    # Seeds are combined with ranks and epochs into torch generator seeds, which must stay below 2**63.
    check(0 <= t.seed < 2**32, "train.seed", "an integer in 0..4294967295", t.seed)
    check(t.grad_accum_steps is None or t.grad_accum_steps > 0, "train.grad_accum_steps", "a positive integer or null",
          t.grad_accum_steps)
    check(t.mixed_precision in (None, "no", "bf16", "fp16"), "train.mixed_precision", "no, bf16, fp16 or null",
          t.mixed_precision)
    check(0 <= t.ema_decay < 1, "train.ema_decay", "a number in [0, 1)", t.ema_decay)
    check(t.early_stopping_patience >= 0, "train.early_stopping_patience", "an integer >= 0", t.early_stopping_patience)
    check(t.log_every > 0, "train.log_every", "a positive integer", t.log_every)
    check(t.max_steps >= 0, "train.max_steps", "an integer >= 0", t.max_steps)
    one_of("train.device", t.device, {"auto", "cpu", "cuda"})
    one_of("train.resume_changes", t.resume_changes, {"refuse", "accept"})
    check("/" not in t.name and t.name not in (".", ".."), "train.name", "a plain name without '/'", t.name)
    check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "an integer >= 0", cfg.checkpoint.every_steps)
    check(cfg.checkpoint.keep_last >= 0, "checkpoint.keep_last", "an integer >= 0", cfg.checkpoint.keep_last)
    if t.early_stopping_patience and cfg.data.val_fraction == 0:
        raise HwrError("train.early_stopping_patience needs a validation split; set data.val_fraction > 0")


# Settings that decide the data order or the learning-rate schedule: a resume that changes them
# mixes two runs, so it must be asked for (train.resume_changes=accept).
RESUME_SENSITIVE = ("data.name", "data.batch_size", "data.val_fraction", "data.limit_per_class", "data.strings",
                    "train.seed", "train.epochs", "train.max_steps", "train.grad_accum_steps", "optim.lr",
                    "schedule.name", "schedule.warmup_fraction", "schedule.min_lr_ratio", "schedule.step_epochs",
                    "schedule.gamma")


def resume_changes(cfg: Config, saved: dict, source: Path) -> str:
    """'' when the run goes on as it was set up; else refuse, or describe the accepted changes."""
    now = cfg.to_dict()

    def get(d, key):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    changed = [f"{k} {get(saved, k)!r} -> {get(now, k)!r}" for k in RESUME_SENSITIVE if get(saved, k) != get(now, k)]
    if not changed:
        return ""
    if cfg.train.resume_changes != "accept":
        raise HwrError(f"resuming from {source} with other settings than it was trained with: {'; '.join(changed)}; "
                       "resume with the same values, or add train.resume_changes=accept to continue with the new ones")
    return "[yellow]resuming with changed settings (the schedule follows the new values from here): " + \
        "; ".join(changed)


def build_run(cfg: Config, quiet: bool, acc, run_dir: Path, stop: StopFlag, lock: RunLock) -> Run:
    ckpt, source = checkpoint.find_resume(cfg.train.resume, run_dir)
    changes = resume_changes(cfg, ckpt["config"], source) if ckpt is not None else ""
    if ckpt is None:  # missing pretrained weights: say so before loading data
        preflight(cfg.model)
    seed, rank = cfg.train.seed, acc.process_index
    torch.manual_seed(seed + rank)  # dropout differs per rank, like data
    data = load_data(cfg, acc.device, seed, acc.num_processes)
    model, bare, optimizer, ema = build_model_and_optimizer(cfg, acc, data, pretrained=ckpt is None)
    gen = torch.Generator(device=acc.device).manual_seed(seed * 7919 + rank)
    batches = ShardedBatches(len(data.train), cfg.data.batch_size, seed, rank, acc.num_processes, acc.device)
    run = Run(cfg, acc, run_dir, task_for(cfg), data, batches, model, bare, optimizer, ema, gen, TrainState(),
              Tracker(run_dir, acc.is_main_process, cfg), Display(acc.is_main_process, quiet), stop, lock)
    warning = restore(run, ckpt, source) if ckpt is not None else ""
    if acc.is_main_process:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir / "checkpoints")
        remove_stale_temporaries(run_dir)
        (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)
        atomic_write(run_dir / "config.yaml", to_yaml(cfg))
        if ckpt is not None:
            truncate_metrics(run_dir, run.state.step)
    if ckpt is not None:
        run.display.print(warning or f"resumed from {source} at step {run.state.step} "
                                     f"(epoch {run.state.epoch + 1}, batch {run.state.batch})")
        if changes:
            run.display.print(changes)
    elif isinstance(run.bare, FineTunable) and run.bare.weights_note:
        run.display.print(run.bare.weights_note)
    if isinstance(run.bare, FineTunable):  # frozen backbone, fixed inputs: train the head on cached features
        run.features = build_feature_cache(run)
    # One tracked run per job (main process); its id goes into every checkpoint, so a resumed
    # job continues the same W&B run from the checkpoint's step.
    run.state.tracker_run_id = run.tracker.start(run.state.tracker_run_id, run.state.step if ckpt is not None else None,
                                                 system_facts(run), run.display)
    return run


def restore(run: Run, ckpt: dict, source) -> str:
    """Put model, optimizer, EMA, counters and this rank's RNG back as they were saved."""
    state = checkpoint.train_state(ckpt, source)
    load_model_state(run.bare, ckpt["model"], str(source))
    saved_optim = ckpt["config"].get("optim", {}).get("name")
    if saved_optim != run.cfg.optim.name:
        raise HwrError(f"{source} was trained with optim.name={saved_optim}; resume with the same optimizer "
                       "or start a new run from its weights")
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise HwrError(f"the optimizer state in {source} does not fit this run ({e}); "
                       "resume with the config it was trained with") from None
    scaler = getattr(run.acc, "scaler", None)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if run.ema is not None and ckpt.get("ema"):
        run.ema.load_state_dict(ckpt["ema"])
    run.state = state
    rank, world = run.acc.process_index, run.acc.num_processes
    if ckpt["world_size"] == world:
        rng = ckpt["rng"][rank]
        torch.set_rng_state(rng["torch"])
        run.gen.set_state(rng["augment"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return ""
    if run.state.batch:  # shards differ with the world size: go on from the next epoch
        run.state.epoch, run.state.batch = run.state.epoch + 1, 0
    return (f"[yellow]checkpoint was written by {ckpt['world_size']} processes, this run has {world}: "
            "random augmentation streams start afresh")


def system_facts(run: Run) -> dict:
    """How the job ran, for the tracker's config (W&B `system.*`) and tracking.json."""
    import platform

    acc, cfg = run.acc, run.cfg
    world = acc.num_processes
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = acc.device
    return {
        "world_size": world, "nodes": max(1, world // max(1, per_node)), "processes_per_node": per_node,
        "distributed_type": acc.distributed_type.value, "backend": str(acc.state.backend or ""),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "mixed_precision": cfg.train.mixed_precision, "grad_accum_steps": cfg.train.grad_accum_steps,
        "batch_per_process": cfg.data.batch_size,
        "global_batch": cfg.data.batch_size * world * cfg.train.grad_accum_steps,
        "steps_per_epoch": run.steps_per_epoch, "total_steps": run.total_steps,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "train_images": len(run.data.train), "val_images": len(run.data.val), "test_images": len(run.data.test),
        "torch": str(torch.__version__), "hostname": platform.node(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
    }


def describe(run: Run) -> None:
    acc, cfg = run.acc, run.cfg
    per, world, accum = cfg.data.batch_size, acc.num_processes, cfg.train.grad_accum_steps
    how = f"DDP over {acc.state.backend}" if world > 1 else "one process, not distributed"
    run.display.print(
        f"[bold]{cfg.train.name}[/]: {cfg.model.name} on {cfg.data.name} ({len(run.data.train)} train, "
        f"{len(run.data.val)} val, {len(run.data.test)} test) | device {acc.device}, {world} process(es), {how} | "
        f"precision {cfg.train.mixed_precision} | batch {per} per process x {world} processes x {accum} "
        f"accumulation = {per * world * accum} global | {run.total_steps} optimizer steps")
