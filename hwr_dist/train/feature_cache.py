"""The frozen-feature cache: while a model's whole backbone is frozen and training batches are not
augmented, the backbone maps each training image to the same features every epoch. They are
computed once (in memory, and saved under the run directory keyed by a hash of the backbone
weights, input size and data) and the training split is swapped for them: the loop then runs
only the head, `model(features, from_features=True)`. Validation, test and the saved
checkpoint still use the full model.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from hwr_dist.files import atomic_write
from hwr_dist.data.loader import DeviceData
from hwr_dist.models import FineTunable

CACHE_DIR = "feature_cache"


@dataclass
class FeatureCache:
    """The training split as backbone features; `batch` mirrors DeviceData.batch."""

    features: torch.Tensor  # float32 [N, ...] on the device
    labels: torch.Tensor  # int64 [N] on the device

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor, g=None, aug=None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.features.device, non_blocking=True)
        return self.features[idx], self.labels[idx]


def wants_cache(cfg, model, epoch: int) -> bool:
    """cache_features auto/on: the backbone is frozen during `epoch` and inputs are not augmented."""
    return (isinstance(model, FineTunable) and cfg.model.cache_features != "off" and not cfg.data.augment.enabled
            and model.frozen_at(epoch))


def _add(h, t: torch.Tensor) -> None:
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def cache_key(model, data: DeviceData, mixed_precision: str) -> str:
    """Changes whenever the backbone weights, the input size or the training data change."""
    h = hashlib.sha256()
    h.update(f"{model.variant}|{model.input_size}|{model.pool_in_embed}|{mixed_precision}|"
             f"{data.mean!r}|{data.std!r}|{tuple(data.images.shape)}".encode())
    for k, v in sorted(model.backbone_state().items()):
        h.update(k.encode())
        _add(h, v)
    _add(h, data.images)
    return h.hexdigest()[:24]


@torch.no_grad()
def compute_features(model, data: DeviceData, batch_size: int, acc) -> torch.Tensor:
    """model.embed over the whole split, unaugmented, in chunks that keep activations ~256 MB."""
    chunk = max(1, min(batch_size, 2**28 // (64 * 4 * model.input_size**2)))
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(data), chunk):
        x, _ = data.batch(torch.arange(start, min(start + chunk, len(data))))
        with acc.autocast():
            out.append(model.embed(x).float())
    model.train(was_training)
    return torch.cat(out)


def build_feature_cache(run) -> FeatureCache | None:
    """The cache for `run` (a train.setup.Run) if it applies now, loaded from disk when the key matches."""
    model = run.bare
    if not wants_cache(run.cfg, model, run.state.epoch):
        return None
    data = run.data.train
    started = time.perf_counter()
    key = cache_key(model, data, run.cfg.train.mixed_precision)
    folder = run.run_dir / CACHE_DIR
    path = folder / f"{key}.pt"
    features = None
    if path.is_file():
        try:
            features = torch.load(path, map_location=run.acc.device, weights_only=True)
        except Exception:  # a damaged cache is just recomputed
            features = None
        if not isinstance(features, torch.Tensor) or len(features) != len(data):
            features = None
    how = "loaded from"
    if features is None:
        features = compute_features(model, data, run.cfg.data.eval_batch_size, run.acc)
        how = "computed, saved to"
        if run.acc.is_main_process:
            for old in folder.glob("*.pt"):  # other keys: other weights, sizes or data
                old.unlink(missing_ok=True)
            atomic_write(path, features.cpu())
    run.display.print(f"feature cache: {len(features)} x {tuple(features.shape[1:])} backbone features {how} "
                      f"{path} ({time.perf_counter() - started:.1f} s); training runs the head only")
    return FeatureCache(features.to(run.acc.device), data.labels)
