"""One class per image: cross-entropy, accuracy, the confusion matrix (evaluate.py holds the counting)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hwr_dist.evaluate import EvalResult, evaluate, write_report


@dataclass
class ClassificationTask:
    label_smoothing: float = 0.0
    name: str = "classification"

    def loss(self, model, x: torch.Tensor, y: torch.Tensor, cached: bool) -> torch.Tensor:
        logits = model(x, from_features=True) if cached else model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)

    def evaluate(self, model, data, classes, batch_size: int, accelerator=None, worst_k: int = 0) -> EvalResult:
        return evaluate(model, data, len(classes), batch_size, accelerator, worst_k)

    def write_report(self, result: EvalResult, data, classes, out_dir, split, display) -> dict:
        return write_report(result, data, classes, out_dir, split, display)
