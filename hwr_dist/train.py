"""The training loop. `python -m hwr_dist.train CONFIG [key=value ...]` and `hwr train` run this.

Launch it under `accelerate launch` or `torchrun` for several processes; the code is the
same. Read `train()` first: it is the whole loop, and everything else is a small helper.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hwr_dist.checkpoint import atomic_save, load_checkpoint, load_model_state, prune_step_checkpoints
from hwr_dist.config import Config, load_config, to_yaml
from hwr_dist.data import load_dataset, stratified_split
from hwr_dist.data.loader import DeviceData, ShardedBatches, pixel_stats
from hwr_dist.display import Display
from hwr_dist.errors import HwrError, TrainingDiverged, exit_on_error
from hwr_dist.evaluate import EvalResult, evaluate
from hwr_dist.models import build_model
from hwr_dist.optim import EMA, build_optimizer, get_lr, set_lr
from hwr_dist.preempt import PREEMPTED_FILE, StopFlag, write_preempted
from hwr_dist.tracking import Tracker, apply_sweep_name, check_available, truncate_metrics

CHECKPOINT_FORMAT = 1


@dataclass
class TrainState:
    """Where the run is; with the RNG states, enough to continue bit-exactly."""

    epoch: int = 0  # current epoch, 0-based
    batch: int = 0  # micro-batches of this rank's shard done in the current epoch
    step: int = 0  # optimizer steps done
    best_accuracy: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best, for early stopping
    tracker_run_id: str = ""


@dataclass
class Data:
    classes: list[str]
    train: DeviceData
    val: DeviceData
    test: DeviceData


@dataclass
class Run:
    cfg: Config
    acc: "accelerate.Accelerator"  # noqa: F821
    run_dir: Path
    data: Data
    batches: ShardedBatches
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    gen: torch.Generator  # augmentation randomness, one stream per rank
    state: TrainState
    tracker: Tracker
    display: Display
    stop: StopFlag
    features: "FeatureCache | None" = None  # noqa: F821  the train split as cached backbone features (finetune.py)

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


def train(run: Run) -> str:
    """Run the loop from `run.state` to the end; returns 'completed', 'early-stopped' or 'preempted'."""
    cfg, state = run.cfg, run.state
    accum = cfg.train.grad_accum_steps
    meter = Meter(run.acc.device)
    if state.step >= run.total_steps:
        return "completed"
    for epoch in range(state.epoch, cfg.train.epochs):
        state.epoch = epoch
        start_epoch(run, epoch)
        windows = list(run.batches.batches(epoch, state.batch))
        for w in range(0, len(windows), accum):
            window = windows[w : w + accum]
            lr = get_lr(state.step, run.total_steps, run.steps_per_epoch, cfg.optim.lr, cfg.schedule)
            set_lr(run.optimizer, lr)
            loss, grad_norm = train_step(run, window, want_norm=log_due(run, state.step + 1))
            state.step += 1
            state.batch += len(window)
            meter.add(loss, sum(len(i) for i in window))
            last_step = state.step >= run.total_steps
            save_due = cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0
            if log_due(run, state.step):
                # A stop request on the last step is ignored: the run finishes (epoch end, test) instead.
                stop = check_and_log(run, meter, lr, grad_norm) and not last_step
                if save_due or stop:
                    save_checkpoint(run, step_file=bool(save_due))
                if stop:
                    return preempted(run)
            run.display.step(state.step, epoch)
            if last_step:
                break
        if state.batch >= len(run.batches):  # epoch finished (not cut short by max_steps)
            state.epoch, state.batch = epoch + 1, 0
        improved = end_of_epoch(run, epoch)
        save_checkpoint(run, best=improved, epoch_file=epoch + 1 if cfg.checkpoint.keep_epochs else 0)
        if state.step >= run.total_steps:
            return "completed"
        if cfg.train.early_stopping_patience and state.bad_epochs >= cfg.train.early_stopping_patience:
            run.display.print(f"early stopping: no better validation accuracy for {state.bad_epochs} epochs")
            return "early-stopped"
    return "completed"


def log_due(run: Run, step: int) -> bool:
    """Whether optimizer step `step` (1-based) ends at a sync point: a log line, a step checkpoint or the end."""
    every = run.cfg.checkpoint.every_steps
    return step % run.cfg.train.log_every == 0 or bool(every and step % every == 0) or step >= run.total_steps


def train_step(run: Run, window: list[torch.Tensor], want_norm: bool) -> tuple[torch.Tensor, float | None]:
    """One optimizer step over a window of micro-batches; all-reduce only on the last one.

    Nothing here waits for the device: the loss stays a device tensor, and the gradient norm is
    read back (a host sync) only when `want_norm`, i.e. at a log point."""
    acc, model, cfg = run.acc, run.model, run.cfg
    total = torch.zeros((), device=acc.device)
    cached = run.features is not None  # then x holds backbone features and only the head runs
    for i, idx in enumerate(window):
        x, y = (run.features if cached else run.data.train).batch(idx, run.gen, cfg.data.augment)
        if cfg.model.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        sync = i == len(window) - 1
        with nullcontext() if sync else acc.no_sync(model):
            with acc.autocast():
                logits = model(x, from_features=True) if cached else model(x)
            # Divide by the window's real length: a short last window is scaled right.
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.optim.label_smoothing) / len(window)
            acc.backward(loss)
        total += loss.detach()
    grad_norm = None
    if cfg.optim.grad_clip > 0:
        norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        grad_norm = float(norm) if want_norm else None
    elif want_norm:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(unwrapped(run))
    return total, grad_norm


def start_epoch(run: Run, epoch: int) -> None:
    """The model's epoch hook (gradual unfreezing). When it changes which parameters train, DDP is
    built anew (it registers the trainable parameters at construction) and cached features go."""
    hook = getattr(unwrapped(run), "on_epoch_start", None)
    if hook is None or not hook(epoch):
        return
    from hwr_dist.finetune import rewrap_ddp

    run.model = rewrap_ddp(run.acc, run.model)
    run.features = None
    run.display.print(f"epoch {epoch + 1}: the whole network trains from now on")


class Meter:
    """Loss and throughput since the last log line, kept on the device (no per-step sync)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device, dtype=torch.float64)
        self.steps = 0
        self.images = 0
        self.since = time.perf_counter()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss += loss.double()
        self.steps += 1
        self.images += images


