"""The `hwr` command. Heavy imports (torch, accelerate) happen inside commands: `hwr --help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from hwr_dist.errors import HwrError, exit_on_error

app = typer.Typer(help="Train, evaluate and use handwriting recognition models, on one process or many.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Show resolved configurations.", no_args_is_help=True)
data_app = typer.Typer(help="List and check data sets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
slurm_app = typer.Typer(help="Submit and watch training jobs on a SLURM cluster (slurm/train.sh).", no_args_is_help=True)
app.add_typer(slurm_app, name="slurm")

CONFIG = typer.Argument(..., help="YAML config, e.g. configs/default.yaml")
OVERRIDES = typer.Argument(None, help="Overrides as section.key=value, e.g. optim.lr=0.01 train.epochs=3")


@app.command(context_settings={"allow_interspersed_args": True})
@exit_on_error
def train(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES,
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a progress bar.")):
    """Train a model in this process (see `hwr launch` for several processes)."""
    from hwr_dist.config import load_config
    from hwr_dist.train import run_training

    run_training(load_config(config, overrides or []), quiet)


@app.command(context_settings={"allow_interspersed_args": True})
@exit_on_error
def launch(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES,
           nproc: Optional[int] = typer.Option(None, help="processes per node (default: GPUs, or 2 on CPU)"),
           nnodes: int = typer.Option(1, help="nodes taking part"),
           node_rank: int = typer.Option(0, help="this node's rank, 0 on the main node"),
           master_addr: str = typer.Option("127.0.0.1", help="main node's address (several nodes)"),
           master_port: int = typer.Option(29500, help="main node's port (several nodes)"),
           launcher: str = typer.Option("accelerate", help="accelerate or torchrun"),
           dry_run: bool = typer.Option(False, "--dry-run", help="print the command, run nothing")):
    """Train on several processes: builds, prints and runs the launcher command for this machine."""
    from hwr_dist.launch import launch as run_launch

    raise typer.Exit(code=run_launch(str(config), overrides or [], nproc, nnodes, node_rank, master_addr,
                                     master_port, launcher, dry_run))


@app.command("finetune-report", context_settings={"allow_interspersed_args": True})
@exit_on_error
def finetune_report(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES,
                    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
                    out: Optional[Path] = typer.Option(None, help="JSON file (default: out_dir/NAME-finetune-report.json)")):
    """VGG fine-tuning policies on one split: new head on frozen features vs full fine-tuning vs from scratch."""
    from hwr_dist.config import load_config
    from hwr_dist.finetune_report import finetune_report as run_report

    run_report(load_config(config, overrides or []), json_out, out)


@config_app.command("show")
@exit_on_error
def config_show(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES):
    """Print the resolved config: defaults, then the file, then the overrides."""
    from hwr_dist.config import load_config, to_yaml

    typer.echo(to_yaml(load_config(config, overrides or [])), nl=False)


@config_app.command("run-dir")
@exit_on_error
def config_run_dir(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES):
    """Print the run directory (train.out_dir/train.name, absolute) the config resolves to."""
    from hwr_dist.config import load_config

    cfg = load_config(config, overrides or [])
    typer.echo(str((Path(cfg.train.out_dir) / cfg.train.name).absolute()))


@data_app.command("list")
@exit_on_error
def data_list(root: Path = typer.Option(Path("data"), help="data.root to look in")):
    """Data sets the tool knows, their sizes, and whether their files are here."""
    from rich.console import Console
    from rich.table import Table

    from hwr_dist.data import DATASETS

    table = Table(title=f"data sets (root: {root})", title_justify="left")
    for col in ("name", "what", "here"):
        table.add_column(col)
    for name, src in DATASETS.items():
        files = src.files(root)
        here = "built in" if name == "mnist-sample" else (
            "yes" if files and all(p.exists() for p in files) else ("-" if not files else "no"))
        table.add_row(name, src.describe, here)
    Console().print(table)


@data_app.command("verify")
@exit_on_error
def data_verify(name: str = typer.Argument(..., help="data set name, see `hwr data list`"),
                root: Path = typer.Option(Path("data"), help="data.root to look in")):
    """Read every file of a data set and check its format, counts and labels."""
    from hwr_dist.data import load_dataset

    b = load_dataset(name, root)
    for split_name, split in (("train", b.train), ("test", b.test)):
        counts = split.labels.bincount(minlength=len(b.classes)).tolist()
        typer.echo(f"{name} {split_name}: {len(split)} images {tuple(split.images.shape[1:])}, "
                   f"{len(b.classes)} classes, per class min {min(counts)} max {max(counts)}")
    typer.echo(f"{name}: ok")


@app.command()
@exit_on_error
def evaluate(checkpoint: Path = typer.Argument(..., help="a .pt file or a run directory"),
             split: str = typer.Option("test", help="test or val"),
             out: Optional[Path] = typer.Option(None, help="where to write the report (default: the run directory)"),
             data_root: Optional[str] = typer.Option(None, help="override data.root of the checkpoint's config")):
    """Accuracy, per-class precision/recall/F1, confusion matrix and plots for a checkpoint."""
    from hwr_dist.report import evaluate_checkpoint

    if split not in ("test", "val"):
        raise HwrError(f"--split must be test or val, got {split!r}")
    evaluate_checkpoint(checkpoint, split, out, data_root)


@app.command()
@exit_on_error
def predict(checkpoint: Path = typer.Argument(..., help="a .pt file or a run directory"),
            images: List[Path] = typer.Argument(..., help="image files or folders"),
            top_k: int = typer.Option(3, "--top-k", min=1, help="classes to show per image"),
            json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
            segment: bool = typer.Option(False, "--segment", help="read a row of characters in each image")):
    """Recognise real images (photos, scans, MNIST-style) with a trained model."""
    from hwr_dist.predict import predict_files

    failures = predict_files(checkpoint, images, top_k, json_out, segment)
    raise typer.Exit(code=1 if failures else 0)


@app.command()
@exit_on_error
def export(checkpoint: Path = typer.Argument(..., help="a .pt file or a run directory"),
           fmt: str = typer.Option("torchscript", "--format", "-f", help="torchscript, onnx or state-dict"),
           quantize: Optional[str] = typer.Option(None, "--quantize",
                                                  help="int8: dynamic int8 dense layers, and static int8 "
                                                       "convolutions for torchscript where they measure faster here"),
           out: Optional[Path] = typer.Option(None, "--out", "-o",
                                              help="file to write (default: RUN_DIR/export/<checkpoint>[-int8].<ext>)"),
           report: Optional[bool] = typer.Option(None, "--report/--no-report",
                                                 help="size, CPU latency and test accuracy, float vs exported "
                                                      "(default: on with --quantize)")):
    """Export a checkpoint (EMA weights when kept) with its preprocessing contract in the file's metadata."""
    from hwr_dist.export import export_checkpoint

    export_checkpoint(checkpoint, fmt, quantize, out, report)


