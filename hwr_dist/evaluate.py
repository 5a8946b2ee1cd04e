"""Evaluation that counts every sample exactly once, however many processes share it.

Rank r evaluates samples r, r + world, r + 2 world, ...: disjoint strided shards with no
padding, so nothing is duplicated. Each rank builds a confusion matrix of its shard and
the matrices are summed across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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
    for start in range(0, len(shard), batch_size):
        idx = shard[start : start + batch_size]
        x, y = data.batch(idx)
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


def save_plots(result: EvalResult, data: DeviceData, classes: list[str], out_dir, prefix: str) -> list:
    """Confusion-matrix heat map and a grid of the worst misclassified images, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(5, n * 0.45), max(4.5, n * 0.4)))
    im = ax.imshow(result.confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 12 else 0, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 12:
        for i in range(n):
            for j in range(n):
                v = int(result.confusion[i, j])
                if v:
                    ax.text(j, i, v, ha="center", va="center", fontsize=7,
                            color="white" if v > result.confusion.max() / 2 else "black")
    ax.set_title(f"{prefix} confusion matrix (accuracy {result.accuracy:.2%})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    paths.append(out_dir / "confusion.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if result.worst:
        cols = 8
        rows = -(-len(result.worst) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.5), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (loss, i, y, p) in zip(axes.flat, result.worst):
            ax.imshow(data.images[i].cpu().numpy(), cmap="gray")
            ax.set_title(f"{classes[y]}→{classes[p]}", fontsize=8, color="crimson")
        fig.suptitle(f"{prefix}: most confidently wrong (true→predicted)", fontsize=9)
        fig.tight_layout()
        paths.append(out_dir / "worst.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
