"""Rows of characters: CTC loss, greedy reading, character error rate and sequence accuracy.

Evaluation shards samples like the classifier's (rank r reads r, r + world, ...: nothing padded,
nothing counted twice); the counts are summed across ranks as one tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hwr_dist.ctc import Reading, SequenceScores, ctc_loss, greedy_decode, to_text, worst_readings
from hwr_dist.files import atomic_write

# Readings per rank kept for the worst-errors grid: the final list is picked from all ranks' lists.
KEEP_WORST = 64


@dataclass
class SequenceResult:
    scores: SequenceScores
    loss: float
    touching: SequenceScores = field(default_factory=SequenceScores)
    """The strings whose neighbours touch or overlap, scored apart (digit strings)."""
    worst: list[Reading] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.scores.sequence_accuracy

    @property
    def count(self) -> int:
        return self.scores.count

    def metrics(self, split: str) -> dict[str, float]:
        out = {f"{split}_accuracy": self.accuracy, f"{split}_loss": self.loss, f"{split}_cer": self.scores.cer,
               f"{split}_length_accuracy": self.scores.length_accuracy}
        if self.touching.count:
            out[f"{split}_touching_accuracy"] = self.touching.sequence_accuracy
        return out

    def headline(self) -> str:
        return f"sequence accuracy {self.accuracy:.2%}, CER {self.scores.cer:.2%}"

    def summary(self) -> dict:
        s, t = self.scores, self.touching
        return {"sequence_accuracy": s.sequence_accuracy, "cer": s.cer, "length_accuracy": s.length_accuracy,
                "loss": self.loss, "count": s.count,
                "touching": {"count": t.count, "sequence_accuracy": t.sequence_accuracy, "cer": t.cer},
                "worst": [{"index": r.index, "truth": r.truth, "reading": r.reading, "edits": r.distance}
                          for r in self.worst]}


def output_lengths(model, widths: torch.Tensor) -> torch.Tensor:
    """Frames per image; the model may be wrapped (DDP), its stride is the CRNN's."""
    from hwr_dist.models.crnn import CRNN

    stride = CRNN.width_stride
    return torch.div(widths + stride - 1, stride, rounding_mode="floor").clamp(min=1)


@dataclass
class SequenceTask:
    name: str = "sequence"

    def loss(self, model, x: torch.Tensor, y, cached: bool) -> torch.Tensor:
        logits = model(x, y.widths)
        return ctc_loss(logits, y.labels, y.lengths, output_lengths(model, y.widths))

    @torch.no_grad()
    def evaluate(self, model, data, classes, batch_size: int, accelerator=None, worst_k: int = 0) -> SequenceResult:
        rank = accelerator.process_index if accelerator else 0
        world = accelerator.num_processes if accelerator else 1
        was_training = model.training
        model.eval()
        scores, touching = SequenceScores(), SequenceScores()
        loss_sum = 0.0
        readings: list[Reading] = []
        device = next(model.parameters()).device
        shard = torch.arange(rank, len(data), world, device=device)
        for start in range(0, len(shard), batch_size):
            idx = shard[start : start + batch_size]
            x, y = data.batch(idx)
            with accelerator.autocast() if accelerator else torch.autocast(device.type, enabled=False):
                logits = model(x, y.widths)
            lengths = output_lengths(model, y.widths)
            loss_sum += float(ctc_loss(logits, y.labels, y.lengths, lengths)) * len(idx)
            truths = y.texts(classes)
            for i, ids, truth, touch in zip(idx.tolist(), greedy_decode(logits, lengths), truths, y.touching.tolist()):
                reading = scores.add(truth, to_text(ids, classes), i)
                if touch:
                    touching.add(truth, reading.reading, i)
                if reading.distance:
                    readings.append(reading)
            readings = worst_readings(readings, KEEP_WORST)
        packed = torch.cat([scores.as_tensor(), touching.as_tensor(), torch.tensor([loss_sum], dtype=torch.float64)])
        if world > 1:
            from accelerate.utils import gather_object

            packed = accelerator.reduce(packed.to(accelerator.device), "sum").cpu()
            readings = gather_object(readings)
        model.train(was_training)
        scores, touching = SequenceScores.from_tensor(packed[:5]), SequenceScores.from_tensor(packed[5:10])
        return SequenceResult(scores, float(packed[10]) / max(1, scores.count), touching,
                              worst_readings(readings, worst_k))

    def write_report(self, result: SequenceResult, data, classes, out_dir: Path, split: str, display) -> dict:
        from hwr_dist.plots import save_reading_grid

        summary = {"split": split, "task": self.name, "accuracy": result.accuracy, **result.summary()}
        out_dir = out_dir / f"eval_{split}"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.json"
        atomic_write(path, json.dumps(summary, indent=1) + "\n")
        plots = save_reading_grid(result.worst, data, out_dir, split) if result.worst else []
        if display.enabled:
            t = result.touching
            touch = f"; touching neighbours: {t.sequence_accuracy:.2%} of {t.count}" if t.count else ""
            display.print(f"{split}: {result.headline()}, length accuracy {result.scores.length_accuracy:.2%} on "
                          f"{result.count} lines{touch}")
            display.print(f"wrote {path}{''.join(f', {p}' for p in plots)}")
        return summary


def load_data(cfg, device, seed: int, world: int = 1):
    """The three splits of a sequence data set on the device, and its alphabet as `classes`."""
    from hwr_dist.data import load_dataset, training_splits
    from hwr_dist.data.digit_strings import DigitStrings
    from hwr_dist.errors import HwrError
    from hwr_dist.data.loader import Data

    d = cfg.data
    if d.name == "textlines":
        from hwr_dist.data.textlines import load_textlines

        train, val, test, alphabet = load_textlines(Path(d.root), d.strings.height, seed, d.val_fraction)
        mean, std = train.pixel_stats()
        data = Data(alphabet, *(lines.to_device(alphabet, mean, std, device) for lines in (train, val, test)))
    else:
        s = d.strings
        bundle = load_dataset(s.source, d.root, d.download)
        train, val = training_splits(bundle, d, seed)
        if len(val) == 0:
            raise HwrError("digit strings draw their validation strings from held-out digits; set data.val_fraction "
                           "above 0 (e.g. 0.1)")
        strings = DigitStrings(train, s, seed, 0.0, 1.0, device, fixed=False, size=s.train_size, salt=0)
        mean, std = strings.pixel_stats()
        data = Data(strings.alphabet, *(DigitStrings(split, s, seed, mean, std, device, fixed=fixed, size=size, salt=k)
                                        for k, (split, fixed, size) in enumerate(
                                            [(train, False, s.train_size), (val, True, s.eval_size),
                                             (bundle.test, True, s.eval_size)])))
    if d.batch_size * world > len(data.train):
        raise HwrError(f"data.batch_size={d.batch_size} per process x {world} process(es) is more than the "
                       f"{len(data.train)} training lines; use data.batch_size={max(1, len(data.train) // world)} or less")
    return data
