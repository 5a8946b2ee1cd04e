"""Evaluation that counts every sample exactly once, however many processes share it.

Rank r evaluates samples r, r + world, r + 2 world, ...: disjoint strided shards with no
padding, so nothing is duplicated. Each rank builds a confusion matrix of its shard and
the matrices are summed across ranks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from hwr_dist.files import atomic_write
from hwr_dist.data.loader import DeviceData


@dataclass
class EvalResult:
    confusion: torch.Tensor  # int64 [C, C], rows = true class, columns = predicted
    loss: float
    worst: list[tuple[float, int, int, int]] = field(default_factory=list)
    """Most confidently wrong samples: (loss, index in split, true, predicted), worst first."""

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(self.confusion.diag().sum()) / max(1, self.count)

    def metrics(self, split: str) -> dict[str, float]:
        return {f"{split}_accuracy": self.accuracy, f"{split}_loss": self.loss}

    def headline(self) -> str:
        return f"accuracy {self.accuracy:.2%}"

    def per_class(self) -> dict[str, list[float]]:
        c = self.confusion.double()
        tp = c.diag()
        precision = tp / c.sum(0).clamp(min=1)
        recall = tp / c.sum(1).clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                "support": c.sum(1).long().tolist()}

    def summary(self, classes: list[str]) -> dict:
        pc = self.per_class()
        return {
            "accuracy": self.accuracy, "loss": self.loss, "count": self.count,
            "macro_precision": sum(pc["precision"]) / len(classes),
            "macro_recall": sum(pc["recall"]) / len(classes),
            "macro_f1": sum(pc["f1"]) / len(classes),
            "per_class": {name: {k: pc[k][i] for k in pc} for i, name in enumerate(classes)},
            "confusion": self.confusion.tolist(),
        }


def input_format(model) -> torch.memory_format:
    """channels_last when the model's convolutions are stored so (model.channels_last): an input in the
    other layout is converted inside every conv, at about a third of the speed."""
    for p in model.parameters():
        if p.ndim == 4 and p.shape[1] > 1:  # a conv with one input channel is contiguous in both layouts
            cl = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return torch.channels_last if cl else torch.contiguous_format
    return torch.contiguous_format


@torch.no_grad()
def evaluate(model, data: DeviceData, num_classes: int, batch_size: int, accelerator=None,
             worst_k: int = 0) -> EvalResult:
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    device = data.images.device
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    worst: list[tuple[float, int, int, int]] = []
    shard = torch.arange(rank, len(data), world, device=device)
    layout = input_format(model)
    for start in range(0, len(shard), batch_size):
        idx = shard[start : start + batch_size]
        x, y = data.batch(idx)
        x = x.contiguous(memory_format=layout)
        with accelerator.autocast() if accelerator else torch.autocast(device.type, enabled=False):
            logits = model(x)
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        pred = logits.argmax(1)
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
        loss_sum += losses.sum().double()
        if worst_k:
            wrong = (pred != y).nonzero().squeeze(1)
            top = losses[wrong].topk(min(worst_k, len(wrong))).indices
            worst += [(losses[i].item(), idx[i].item(), y[i].item(), pred[i].item()) for i in wrong[top].tolist()]
            worst = sorted(worst, reverse=True)[:worst_k]
    if world > 1:
        confusion = accelerator.reduce(confusion, "sum")
        loss_sum = accelerator.reduce(loss_sum, "sum")
        if worst_k:
            from accelerate.utils import gather_object

            worst = sorted(gather_object(worst), reverse=True)[:worst_k]
    model.train(was_training)
    confusion = confusion.view(num_classes, num_classes).cpu()
    return EvalResult(confusion, float(loss_sum) / max(1, int(confusion.sum())), worst)


def write_report(result: EvalResult, data: DeviceData, classes: list[str], out_dir: Path, split: str,
                      display) -> dict:
    """metrics.json, the PNG plots and the per-class table of one split's evaluation."""
    from hwr_dist.display import per_class_table
    from hwr_dist.plots import save_plots

    summary = {"split": split, **result.summary(classes),
               "worst": [{"index": i, "true": classes[y], "predicted": classes[p], "loss": loss}
                         for loss, i, y, p in result.worst]}
    out_dir = out_dir / f"eval_{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    atomic_write(path, json.dumps(summary, indent=1) + "\n")
    plots = save_plots(result, data, classes, out_dir, split)
    if display.enabled:
        display.console.print(per_class_table(summary, f"{split}: accuracy {result.accuracy:.2%} "
                                                       f"on {result.count} images"))
        display.print(f"wrote {path} and {', '.join(str(p) for p in plots)}")
    return summary