def check_and_log(run: Run, meter: Meter, lr: float, grad_norm: float | None) -> bool:
    """The periodic sync point: agree on loss, NaN and stop requests across ranks; log."""
    acc, state = run.acc, run.state
    packed = torch.stack([meter.loss, torch.tensor(float(meter.steps), dtype=torch.float64, device=meter.device),
                          torch.tensor(float(run.stop.local()), dtype=torch.float64, device=meter.device)])
    if acc.num_processes > 1:
        packed = acc.reduce(packed, "sum")
    loss_sum, steps, stop = packed.tolist()
    loss = loss_sum / max(1.0, steps)
    if not torch.isfinite(torch.tensor(loss)):
        last = run.ckpt_dir / "last.pt"
        kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written yet"
        raise TrainingDiverged(f"loss became {loss} by step {state.step}; {kept}; "
                               "lower optim.lr or set optim.grad_clip=1.0")
    elapsed = time.perf_counter() - meter.since
    metrics = {"epoch": state.epoch + 1, "loss": loss, "lr": lr,
               "images_per_s": meter.images * acc.num_processes / max(elapsed, 1e-9)}
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    run.tracker.log(metrics, state.step)
    run.display.step(state.step, state.epoch, metrics)
    meter.reset()
    return stop > 0


def unwrapped(run: Run) -> torch.nn.Module:
    """The bare model: without DDP and without torch.compile's wrapper, whose state_dict keys would
    carry an `_orig_mod.` prefix (checkpoints and the EMA use the bare names either way)."""
    model = run.acc.unwrap_model(run.model)
    return getattr(model, "_orig_mod", model)


