"""What a run learns to do: its loss, its evaluation and its report.

Two tasks share the launcher, the loop, checkpoints and tracking:
- `classification`: one class per 28x28 image; cross-entropy; accuracy and a confusion matrix.
- `sequence`: a row of characters per image of any width (whole numbers, text lines); CTC;
  character error rate and sequence accuracy.

The data set decides the task (`digit-strings` and `textlines` hold sequences). The loop, the
final test and `hwr evaluate` call a `Task` and never ask which one it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

SEQUENCE_DATA = ("digit-strings", "textlines")
SEQUENCE_MODELS = ("crnn",)


class Result(Protocol):
    accuracy: float
    """The headline: the share of samples read exactly right (validation picks the best epoch by it)."""
    loss: float
    count: int

    def metrics(self, split: str) -> dict[str, float]:
        """What the tracker logs for this split, e.g. {'val_accuracy': ..., 'val_loss': ...}."""

    def headline(self) -> str:
        """One line for the log, e.g. 'accuracy 98.10%' or 'sequences 91.2%, CER 1.8%'."""


class Task(Protocol):
    name: str

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y, cached: bool) -> torch.Tensor:
        """The mean loss of one micro-batch (cached: x holds backbone features, only the head runs)."""

    def evaluate(self, model: torch.nn.Module, data, classes: list[str], batch_size: int, accelerator=None,
                 worst_k: int = 0) -> Result:
        """Every sample of `data` counted once, however many processes share the work."""

    def write_report(self, result: Result, data, classes: list[str], out_dir: Path, split: str, display) -> dict:
        """metrics.json and the plots of one split's evaluation, under out_dir/eval_<split>/."""


def task_name(data_name: str) -> str:
    return "sequence" if data_name in SEQUENCE_DATA else "classification"


def task_for(cfg) -> Task:
    """The task of a config (its data set decides)."""
    if task_name(cfg.data.name) == "sequence":
        from hwr_dist.tasks.sequence import SequenceTask

        return SequenceTask()
    from hwr_dist.tasks.classification import ClassificationTask

    return ClassificationTask(cfg.optim.label_smoothing)


def check_config(cfg) -> None:
    """A sequence data set needs a sequence model, and the other way round."""
    from hwr_dist.errors import HwrError

    sequence_data = task_name(cfg.data.name) == "sequence"
    sequence_model = cfg.model.name in SEQUENCE_MODELS
    if sequence_data and not sequence_model:
        raise HwrError(f"data.name={cfg.data.name} holds rows of characters, which model.name={cfg.model.name} "
                       "cannot read; use model.name=crnn")
    if sequence_model and not sequence_data:
        raise HwrError(f"model.name={cfg.model.name} reads rows of characters; data.name={cfg.data.name} holds one "
                       f"class per image: use data.name={SEQUENCE_DATA[0]} (or textlines), or a classifier model")
