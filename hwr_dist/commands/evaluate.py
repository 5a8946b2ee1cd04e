"""`hwr evaluate`: a checkpoint or an exported file scored again on its test or validation split, with
the report files. The run's task scores and reports: a classifier's accuracy and confusion matrix,
or a sequence model's sequence accuracy and character error rate on the lines its run used."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hwr_dist.data.loader import DeviceData
from hwr_dist.errors import HwrError


def evaluate_checkpoint(checkpoint: Path, split: str, out: Path | None, data_root: str | None) -> dict:
    """Re-evaluate a model on the split it was trained against, on one process or under a launcher."""
    import torch
    from accelerate import Accelerator

    from hwr_dist.config import DataConfig
    from hwr_dist.display import Display
    from hwr_dist.export.use import load_any
    from hwr_dist.tasks import task_for
    from hwr_dist.tasks.classification import ClassificationTask

    trained = load_any(checkpoint)
    cfg = trained.cfg
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if trained.task == "sequence":
        data = sequence_split(trained, split, data_root, acc.device)
    else:
        data = character_split(trained, split, data_root, acc.device)
    task = task_for(cfg) if cfg else ClassificationTask()  # exports without a config are classifiers
    batch_size = (cfg.data if cfg else DataConfig()).eval_batch_size  # TorchScript and ONNX exports: the default
    result = task.evaluate(trained.model.to(acc.device), data, trained.classes, batch_size, acc, worst_k=32)
    display = Display(acc.is_main_process, quiet=False)
    if acc.is_main_process:
        return task.write_report(result, data, trained.classes, out or trained.report_dir, split, display)
    return {}


def character_split(trained, split: str, data_root: str | None, device) -> DeviceData:
    """A classifier's split of its data set, normalised as the model was trained."""
    from hwr_dist.config import DataConfig
    from hwr_dist.data import load_dataset, training_splits

    cfg = trained.cfg
    if split == "val" and cfg is None:
        raise HwrError(f"--split val needs the run's data.val_fraction and train.seed, which {trained.source} "
                       "exports do not carry; evaluate the checkpoint or a state-dict export, or use --split test")
    data_cfg = cfg.data if cfg else DataConfig()  # TorchScript and ONNX exports: the defaults
    try:
        bundle = load_dataset(trained.data_set, data_root or data_cfg.root, download=False)
    except HwrError as e:
        if data_root or cfg:
            raise
        raise HwrError(f"{e} ({trained.source} exports do not record data.root: pass --data-root)") from None
    if bundle.classes != trained.classes:
        raise HwrError(f"{trained.path} was trained on other classes than data set {trained.data_set} has now")
    if split == "val":
        _, chosen = training_splits(bundle, cfg.data, cfg.train.seed)
        if len(chosen) == 0:
            raise HwrError("this run had no validation split (data.val_fraction=0); use --split test")
    else:
        chosen = bundle.test
    return DeviceData.from_split(chosen, device, trained.mean, trained.std)


def sequence_split(trained, split: str, data_root: str | None, device):
    """A sequence run's split of lines, rebuilt from its config as the run built it (the same seed
    draws the same digit strings), normalised as the model was trained."""
    from hwr_dist.tasks.sequence import load_data

    if trained.source != "checkpoint":
        origin = f" ({trained.run_dir})" if trained.run_dir else ""
        raise HwrError(f"{trained.path} is an export ({trained.source}) of a sequence model; hwr evaluate reads a "
                       "sequence model from its checkpoint, whose config rebuilds the run's lines and whose model "
                       f"reads each line of a batch at its own width: evaluate the checkpoint it came from{origin}")
    cfg = trained.cfg
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=data_root or cfg.data.root, download=False))
    data = load_data(cfg, device, cfg.train.seed)
    if data.classes != trained.classes:
        raise HwrError(f"{trained.path} was trained on another alphabet ({''.join(trained.classes)!r}) than "
                       f"its data set {cfg.data.name} gives now ({''.join(data.classes)!r})")
    chosen = data.val if split == "val" else data.test
    if len(chosen) == 0:
        raise HwrError("this run had no validation split (data.val_fraction=0); use --split test")
    chosen.mean, chosen.std = trained.mean, trained.std  # the checkpoint's own normalisation
    return chosen
