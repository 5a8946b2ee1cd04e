"""Reading whole numbers: CTC against segmentation + a digit classifier, and fine-tuning against from scratch.

    python bench/sequence.py --train                       # trains both recipes (about 20 min on 2 cores)
    python bench/sequence.py --scratch runs/digit_strings --finetune runs/digit_strings_finetune

The test strings are the scratch run's own test set: 4 to 8 digits composed from the built-in
sample's test digits (the settings of configs/digit_strings.yaml, neighbours allowed to touch and
overlap), fixed by the seed. Each reader is scored on the same images:
- the CTC models (the best checkpoint by validation of each run);
- `hwr predict --segment` with a digit classifier (default: the shipped digit model), i.e. the
  row cut at blank columns and each piece classified: the same functions `hwr predict` calls.
Strings whose neighbours touch or overlap are scored apart from the others.

Goals checked: sequence accuracy >= 90% and CER <= 2% for the shipped recipe trained in <= 10 min;
CTC clearly ahead of segmentation on touching digits; the fine-tuned run reaching the scratch run's
best validation accuracy in fewer steps (both curves are drawn to --curves).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "hwr_dist" / "models" / "builtin" / "digits.pt"


def train(recipe: str, name: str, out_dir: Path) -> tuple[Path, float]:
    """Run `hwr train RECIPE` as a user would; (run directory, wall seconds from launch to exit)."""
    started = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "hwr"), "train", recipe, f"train.out_dir={out_dir}",
                           f"train.name={name}", "--quiet"], cwd=ROOT, text=True, capture_output=True)
    if proc.returncode:
        raise SystemExit(f"hwr train {recipe} failed:\n{proc.stderr[-3000:]}")
    print(proc.stdout.strip(), flush=True)
    return out_dir / name, time.perf_counter() - started


def scores_row(name: str, overall, touching) -> dict:
    """Sequence accuracy and CER overall, for touching neighbours and for the rest."""
    from hwr_dist.ctc import SequenceScores

    apart = SequenceScores(*(a - b for a, b in zip(overall.counts(), touching.counts())))
    return {"reader": name, "strings": overall.count, "sequence_accuracy": overall.sequence_accuracy,
            "cer": overall.cer, "touching": touching.sequence_accuracy, "touching_count": touching.count,
            "touching_cer": touching.cer, "apart": apart.sequence_accuracy, "apart_count": apart.count,
            "apart_cer": apart.cer}


def ctc_row(name: str, run_dir: Path, test) -> dict:
    from hwr_dist.checkpoint import load_trained
    from hwr_dist.tasks.sequence import SequenceTask

    trained = load_trained(run_dir / "checkpoints" / "best.pt")
    result = SequenceTask().evaluate(trained.model, test, trained.classes, 250)
    return scores_row(name, result.scores, result.touching)


def segmentation_row(classifier: Path, test) -> dict:
    """Each test string through `hwr predict --segment`'s path: cut at blank columns, classify each piece."""
    from hwr_dist.ctc import SequenceScores
    from hwr_dist.data.preprocess import characters
    from hwr_dist.errors import HwrError
    from hwr_dist.export.use import load_any

    model = load_any(classifier)
    overall, touching = SequenceScores(), SequenceScores()
    for start in range(0, len(test), 250):
        idx = torch.arange(start, min(start + 250, len(test)))
        pixels, targets = test.pixels(idx)
        for i, truth in enumerate(targets.texts(test.alphabet)):
            image = pixels[i, :, : int(targets.widths[i])].round().clamp(0, 255).to(torch.uint8).numpy()
            try:
                chars = characters(Image.fromarray(np.ascontiguousarray(image), "L"), segment=True)
                reading = "".join(model.classes[k] for k in model.probabilities(chars).argmax(1).tolist())
            except HwrError:  # nothing found to read
                reading = ""
            overall.add(truth, reading)
            if bool(targets.touching[i]):
                touching.add(truth, reading)
    return scores_row(f"segmentation + {classifier.name}", overall, touching)


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, a in curve if a >= target), None)


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [100 * a for _, a in curve], "o-", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation sequence accuracy (%)")
    ax.set_title("digit strings: fine-tuned from the digit model vs from scratch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", action="store_true", help="train both recipes first (into --out-dir)")
    p.add_argument("--out-dir", type=Path, default=Path("runs"))
    p.add_argument("--scratch", type=Path, help="run directory of configs/digit_strings.yaml")
    p.add_argument("--finetune", type=Path, help="run directory of configs/digit_strings_finetune.yaml")
    p.add_argument("--classifier", type=Path, default=BUILTIN, help="digit classifier for the segmentation reader")
    p.add_argument("--curves", type=Path, default=Path("sequence_curves.png"))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    timings = {}
    if a.train:
        a.scratch, timings["scratch"] = train("configs/digit_strings.yaml", "digit_strings", a.out_dir)
        a.finetune, timings["finetune"] = train("configs/digit_strings_finetune.yaml", "digit_strings_finetune",
                                                a.out_dir)
    if a.scratch is None:
        raise SystemExit("give --scratch RUN_DIR (and --finetune RUN_DIR), or --train")

    from hwr_dist.checkpoint import load_trained
    from hwr_dist.tasks.sequence import load_data

    cfg = load_trained(a.scratch / "checkpoints" / "best.pt").cfg
    test = load_data(cfg, "cpu", cfg.train.seed).test
    rows = [ctc_row("CTC, from scratch", a.scratch, test)]
    if a.finetune:
        rows.append(ctc_row("CTC, fine-tuned from the digit model", a.finetune, test))
    rows.append(segmentation_row(a.classifier, test))

    print(f"\n{len(test)} test strings of {cfg.data.strings.min_length}-{cfg.data.strings.max_length} digits from "
          f"{cfg.data.strings.source}'s test digits, gaps {cfg.data.strings.gap} px (<= 0: touching)\n")
    print("| reader | sequence accuracy | CER | touching: seq. acc. (n) | apart: seq. acc. (n) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['reader']} | {r['sequence_accuracy']:.2%} | {r['cer']:.2%} | {r['touching']:.2%} "
              f"({r['touching_count']}) | {r['apart']:.2%} ({r['apart_count']}) |")

    summary = json.loads((a.scratch / "summary.json").read_text()) if (a.scratch / "summary.json").exists() else {}
    wall = timings.get("scratch") or summary.get("wall_time_s")
    best, seg = rows[0], rows[-1]
    print("\ngoals:")
    print(f"- sequence accuracy >= 90%: {best['sequence_accuracy']:.2%} "
          f"({'met' if best['sequence_accuracy'] >= 0.90 else 'NOT met'})")
    print(f"- CER <= 2%: {best['cer']:.2%} ({'met' if best['cer'] <= 0.02 else 'NOT met'})")
    if wall:
        how = "launch to exit" if "scratch" in timings else "the run's own clock"
        print(f"- trained in <= 10 min: {wall / 60:.1f} min, {how} ({'met' if wall <= 600 else 'NOT met'})")
    print(f"- CTC ahead of segmentation on touching digits: {best['touching']:.2%} vs {seg['touching']:.2%} "
          f"({'met' if best['touching'] > seg['touching'] + 0.05 else 'NOT met'})")
    result = {"rows": rows, "timings": timings}
    if a.finetune:
        curves = {"from scratch": val_curve(a.scratch), "fine-tuned": val_curve(a.finetune)}
        target = max(acc for _, acc in curves["from scratch"])
        scratch_at, tuned_at = steps_to(curves["from scratch"], target), steps_to(curves["fine-tuned"], target)
        plot_curves(curves, a.curves)
        verdict = "met" if tuned_at is not None and tuned_at < scratch_at else "NOT met"
        print(f"- fine-tuning reaches the scratch run's best validation accuracy ({target:.2%}) in fewer steps: "
              f"{tuned_at if tuned_at is not None else 'never'} vs {scratch_at} ({verdict}); curves in {a.curves}")
        result["curves"] = curves
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
