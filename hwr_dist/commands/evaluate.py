"""`hwr evaluate`: a checkpoint or an exported file scored again on its test or validation split, with
the report files."""

from __future__ import annotations

from pathlib import Path

from hwr_dist.data.loader import DeviceData


def evaluate_checkpoint(checkpoint: Path, split: str, out: Path | None, data_root: str | None) -> dict:
    """Re-evaluate a model on the split it was trained against, on one process or under a launcher."""
    import torch
    from accelerate import Accelerator

    from hwr_dist.config import DataConfig
    from hwr_dist.data import load_dataset, training_splits
    from hwr_dist.display import Display
    from hwr_dist.errors import HwrError
    from hwr_dist.evaluate import evaluate, write_report
    from hwr_dist.export.use import load_any

    trained = load_any(checkpoint)
    cfg = trained.cfg
    if split == "val" and cfg is None:
        raise HwrError(f"--split val needs the run's data.val_fraction and train.seed, which {trained.source} "
                       "exports do not carry; evaluate the checkpoint or a state-dict export, or use --split test")
    data_cfg = cfg.data if cfg else DataConfig()  # TorchScript and ONNX exports: the defaults
    acc = Accelerator(cpu=not torch.cuda.is_available())
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
    data = DeviceData.from_split(chosen, acc.device, trained.mean, trained.std)
    model = trained.model.to(acc.device)
    result = evaluate(model, data, len(trained.classes), data_cfg.eval_batch_size, acc, worst_k=32)
    display = Display(acc.is_main_process, quiet=False)
    if acc.is_main_process:
        return write_report(result, data, trained.classes, out or trained.report_dir, split, display)
    return {}

