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

CONFIG = typer.Argument(..., help="YAML config, e.g. configs/default.yaml")
OVERRIDES = typer.Argument(None, help="Overrides as section.key=value, e.g. optim.lr=0.01 train.epochs=3")


@app.command(context_settings={"allow_interspersed_args": True})
@exit_on_error
def train(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES,
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a progress bar.")):
    """Train a model (one process; see `hwr launch` for several)."""
    from hwr_dist.config import load_config
    from hwr_dist.train import run_training

    run_training(load_config(config, overrides or []), quiet)


@config_app.command("show")
@exit_on_error
def config_show(config: Path = CONFIG, overrides: Optional[List[str]] = OVERRIDES):
    """Print the resolved config: defaults, then the file, then the overrides."""
    from hwr_dist.config import load_config, to_yaml

    typer.echo(to_yaml(load_config(config, overrides or [])), nl=False)


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
    from hwr_dist.evaluate_cli import evaluate_checkpoint

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
