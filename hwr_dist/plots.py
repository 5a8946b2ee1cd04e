"""Every PNG the tool writes: confusion matrices, worst-error grids, training curves.

matplotlib is imported inside each function: commands that draw nothing stay fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def save_plots(result, data, classes: list[str], out_dir, prefix: str) -> list:
    """Confusion-matrix heat map and a grid of the worst misclassified images, as PNG.
    `result` is an evaluate.EvalResult, `data` the split's DeviceData."""
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
        paths.append(out_dir / "worst.png")
        save_worst_grid(plt, result.worst, data, classes, paths[-1], prefix)
    return paths


def save_worst_grid(plt, worst: list, data, classes: list[str], path, prefix: str) -> None:
    """The misclassified images as one montage, a caption band above each: one axes, not one per image
    (32 axes and their layout cost a second)."""
    import numpy as np

    cols = 8
    rows = -(-len(worst) // cols)
    h, w = data.images.shape[-2:]
    band, gap = max(6, h // 3), max(2, w // 10)  # caption band and gap, in image pixels
    cell_h, cell_w = h + band, w + gap
    montage = np.full((rows * cell_h, cols * cell_w - gap), np.nan, dtype=np.float32)  # NaN: the background
    images = data.images[[i for _, i, _, _ in worst]].cpu().numpy()
    scale = 1.2 / cell_w  # inches per pixel: each image about an inch wide, as before
    fig, ax = plt.subplots(figsize=(montage.shape[1] * scale, montage.shape[0] * scale + 0.35))
    for k, ((_, _, y, p), image) in enumerate(zip(worst, images)):
        top, left = (k // cols) * cell_h + band, (k % cols) * cell_w
        montage[top : top + h, left : left + w] = image
        ax.text(left + w / 2, top - 1, f"{classes[y]}→{classes[p]}", ha="center", va="bottom", fontsize=7,
                color="crimson", clip_on=False)
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    ax.imshow(montage, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"{prefix}: most confidently wrong (true→predicted)", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / fig.get_figheight())
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_reading_grid(worst: list, data, out_dir, prefix: str) -> list:
    """The worst readings of a sequence evaluation, one row each: the image, the truth and the reading,
    as worst.png. `worst` holds ctc.Reading records, `data` the split (LineData or DigitStrings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    fig, axes = plt.subplots(len(worst), 1, figsize=(6, 0.85 * len(worst) + 0.4), squeeze=False)
    for ax, r in zip(axes.flat, worst):
        x, y = data.batch(torch.tensor([r.index]))
        image = (x[0, 0, :, : int(y.widths[0])] * data.std + data.mean).clamp(0, 1)
        ax.imshow(image.cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"truth {r.truth}  read {r.reading or '(nothing)'}  ({r.distance} edits)", fontsize=8,
                     color="crimson", loc="left")
        ax.axis("off")
    fig.suptitle(f"{prefix}: the readings farthest from the truth", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title above the first row
    path = out_dir / "worst.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _val_and_test(ax, rows: list[dict], what: str, test_value: Any, fmt: str) -> None:
    """The validation curve of `what` and the final test value as a dashed line, titled `what`."""
    s, v = series(rows, f"val_{what}")
    if v:
        ax.plot(s, v, "o-", label=f"val {what}", color="tab:orange")
    if isinstance(test_value, (int, float)):
        ax.axhline(test_value, ls="--", color="tab:green", label=f"test {what} {fmt.format(test_value)}")
    ax.set_title(what)


def plot_curves(run: dict[str, Any], path: Path) -> Path:
    """Loss, accuracy and learning rate against the optimizer step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run["rows"]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    s, v = series(rows, "loss")
    ax_loss.plot(s, v, label="train loss", color="tab:blue")
    test_loss = run["summary"].get("test_loss", run["test"].get("loss"))
    _val_and_test(ax_loss, rows, "loss", test_loss, "{:.3f}")
    test_acc = run["test"].get("accuracy", run["summary"].get("test_accuracy"))
    _val_and_test(ax_acc, rows, "accuracy", test_acc, "{:.2%}")
    ax_acc.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    s, v = series(rows, "lr")
    ax_lr.plot(s, v, color="tab:purple")
    ax_lr.set_title("learning rate")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    name = (run["config"].get("train") or {}).get("name") if isinstance(run["config"].get("train"), dict) else None
    fig.suptitle(f"{name or run['dir'].name}: training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