def eval_model(run: Run) -> torch.nn.Module:
    """The weights to evaluate: the EMA copy when enabled, else the model itself (unwrapped)."""
    model = unwrapped(run)
    if run.ema is None:
        return model
    import copy

    shadow = copy.deepcopy(model)
    shadow.load_state_dict(run.ema.state_dict())
    return shadow


def end_of_epoch(run: Run, epoch: int) -> bool:
    """Validate; track the best validation accuracy. Returns whether this epoch is the best."""
    state = run.state
    if len(run.data.val) == 0:
        state.best_epoch = epoch
        run.tracker.log({"epoch": epoch + 1}, state.step)  # the epoch's end, in metrics.jsonl all the same
        return True
    result = evaluate(eval_model(run), run.data.val, len(run.data.classes), run.cfg.data.eval_batch_size, run.acc)
    improved = result.accuracy > state.best_accuracy
    if improved:
        state.best_accuracy, state.best_epoch, state.bad_epochs = result.accuracy, epoch, 0
    else:
        state.bad_epochs += 1
    run.tracker.log({"epoch": epoch + 1, "val_accuracy": result.accuracy, "val_loss": result.loss}, state.step)
    run.display.print(f"epoch {epoch + 1}: val accuracy {result.accuracy:.2%} loss {result.loss:.4f}"
                      f"{' (best)' if improved else ''}")
    return improved


def rng_state(run: Run) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "augment": run.gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(run: Run, best: bool = False, step_file: bool = False, epoch_file: int = 0) -> None:
    """Every rank contributes its RNG state; the main process writes last.pt (and best/step/epoch-N)."""
    rng = [rng_state(run)]
    if run.acc.num_processes > 1:
        from accelerate.utils import gather_object

        rng = gather_object(rng)
    if not run.acc.is_main_process:
        return
    scaler = getattr(run.acc, "scaler", None)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model": unwrapped(run).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "state": asdict(run.state),
        "rng": rng,
        "world_size": run.acc.num_processes,
        "config": run.cfg.to_dict(),
        "classes": run.data.classes,
        "norm": [run.data.train.mean, run.data.train.std],
    }
    last = run.ckpt_dir / "last.pt"
    atomic_save(ckpt, last)
    for name, wanted in (("best.pt", best), (f"step-{run.state.step:08d}.pt", step_file),
                         (f"epoch-{epoch_file:03d}.pt", epoch_file > 0)):
        if wanted:  # a hard link: the same bytes, no second write; replaced atomically
            tmp = run.ckpt_dir / f".{name}.link"
            tmp.unlink(missing_ok=True)
            os.link(last, tmp)
            os.replace(tmp, run.ckpt_dir / name)
    if step_file:
        prune_step_checkpoints(run.ckpt_dir, run.cfg.checkpoint.keep_last)


def restore(run: Run, ckpt: dict, source: Path) -> str:
    """Put model, optimizer, EMA, counters and this rank's RNG back as they were saved."""
    load_model_state(unwrapped(run), ckpt["model"], str(source))
    saved_optim = ckpt["config"]["optim"]["name"]
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
    run.state = TrainState(**ckpt["state"])
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


def preempted(run: Run) -> str:
    if run.acc.is_main_process:
        write_preempted(run.run_dir, run.state.step, run.stop.reason())
    run.display.print(f"stopped at step {run.state.step} ({run.stop.reason()}); checkpoint saved, "
                      "continue with train.resume=auto")
    return "preempted"


def check_elastic_store() -> None:
    # torch 2.14's elastic agents share one store across rendezvous rounds and the default
    # group's keys there do not name the round: a restarted group reads the dead group's
    # gloo addresses and fails ("connection refused") or hangs.
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 \
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise HwrError("restarts (--max_restarts) with torchrun's shared store hang when the group restarts; "
                       "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun with the c10d rendezvous, "
                       "as launch/torchrun.sh and launch/torchrun_multinode.sh do")


