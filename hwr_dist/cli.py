"""The `hwr` command. Heavy imports (torch, accelerate) happen inside commands: `hwr --help` stays fast."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from hwr_dist.errors import exit_on_error

app = typer.Typer(help="Train, evaluate and use handwriting recognition models, on one process or many.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


class Launcher(str, Enum):
    accelerate = "accelerate"
    torchrun = "torchrun"


class Split(str, Enum):
    test = "test"
    val = "val"


class Format(str, Enum):
    torchscript = "torchscript"
    onnx = "onnx"
    state_dict = "state-dict"


class Quantize(str, Enum):
    int8 = "int8"


def show_version(value: bool) -> None:
    if value:
        from hwr_dist import __version__

        print(f"hwr-dist {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                          help="Print the version and exit.")):
    """Train, evaluate and use handwriting recognition models, on one process or many."""
config_app = typer.Typer(help="Show resolved configurations.", no_args_is_help=True)
data_app = typer.Typer(help="List and check data sets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
slurm_app = typer.Typer(help="Submit and watch training jobs on a SLURM cluster (slurm/train.sh).", no_args_is_help=True)
app.add_typer(slurm_app, name="slurm")
recipes_app = typer.Typer(help="The recipes shipped with hwr-dist: list them, or copy one out to edit.",
                          invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")

CONFIG = typer.Argument(..., help="YAML config (e.g. configs/default.yaml) or a recipe name (e.g. fast_sample)")
OVERRIDES = typer.Argument(None, help="Overrides as section.key=value, e.g. optim.lr=0.01 train.epochs=3")


@app.command(context_settings={"allow_interspersed_args": True})
@exit_on_error
def train(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES,
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a progress bar.")):
    """Train a model in this process (see `hwr launch` for several processes)."""
    from hwr_dist.commands.train import train as run

    run(config, overrides or [], quiet)


@app.command(context_settings={"allow_interspersed_args": True})
@exit_on_error
def launch(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES,
           nproc: Optional[int] = typer.Option(None, min=1, help="processes per node (default: GPUs, or 2 on CPU)"),
           nnodes: int = typer.Option(1, min=1, help="nodes taking part"),
           node_rank: int = typer.Option(0, min=0, help="this node's rank, 0 on the main node"),
           master_addr: Optional[str] = typer.Option(None, help="main node's address (needed with --nnodes > 1)"),
           master_port: int = typer.Option(29500, help="main node's port (several nodes)"),
           launcher: Launcher = typer.Option(Launcher.accelerate, help="the launcher to run"),
           dry_run: bool = typer.Option(False, "--dry-run", help="print the command, run nothing")):
    """Train on several processes: builds, prints and runs the launcher command for this machine."""
    from hwr_dist.commands.launch import launch as run_launch

    raise typer.Exit(code=run_launch(str(config), overrides or [], nproc, nnodes, node_rank, master_addr,
                                     master_port, launcher.value, dry_run))


@app.command("compare-finetuning", context_settings={"allow_interspersed_args": True})
@exit_on_error
def compare_finetuning(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES,
                       json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
                       out: Optional[Path] = typer.Option(
                           None, help="JSON file (default: out_dir/NAME-finetune-report.json)"),
                       shots: str = typer.Option("1,5,10,20,50", help="small CNNs: the training images per class "
                                                                      "(K) to adapt and train from scratch with")):
    """Fine-tuning on one split. VGG: new head on frozen features vs full fine-tuning vs from scratch.
    A small CNN with model.weights (configs/adapt_own.yaml): as is, then adapted vs from scratch with
    K images per class and with all of them; a table, JSON and a PNG curve."""
    from hwr_dist.commands.compare_finetuning import compare_finetuning as run, parse_shots
    from hwr_dist.recipes import load

    run(load(config, overrides or []), json_out, out, parse_shots(shots))


# The command's former name, kept as a hidden alias.
app.command("finetune-report", hidden=True, context_settings={"allow_interspersed_args": True})(compare_finetuning)


@config_app.command("show", context_settings={"allow_interspersed_args": True})
@exit_on_error
def config_show(config: Optional[Path] = typer.Argument(None, help="YAML config or recipe (default: the defaults)"),
                overrides: Optional[List[str]] = OVERRIDES,
                doc: bool = typer.Option(False, "--doc", help="every key with its value and what it means")):
    """Print the resolved config: defaults, then the file, then the overrides."""
    from hwr_dist.commands.config import show, show_doc

    (show_doc if doc else show)(config, overrides or [])


@config_app.command("run-dir")
@exit_on_error
def config_run_dir(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES):
    """Print the run directory (train.out_dir/train.name, absolute) the config resolves to."""
    from hwr_dist.commands.config import run_dir

    run_dir(config, overrides or [])


@data_app.command("list")
@exit_on_error
def data_list(root: Path = typer.Option(Path("data"), help="data.root to look in")):
    """Data sets the tool knows, their sizes, and whether their files are here."""
    from hwr_dist.commands.data import list_datasets

    list_datasets(root)


@data_app.command("verify")
@exit_on_error
def data_verify(name: str = typer.Argument(..., help="data set name, see `hwr data list`"),
                root: Path = typer.Option(Path("data"), help="data.root to look in")):
    """Read every file of a data set and check its format, counts and labels."""
    from hwr_dist.commands.data import verify

    verify(name, root)


@app.command()
@exit_on_error
def evaluate(checkpoint: Path = typer.Argument(..., help="a .pt file, a run directory or a file written by hwr export"),
             split: Split = typer.Option(Split.test, help="the split to score"),
             out: Optional[Path] = typer.Option(None, help="where to write the report (default: the run directory)"),
             data_root: Optional[str] = typer.Option(None, help="override data.root of the checkpoint's config")):
    """Accuracy, per-class precision/recall/F1, confusion matrix and plots for a trained or exported model
    (a sequence model's checkpoint: sequence accuracy, character error rate and its worst readings)."""
    from hwr_dist.commands.evaluate import evaluate_checkpoint

    evaluate_checkpoint(checkpoint, split.value, out, data_root)


@app.command()
@exit_on_error
def predict(checkpoint: Path = typer.Argument(..., help="a .pt file, a run directory or a file written by hwr export"),
            images: List[Path] = typer.Argument(..., help="image files or folders"),
            top_k: Optional[int] = typer.Option(None, "--top-k", min=1,
                                                help="classes to show per image (classifiers; default 3)"),
            json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
            segment: bool = typer.Option(False, "--segment",
                                         help="read a row of characters in each image (classifiers)"),
            beam: Optional[int] = typer.Option(None, "--beam", min=1,
                                               help="sequence models: beam search this wide instead of greedy "
                                                    "reading"),
            pattern: Optional[str] = typer.Option(None, "--pattern",
                                                  help="sequence models: a regular expression the reading must "
                                                       "match, e.g. '\\d{5}' (beam search, 16 wide unless --beam)")):
    """Recognise real images (photos, scans, MNIST-style) with a trained model: a classifier names each
    character, a sequence model (CRNN) reads each image as one number or line of text."""
    from hwr_dist.commands.predict import predict_files

    failures = predict_files(checkpoint, images, top_k, json_out, segment, beam, pattern)
    raise typer.Exit(code=2 if failures else 0)


@app.command()
@exit_on_error
def export(checkpoint: Path = typer.Argument(..., help="a .pt file or a run directory"),
           fmt: Format = typer.Option(Format.torchscript, "--format", "-f", help="the file format"),
           quantize: Optional[Quantize] = typer.Option(None, "--quantize",
                                                  help="int8: dynamic int8 dense layers, and static int8 "
                                                       "convolutions for torchscript where they measure faster here"),
           out: Optional[Path] = typer.Option(None, "--out", "-o",
                                              help="file to write (default: RUN_DIR/export/<checkpoint>[-int8].<ext>)"),
           report: Optional[bool] = typer.Option(None, "--report/--no-report",
                                                 help="size, CPU latency and test accuracy, float vs exported "
                                                      "(default: on with --quantize)"),
           force: bool = typer.Option(False, "--force", help="replace an existing --out file (never a checkpoint)")):
    """Export a checkpoint (EMA weights when kept) with its preprocessing contract in the file's metadata."""
    from hwr_dist.commands.export import export_checkpoint

    export_checkpoint(checkpoint, fmt.value, quantize.value if quantize else None, out, report, force=force)


@app.command("serve")
@exit_on_error
def serve_command(model: Path = typer.Argument(..., help="a checkpoint (.pt), a run directory, or an export "
                                                           "(.onnx, .torchscript.pt)"),
                  host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 opens it to the network"),
                  port: int = typer.Option(8000, min=0, max=65535, help="TCP port"),
                  max_batch: int = typer.Option(64, min=1, help="most images per forward pass (1: no batching)"),
                  max_wait_ms: float = typer.Option(5.0, min=0, help="most time a request waits for others to batch"),
                  workers: int = typer.Option(1, min=1, help="server processes, each with its own model")):
    """Serve a model: JSON API (/v1/predict, /v1/model, /metrics, /openapi.json) and a draw-a-digit page at /."""
    from hwr_dist.commands.serve import serve

    serve(model, host, port, max_batch, max_wait_ms, workers)


@app.command()
@exit_on_error
def report(run_dir: Path = typer.Argument(..., help="a training run's directory, e.g. runs/default")):
    """Summary table of a run, and its loss, accuracy and learning-rate curves as RUN_DIR/report_curves.png."""
    from hwr_dist.commands.report import report as run_report

    run_report(run_dir)


@app.command()
@exit_on_error
def doctor(config: Optional[Path] = typer.Argument(None, help="a config or recipe to resolve (default: the defaults)"),
           overrides: Optional[List[str]] = OVERRIDES):
    """What this machine offers and what a run would use: torch, CUDA, GPUs, precision, W&B, SLURM, disk."""
    from hwr_dist.commands.doctor import doctor as run

    run(config, overrides or [])


@app.command()
@exit_on_error
def runs(folder: Path = typer.Argument(Path("runs"), help="the runs folder (train.out_dir)"),
         json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table")):
    """Every run in a folder: status (running, completed, preempted, diverged, failed), steps, accuracies, W&B id."""
    from hwr_dist.commands.runs import runs as list_runs

    list_runs(folder, json_out)


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
    from hwr_dist.commands.slurm import submit_config

    submit_config(config, overrides or [], dry_run, nodes=nodes, gpus_per_node=gpus_per_node,
                  procs_per_node=procs_per_node, cpus_per_task=cpus_per_task, time=time, partition=partition,
                  job_name=job_name, output=output, run_name=run_name, max_requeues=max_requeues,
                  sbatch_opts=sbatch_opt or [], script=script)


@slurm_app.command("script")
@exit_on_error
def slurm_script():
    """Print the path of the job script that `hwr slurm submit` uses (for sbatch by hand, or to copy)."""
    from hwr_dist.commands.slurm import SCRIPT

    print(SCRIPT)


@recipes_app.callback()
@exit_on_error
def recipes_list(ctx: typer.Context):
    """The shipped recipes, one line each; use a name wherever a config file goes."""
    if ctx.invoked_subcommand is None:
        from hwr_dist.recipes import describe, names

        for name in names():
            print(f"{name:24s} {describe(name)}")


@recipes_app.command("copy")
@exit_on_error
def recipes_copy(name: str = typer.Argument(..., help="a recipe name, see `hwr recipes`"),
                 dest: Optional[Path] = typer.Argument(None, help="file or folder (default: NAME.yaml here)")):
    """Write a recipe out as a YAML file to edit."""
    from hwr_dist.recipes import copy

    print(f"wrote {copy(name, dest)}")


@slurm_app.command("status")
@exit_on_error
def slurm_status(job_id: Optional[str] = typer.Argument(None, help="a job id (default: all your jobs)")):
    """Your jobs in the queue, or one job's state, restart count and the end of its log."""
    from hwr_dist.commands.slurm import status

    typer.echo(status(job_id))


def main() -> None:
    """Bad flags and arguments end like every other bad input: one `error:` line, exit 2."""
    from typer.exceptions import Abort, TyperException

    try:
        code = app(standalone_mode=False)
    except TyperException as e:  # click's usage errors (typer vendors click)
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `hwr` or `hwr config`: the help
            print(ctx.get_help())
            sys.exit(0)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"error: {e.format_message()}{where}", file=sys.stderr)
        sys.exit(2)
    except Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
