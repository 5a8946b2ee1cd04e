"""A whole training job: set up, train, test the best weights, close the tracker.

`python -m hwr_dist.train CONFIG [key=value ...]` and `hwr train` run `main`/`run_training`;
launchers start the same module on every process.
"""

from __future__ import annotations

import gc
import sys
import time

from hwr_dist import checkpoint
from hwr_dist.config import Config
from hwr_dist.errors import HwrError, TrainingDiverged, exit_on_error
from hwr_dist.train.loop import eval_model, train
from hwr_dist.train.setup import Hooks, Run, describe, setup

USAGE = "usage: python -m hwr_dist.train CONFIG.yaml [section.key=value ...] [--quiet]"


def finish(run: Run, outcome: str, started: float) -> dict:
    """Final test evaluation (best weights by validation) with report files, on every rank."""
    model = eval_model(run)
    best = run.ckpt_dir / "best.pt"
    if run.acc.num_processes > 1:
        run.acc.wait_for_everyone()  # the main process has written best.pt: every rank tests the same weights
    if best.exists():  # the test split scores the weights picked by validation
        model.load_state_dict(checkpoint.eval_weights(checkpoint.load_checkpoint(best)))
    result = run.task.evaluate(model, run.data.test, run.data.classes, run.cfg.data.eval_batch_size, run.acc,
                               worst_k=32)
    wall = time.perf_counter() - started
    summary = {"outcome": outcome, **result.metrics("test"),
               "best_val_accuracy": run.state.best_accuracy, "best_epoch": run.state.best_epoch + 1,
               "steps": run.state.step, "wall_time_s": wall}
    if run.acc.is_main_process:
        run.tracker.log({k: v for k, v in summary.items() if k != "outcome"}, run.state.step)
        run.task.write_report(result, run.data.test, run.data.classes, run.run_dir, "test", run.display)
        report_dir = run.run_dir / "eval_test"
        images = {"test/confusion_matrix": report_dir / "confusion.png", "test/misclassified": report_dir / "worst.png"}
        run.tracker.log_images({k: p for k, p in images.items() if p.exists()}, run.state.step)
        run.tracker.summary(summary)
        run.tracker.log_model(best, {k: v for k, v in summary.items() if k != "wall_time_s"})
        run.display.final(f"{run.cfg.train.name}: {outcome}, test {result.headline()}, "
                          f"{run.state.step} steps, {wall:.1f} s, {run.run_dir}")
        run.display.table("summary", [
            ("outcome", outcome), ("test", result.headline()),
            ("best val accuracy", f"{run.state.best_accuracy:.2%} (epoch {run.state.best_epoch + 1})"),
            ("optimizer steps", str(run.state.step)), ("wall time", f"{wall:.1f} s"),
            ("run directory", str(run.run_dir))])
    return summary


def run_training(cfg: Config, quiet: bool = False, hooks: Hooks | None = None) -> dict:
    """The whole job; returns its summary. Every rank ends here together: the last stop vote is
    collected and the process group is torn down in order, so no rank exits with a collective,
    a thread or the tracker's service still running."""
    started = time.perf_counter()
    run = setup(cfg, quiet)
    # Everything built so far (torch's modules, the data) lives until the process ends: keep it out of
    # every later garbage collection, the one at exit included (0.2 s each; a second with model.compile).
    # Not with several processes: there the DDP reducer holds the process group, whose threads must be
    # joined by that last collection, or the process aborts at exit.
    if run.acc.num_processes == 1:
        gc.freeze()
    if hooks is not None:
        run.hooks = hooks
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
            return {"outcome": outcome, "steps": run.state.step, "interrupted": run.stop.interrupted}
        summary = finish(run, outcome, started)
        status = "completed"
        return summary
    except TrainingDiverged:
        status = "diverged"
        raise
    finally:
        close(run, status)


def close(run: Run, status: str) -> None:
    """The tracker first (the final metrics go to it), the last stop vote, the process group, the lock."""
    run.tracker.finish(status)
    run.stop.close()
    end_process_group(run.acc, orderly=status != "failed")
    run.lock.release()


def end_process_group(acc, orderly: bool) -> None:
    import torch.distributed as dist

    if acc.num_processes > 1 and dist.is_initialized():
        if orderly:
            acc.wait_for_everyone()
        dist.destroy_process_group()


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    from hwr_dist.recipes import load

    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(f"{USAGE}\n\nTrain in this process; launchers start it on every process. "
              "See `hwr train --help` and `hwr config show --doc` for the keys.")
        return
    quiet = "--quiet" in args
    args = [a for a in args if a != "--quiet"]
    if not args or args[0].startswith("-") or "=" in args[0]:
        raise HwrError(USAGE)
    summary = run_training(load(args[0], args[1:]), quiet)
    if summary.get("interrupted"):
        sys.exit(130)  # Ctrl-C: the checkpoint is saved, the exit status still says "interrupted"