def make_accelerator(cfg: Config):
    from accelerate import Accelerator

    use_cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise HwrError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    if cfg.train.mixed_precision == "fp16" and use_cpu:
        raise HwrError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 on CPU")
    check_elastic_store()
    # cpu=True matters: without it a CPU multi-process launch silently runs without DDP.
    acc = Accelerator(cpu=use_cpu, mixed_precision=cfg.train.mixed_precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise HwrError(f"the launcher started {launched} processes but training sees {acc.num_processes}: "
                       "DDP is not set up; on CPU launch with --multi_gpu and ACCELERATE_USE_CPU=1, or use torchrun")
    return acc


def load_data(cfg: Config, device, seed: int) -> Data:
    bundle = load_dataset(cfg.data.name, cfg.data.root, cfg.data.download)
    train, val = stratified_split(bundle.train, cfg.data.val_fraction, seed)
    if len(train) == 0:
        raise HwrError(f"data set {cfg.data.name} has no training images left; lower data.val_fraction")
    mean, std = pixel_stats(train.images)
    return Data(bundle.classes, *(DeviceData.from_split(s, device, mean, std) for s in (train, val, bundle.test)))


def find_resume(cfg: Config, run_dir: Path) -> tuple[dict | None, Path | None]:
    last = run_dir / "checkpoints" / "last.pt"
    if cfg.train.resume == "":
        if last.exists():
            raise HwrError(f"{run_dir} already holds a run; continue it with train.resume=auto, "
                           "or start another with train.name=NEW_NAME")
        return None, None
    source = last if cfg.train.resume == "auto" else Path(cfg.train.resume)
    if cfg.train.resume == "auto" and not last.exists():
        return None, None
    return load_checkpoint(source), source


def setup(cfg: Config, quiet: bool = False) -> Run:
    check_available(cfg)  # W&B / TensorBoard asked for but not installed: fail before any work
    apply_sweep_name(cfg)
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    stop = StopFlag(run_dir)  # first: a TERM/USR1 during the set-up below must not kill the process
    acc = make_accelerator(cfg)
    ckpt, source = find_resume(cfg, run_dir)
    if cfg.model.name == "vgg" and ckpt is None:  # missing pretrained weights: say so before loading data
        from hwr_dist.models.vgg import check_weights

        check_weights(cfg.model)
    seed, rank = cfg.train.seed, acc.process_index
    torch.manual_seed(seed + rank)  # dropout differs per rank, like data
    data = load_data(cfg, acc.device, seed)
    model = build_model(cfg.model, len(data.classes), pretrained=ckpt is None).to(acc.device)
    if hasattr(model, "set_input_norm"):  # models that fold the input normalisation into their weights
        model.set_input_norm(data.train.mean, data.train.std)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    if cfg.model.compile:
        model = torch.compile(model)
    model, optimizer = acc.prepare(model, optimizer)
    gen = torch.Generator(device=acc.device).manual_seed(seed * 7919 + rank)
    batches = ShardedBatches(len(data.train), cfg.data.batch_size, seed, rank, acc.num_processes, acc.device)
    if acc.is_main_process:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    run = Run(cfg, acc, run_dir, data, batches, model, optimizer, ema, gen, TrainState(),
              Tracker(run_dir, acc.is_main_process, cfg), Display(acc.is_main_process, quiet), stop)
    if ckpt is not None:
        warning = restore(run, ckpt, source)
        if acc.is_main_process:
            truncate_metrics(run_dir, run.state.step)
        run.display.print(warning or f"resumed from {source} at step {run.state.step} "
                                     f"(epoch {run.state.epoch + 1}, batch {run.state.batch})")
    elif note := getattr(unwrapped(run), "weights_note", ""):
        run.display.print(note)
    if cfg.model.name == "vgg":  # frozen backbone, fixed inputs: train the head on cached features
        from hwr_dist.finetune import build_feature_cache

        run.features = build_feature_cache(run)
    # One tracked run per job (main process); its id goes into every checkpoint, so a resumed
    # job continues the same W&B run from the checkpoint's step.
    run.state.tracker_run_id = run.tracker.start(run.state.tracker_run_id, run.state.step if ckpt is not None else None,
                                                 system_facts(run), run.display)
    return run


def system_facts(run: Run) -> dict:
    """How the job ran, for the tracker's config (W&B `system.*`) and tracking.json."""
    import platform

    acc, cfg = run.acc, run.cfg
    world = acc.num_processes
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = acc.device
    return {
        "world_size": world, "nodes": max(1, world // max(1, per_node)), "processes_per_node": per_node,
        "distributed_type": acc.distributed_type.value, "device": str(device),
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
    per = cfg.data.batch_size
    run.display.print(
        f"[bold]{cfg.train.name}[/]: {cfg.model.name} on {cfg.data.name} ({len(run.data.train)} train, "
        f"{len(run.data.val)} val, {len(run.data.test)} test) | device {acc.device}, {acc.num_processes} "
        f"process(es), {acc.distributed_type.value} | batch {per} per process x {acc.num_processes} processes x "
        f"{cfg.train.grad_accum_steps} accumulation = {per * acc.num_processes * cfg.train.grad_accum_steps} global | "
        f"{run.total_steps} optimizer steps")


def finish(run: Run, outcome: str, started: float) -> dict:
    """Final test evaluation (best weights by validation) with report files, on every rank."""
    from hwr_dist.report import write_eval_report

    model = eval_model(run)
    best = run.ckpt_dir / "best.pt"
    if best.exists():  # the test split scores the weights picked by validation
        ckpt = load_checkpoint(best)
        model.load_state_dict(ckpt["ema"] or ckpt["model"])
    result: EvalResult = evaluate(model, run.data.test, len(run.data.classes), run.cfg.data.eval_batch_size,
                                  run.acc, worst_k=32)
    wall = time.perf_counter() - started
    summary = {"outcome": outcome, "test_accuracy": result.accuracy, "test_loss": result.loss,
               "best_val_accuracy": run.state.best_accuracy, "best_epoch": run.state.best_epoch + 1,
               "steps": run.state.step, "wall_time_s": wall}
    if run.acc.is_main_process:
        run.tracker.log({k: v for k, v in summary.items() if k != "outcome"}, run.state.step)
        write_eval_report(result, run.data.test, run.data.classes, run.run_dir, "test", run.display)
        report_dir = run.run_dir / "eval_test"
        run.tracker.log_images({"test/confusion_matrix": report_dir / "confusion.png",
                                "test/misclassified": report_dir / "worst.png"}, run.state.step)
        run.tracker.summary(summary)
        run.tracker.log_model(best, {k: v for k, v in summary.items() if k != "wall_time_s"})
        run.display.table("summary", [
            ("outcome", outcome), ("test accuracy", f"{result.accuracy:.2%}"),
            ("best val accuracy", f"{run.state.best_accuracy:.2%} (epoch {run.state.best_epoch + 1})"),
            ("optimizer steps", str(run.state.step)), ("wall time", f"{wall:.1f} s"),
            ("run directory", str(run.run_dir))])
    return summary


def run_training(cfg: Config, quiet: bool = False) -> dict:
    started = time.perf_counter()
    run = setup(cfg, quiet)
    status = "failed"
    try:  # the tracker is finished last: the final test metrics, plots and model go to it too
        describe(run)
        run.display.start(run.total_steps, run.state.step)
        try:
            outcome = train(run)
        finally:
            run.display.close()
        if outcome == "preempted":
            status = outcome
            return {"outcome": outcome, "steps": run.state.step}
        summary = finish(run, outcome, started)
        status = "completed"
        return summary
    finally:
        run.tracker.finish(status)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    quiet = "--quiet" in args
    args = [a for a in args if a != "--quiet"]
    if not args or args[0].startswith("-") or "=" in args[0]:
        raise HwrError("usage: python -m hwr_dist.train CONFIG.yaml [section.key=value ...] [--quiet]")
    run_training(load_config(args[0], args[1:]), quiet)


if __name__ == "__main__":
    main()
