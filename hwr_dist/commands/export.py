"""`hwr export`: a checkpoint to a deployable file that carries its own preprocessing contract.

Formats and their contract: hwr_dist/export/formats.py and contract.py. The EMA weights are
exported when the run kept them. ``--quantize int8``: hwr_dist/export/quantize.py, for classifiers
(its calibration and its report measure 28x28 characters). After writing, the file is loaded back
in its own runtime and checked against PyTorch (`verify`); a sequence model's at two line widths.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hwr_dist.errors import HwrError
from hwr_dist.export.contract import CHECK_WIDTHS, FORMATS, QUANTIZE, SUFFIX, contract, dynamic_meta, is_sequence
from hwr_dist.export.formats import Exported, load_exported, need_onnx, verify, write_export
from hwr_dist.export.measure import Measure, load_split, measure, print_report
from hwr_dist.export.quantize import choose_int8, quantize_dynamic_linear


@dataclass
class ExportResult:
    path: Path
    meta: dict[str, Any]
    max_diff: float | None
    report: list[Measure] = field(default_factory=list)


def check_options(fmt: str, quantize: str | None) -> tuple[str, str | None]:
    fmt = fmt.lower().replace("_", "-")
    if fmt not in FORMATS:
        raise HwrError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if quantize is not None:
        quantize = quantize.lower()
        if quantize not in QUANTIZE:
            raise HwrError(f"unknown quantisation {quantize!r}; use --quantize int8 or leave it out")
    if fmt == "onnx":
        need_onnx()  # before any work
    return fmt, quantize


def check_sequence_options(trained, quantize: str | None, report: bool | None) -> None:
    """int8 and the report are for classifiers: both run 28x28 characters through the model."""
    what = f"{trained.path} holds a {trained.cfg.model.name} sequence model"
    if quantize:
        raise HwrError(f"--quantize {quantize} is for classifiers (its int8 layers are chosen and checked on 28x28 "
                       f"characters); {what}: export it in float32, without --quantize")
    if report:
        raise HwrError(f"--report measures classifiers on 28x28 characters; {what}: leave --report out, and score "
                       "the checkpoint's lines with hwr evaluate")


def default_out(trained, fmt: str, quantize: str | None) -> Path:
    return trained.run_dir / "export" / f"{trained.path.stem}{'-' + quantize if quantize else ''}{SUFFIX[fmt]}"


def is_training_checkpoint(path: Path) -> bool:
    """A run's checkpoint: in a checkpoints/ folder, or a file that loads as one."""
    if path.parent.name == "checkpoints":
        return True
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - anything that does not load as a checkpoint is not one
        return False
    return isinstance(obj, dict) and "model" in obj and "config" in obj and "optimizer" in obj


def check_out(out: Path, source: Path, force: bool) -> None:
    """Never write over the input or a run's checkpoint; over anything else only with --force."""
    if not out.exists():
        return
    if out.is_file() and (os.path.samefile(out, source) or is_training_checkpoint(out)):
        which = "the checkpoint being exported" if os.path.samefile(out, source) else "a training checkpoint"
        raise HwrError(f"--out {out} is {which}; hwr export never writes over one, even with --force: "
                       "choose another --out")
    if not force:
        raise HwrError(f"{out} exists; pass --force to replace it, or choose another --out")


def export_checkpoint(checkpoint: str | Path, fmt: str = "torchscript", quantize: str | None = None,
                      out: str | Path | None = None, report: bool | None = None, threads: int = 1,
                      echo: Callable[[str], None] = print, force: bool = False) -> ExportResult:
    from hwr_dist.checkpoint import load_checkpoint, load_trained

    fmt, quantize = check_options(fmt, quantize)
    trained = load_trained(checkpoint)
    if is_sequence(trained):
        check_sequence_options(trained, quantize, report)
    ema = bool(load_checkpoint(trained.path).get("ema"))
    out = Path(out) if out else default_out(trained, fmt, quantize)
    if out.is_dir():
        out = out / default_out(trained, fmt, quantize).name
    check_out(out, trained.path, force)
    module, quantization = None, None
    if quantize and fmt == "torchscript":
        module, quantization = choose_int8(trained, echo, threads)
    elif quantize:
        module = quantize_dynamic_linear(trained.model) if fmt == "state-dict" else None
        quantization = dynamic_meta(fmt)
    meta = contract(trained, fmt, quantization, ema)
    try:
        reference = write_export(trained, fmt, meta, out, module)
    except HwrError:
        raise
    except OSError as e:
        raise HwrError(f"cannot write {out} ({e.strerror or e}); choose another --out") from None
    except Exception as e:  # noqa: BLE001 - a tracer or exporter that cannot handle this model
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HwrError(f"exporting model {trained.cfg.model.name} as {fmt} failed ({first[:160]}); "
                       "try another --format") from None
    exported = load_exported(out)
    diff = verify(trained, exported, reference)
    what = f"{fmt}{', ' + quantization['scheme'] if quantization else ''}, {'EMA' if ema else 'trained'} weights"
    widths = f" at widths {' and '.join(map(str, CHECK_WIDTHS))}" if is_sequence(trained) else ""
    checked = "" if diff is None else f"; outputs match PyTorch{widths} (max difference {diff:.1e})"
    echo(f"wrote {out} ({what}, {out.stat().st_size:,} bytes{checked})")
    result = ExportResult(out, meta, diff)
    if report if report is not None else bool(quantize):
        result.report = _report(trained, fmt, meta, exported, threads)
    return result


def _report(trained, fmt: str, meta: dict[str, Any], exported: Exported, threads: int) -> list[Measure]:
    test, why = load_split(trained, "test")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if meta["quantization"]:
            plain = Path(tmp) / f"float{SUFFIX[fmt]}"
            write_export(trained, fmt, {**meta, "quantization": None}, plain)
            rows.append(measure(load_exported(plain, threads), f"float32 {fmt}", test, threads))
        name = f"int8 {fmt}" if meta["quantization"] else f"float32 {fmt}"
        rows.append(measure(load_exported(exported.path, threads), name, test, threads))
    split = f"{trained.cfg.data.name} test split, {rows[0].count} images" if test is not None else why
    print_report(rows, f"{fmt} export: size, CPU latency ({threads} thread, median) and accuracy",
                 f"accuracy: {split}" + (f"; int8 = {meta['quantization']['scheme']}" if meta["quantization"] else ""))
    return rows
