"""The training loop. Read `train()` first: it is the whole loop, and everything else is a small helper.

The run it drives is built by `setup.py`; `run.py` wraps it with the final test and the CLI entry.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from hwr_dist import checkpoint
from hwr_dist.errors import HwrError, TrainingDiverged
from hwr_dist.models import FineTunable
from hwr_dist.train.distributed import rewrap_ddp
from hwr_dist.train.optim import get_lr, set_lr
from hwr_dist.train.preempt import write_preempted
from hwr_dist.train.setup import Run


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
                check_and_log(run, meter, lr, grad_norm)
            if save_due:
                save_checkpoint(run, step_file=True)
            # A stop request on the last step is ignored: the run finishes (epoch end, test) instead.
            if run.stop.agreed() and not last_step:
                if not save_due:
                    save_checkpoint(run)
                return preempted(run)
            run.display.step(state.step, epoch)
            if last_step:
                break
        if state.batch >= len(run.batches):  # epoch finished (not cut short by max_steps)
            state.epoch, state.batch = epoch + 1, 0
        improved = end_of_epoch(run, epoch)
        save_checkpoint(run, best=improved, epoch_file=epoch + 1 if cfg.checkpoint.keep_epochs else 0)
        for hook in run.hooks.epoch_end:
            hook(run, epoch)
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
                # Divide by the window's real length: a short last window is scaled right.
                loss = run.task.loss(model, x, y, cached) / len(window)
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
        run.ema.update(run.bare)
    return total, grad_norm


def start_epoch(run: Run, epoch: int) -> None:
    """The data's epoch (composed data draws afresh) and the model's epoch hook (gradual unfreezing).
    When the hook changes which parameters train, DDP is built anew (it registers the trainable
    parameters at construction) and cached features go."""
    run.data.train.set_epoch(epoch)
    model = run.bare
    if not isinstance(model, FineTunable) or not model.on_epoch_start(epoch):
        return
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


def check_and_log(run: Run, meter: Meter, lr: float, grad_norm: float | None) -> None:
    """The periodic sync point: agree on the loss (and so on NaN) across ranks; log."""
    acc, state = run.acc, run.state
    packed = torch.stack([meter.loss, torch.tensor(float(meter.steps), dtype=torch.float64, device=meter.device)])
    if acc.num_processes > 1:
        packed = acc.reduce(packed, "sum")
    loss_sum, steps = packed.tolist()
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


def eval_model(run: Run) -> torch.nn.Module:
    """The weights to evaluate: the EMA copy when enabled, else the model itself (unwrapped)."""
    model = run.bare
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
    if run.acc.num_processes > 1:  # batch-norm statistics are each rank's own: validate rank 0's, as saved
        for buffer in run.bare.buffers():
            torch.distributed.broadcast(buffer, 0)
    result = run.task.evaluate(eval_model(run), run.data.val, run.data.classes, run.cfg.data.eval_batch_size, run.acc)
    improved = result.accuracy >= state.best_accuracy  # a tie keeps the later, longer-trained epoch
    if improved:
        state.best_accuracy, state.best_epoch, state.bad_epochs = result.accuracy, epoch, 0
    else:
        state.bad_epochs += 1
    run.tracker.log({"epoch": epoch + 1, **result.metrics("val")}, state.step)
    run.display.print(f"epoch {epoch + 1}: val {result.headline()} loss {result.loss:.4f}"
                      f"{' (best)' if improved else ''}")
    return improved


def rng_state(run: Run) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "augment": run.gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(run: Run, best: bool = False, step_file: bool = False, epoch_file: int = 0) -> None:
    """Every rank contributes its RNG state; the main process writes last.pt (and best/step/epoch-N)."""
    started = time.perf_counter()
    rng = [rng_state(run)]
    if run.acc.num_processes > 1:
        from accelerate.utils import gather_object

        rng = gather_object(rng)
    if not run.acc.is_main_process:
        return
    scaler = getattr(run.acc, "scaler", None)
    ckpt = checkpoint.pack(
        model=run.bare.state_dict(), optimizer=run.optimizer.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        ema=run.ema.state_dict() if run.ema is not None else None, state=run.state, rng=rng,
        world_size=run.acc.num_processes, config=run.cfg.to_dict(), classes=run.data.classes,
        norm=(run.data.train.mean, run.data.train.std))
    try:
        checkpoint.write(ckpt, run.ckpt_dir, best=best, step_file=step_file, epoch_file=epoch_file,
                         keep_last=run.cfg.checkpoint.keep_last)
    except OSError as e:  # a full disk or a lost mount: the previous checkpoints are intact
        raise HwrError(f"cannot write a checkpoint to {run.ckpt_dir} ({e.strerror or e}); the last saved one is "
                       "kept: free space or fix the folder, then resume with train.resume=auto") from None
    for hook in run.hooks.checkpoint_saved:
        hook(run, time.perf_counter() - started)


def preempted(run: Run) -> str:
    if run.acc.is_main_process:
        write_preempted(run.run_dir, run.state.step, run.stop.reason())
    run.display.final(f"stopped at step {run.state.step} ({run.stop.reason()}); checkpoint saved in "
                      f"{run.ckpt_dir}; continue with: hwr train CONFIG train.name={run.cfg.train.name} "
                      "train.resume=auto")
    return "preempted"