@app.command()
@exit_on_error
def report(run_dir: Path = typer.Argument(..., help="a training run's directory, e.g. runs/default")):
    """Summary table of a run, and its loss, accuracy and learning-rate curves as RUN_DIR/report_curves.png."""
    from hwr_dist.run_report import report as run_report

    run_report(run_dir)


@slurm_app.command("submit", context_settings={"allow_interspersed_args": True})
@exit_on_error
def slurm_submit(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES,
                 nodes: Optional[int] = typer.Option(None, "--nodes", "-N", min=1, help="nodes (default 1)"),
                 gpus_per_node: Optional[int] = typer.Option(None, min=1, help="GPUs per node (default: none, CPU)"),
                 procs_per_node: Optional[int] = typer.Option(
                     None, min=1, help="training processes per node (default: one per GPU, or 1 on CPU)"),
                 cpus_per_task: Optional[int] = typer.Option(None, min=1, help="CPUs per node for the job (default 8)"),
                 time: Optional[str] = typer.Option(None, "--time", "-t", help="time limit, e.g. 04:00:00"),
                 partition: Optional[str] = typer.Option(None, "--partition", "-p", help="SLURM partition"),
                 job_name: Optional[str] = typer.Option(None, "--job-name", "-J", help="job name (default hwr)"),
                 output: Optional[str] = typer.Option(None, "--output", "-o", help="job log (default %x-%j.out)"),
                 run_name: Optional[str] = typer.Option(
                     None, help="train.name of the run (default JOBNAME-JOBID); an existing run is resumed"),
                 max_requeues: Optional[int] = typer.Option(None, min=0, help="requeues after preemption (default 3)"),
                 sbatch_opt: Optional[List[str]] = typer.Option(
                     None, "--sbatch-opt", help="extra sbatch option, repeatable, e.g. --sbatch-opt=--qos=low"),
                 script: Optional[Path] = typer.Option(None, help="job script (default: slurm/train.sh)"),
                 dry_run: bool = typer.Option(False, "--dry-run", help="print the sbatch command, submit nothing")):
    """Submit CONFIG with its overrides as a SLURM job (slurm/train.sh); prints the sbatch command and job id."""
    from hwr_dist.config import load_config
    from hwr_dist.slurm import build_command, submit

    load_config(config, overrides or [])  # a bad config fails here, not in the queue
    cmd = build_command(config, overrides or [], nodes=nodes, gpus_per_node=gpus_per_node,
                        procs_per_node=procs_per_node, cpus_per_task=cpus_per_task, time=time, partition=partition,
                        job_name=job_name, output=output, run_name=run_name, max_requeues=max_requeues,
                        sbatch_opts=sbatch_opt or [], script=script)
    job_id = submit(cmd, dry_run)
    if job_id is not None:
        typer.echo(f"submitted job {job_id}; watch it with: hwr slurm status {job_id}")


@slurm_app.command("status")
@exit_on_error
def slurm_status(job_id: Optional[str] = typer.Argument(None, help="a job id (default: all your jobs)")):
    """Your jobs in the queue, or one job's state, restart count and the end of its log."""
    from hwr_dist.slurm import status

    typer.echo(status(job_id))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
