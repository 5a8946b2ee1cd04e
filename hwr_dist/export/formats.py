"""Exported files written and loaded back, each in its own runtime.

* ``torchscript``: a traced TorchScript module; the contract is the ``_extra_files`` entry
  ``hwr_meta.json``.
* ``onnx``: an ONNX graph (opset 17; the batch axis dynamic, and a line's width for sequence
  models), checked with ``onnx.checker``; the contract is in ``metadata_props`` (one key per field,
  values JSON-encoded).
* ``state-dict``: ``{"meta": contract, "config": run config, "state_dict": weights}``, plain
  tensors and primitives only, so it loads with ``torch.load(..., weights_only=True)``.

Every file is loaded back and run against PyTorch (`verify`): a classifier on a batch it was not
traced with, a sequence model at two widths it was not traced with.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hwr_dist.data.loader import normalise
from hwr_dist.errors import HwrError
from hwr_dist.export.contract import (CHECK_WIDTHS, INPUT_NAME, META_FILE, OUTPUT_NAME, dynamic_axes, example_input,
                                      is_sequence, output_shape)
from hwr_dist.export.quantize import quantize_dynamic_linear, quantize_onnx_dynamic, quiet_exporters
from hwr_dist.files import atomic_path

OPSET = 17
ONNX_EXTRA = "ONNX export needs the optional packages onnx and onnxruntime: pip install 'hwr-dist[onnx]'"


@dataclass
class Exported:
    """An exported file loaded in its own runtime (TorchScript, onnxruntime or an nn.Module)."""

    path: Path
    format: str
    meta: dict[str, Any]
    run: Callable[[torch.Tensor], torch.Tensor]  # normalised float32 images -> logits (contract.py: the shapes)
    config: dict[str, Any] | None = None  # the run's config; only state-dict exports carry it

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def mean(self) -> float:
        return float(self.meta["mean"])

    @property
    def std(self) -> float:
        return float(self.meta["std"])

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 28, 28] MNIST-style images -> class probabilities [N, classes]."""
        return self.run(normalise(images, self.mean, self.std)).float().softmax(1)


def detect_format(path: Path) -> str:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        # TorchScript archives hold code/ and constants.pkl; torch.save archives only data.pkl and data/
        return "torchscript" if any(n.endswith("constants.pkl") or "/code/" in n for n in names) else "state-dict"
    return "onnx"


def load_exported(path: str | Path, threads: int | None = None) -> Exported:
    """Load any exported file; `threads` pins the runtime's intra-op threads (for timing)."""
    path = Path(path)
    if not path.is_file():
        raise HwrError(f"exported file {path} not found")
    fmt = detect_format(path)
    try:
        if fmt == "torchscript":
            extra = {META_FILE: ""}
            with quiet_exporters():
                # int8 tensors warn of their deprecation once per process, from C++, where Python's filters
                # do not reach when torch.jit.load creates them: spend that one warning here, filtered
                torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            module.eval()
            return Exported(path, fmt, json.loads(extra[META_FILE]), _no_grad(module))
        if fmt == "state-dict":
            return _load_state_dict(path)
        return _load_onnx(path, threads)
    except HwrError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader's failure means the same thing here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HwrError(f"{path} is not a readable hwr-dist export ({first[:160]})") from None


def _no_grad(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return fn(x)
    return run


def _load_state_dict(path: Path) -> Exported:
    from hwr_dist.config import config_from_dict
    from hwr_dist.models import build_model

    with quiet_exporters():
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "meta" not in obj or "state_dict" not in obj:
        raise HwrError(f"{path} is not an hwr-dist state-dict export (no meta and state_dict inside)")
    meta = obj["meta"]
    cfg = config_from_dict(obj["config"])
    model = build_model(cfg.model, len(meta["classes"]), pretrained=False)
    if meta.get("quantization"):
        model = quantize_dynamic_linear(model)
    model.load_state_dict(obj["state_dict"])
    return Exported(path, "state-dict", meta, _no_grad(model.eval()), obj["config"])


def _load_onnx(path: Path, threads: int | None) -> Exported:
    onnx, ort = need_onnx()
    model = onnx.load(str(path))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    if "hwr_export" not in meta:
        raise HwrError(f"{path} is an ONNX file without the hwr-dist metadata; export it with `hwr export`")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {INPUT_NAME: x.detach().float().contiguous().numpy()})[0])

    return Exported(path, "onnx", meta, run)


def need_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise HwrError(ONNX_EXTRA) from None
    return onnx, onnxruntime


def write_export(trained, fmt: str, meta: dict[str, Any], out: Path, module: nn.Module | None = None
                 ) -> nn.Module | None:
    """Write `module` (default: the float model) to `out`; for ONNX, meta["quantization"] asks for
    onnxruntime's dynamic int8. Returns the PyTorch module whose outputs the file must reproduce
    (None for quantised ONNX, which onnxruntime quantises its own way)."""
    reference = (module or trained.model).eval()
    with atomic_path(out) as tmp, quiet_exporters():
        if fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(reference, example_input(trained, 2))
            traced.save(str(tmp), _extra_files={META_FILE: json.dumps(meta, indent=1)})
        elif fmt == "state-dict":
            torch.save({"meta": meta, "config": trained.cfg.to_dict(), "state_dict": reference.state_dict()}, tmp)
        else:
            _write_onnx(trained, trained.model.eval(), bool(meta["quantization"]), meta, tmp)
    return None if fmt == "onnx" and meta["quantization"] else reference


def _write_onnx(trained, model: nn.Module, quantize: bool, meta: dict[str, Any], out: Path) -> None:
    onnx, _ = need_onnx()
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "float.onnx"
        with torch.no_grad():
            torch.onnx.export(model, (example_input(trained, 2),), str(plain), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic_axes(is_sequence(trained)))
        if quantize:
            quantize_onnx_dynamic(plain, Path(tmp) / "int8.onnx")
            plain = Path(tmp) / "int8.onnx"
        graph = onnx.load(str(plain))
    del graph.metadata_props[:]
    for key, value in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    graph.doc_string = f"hwr-dist {meta['model']} ({len(meta['classes'])} classes); see metadata_props"
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(out))


def verify(trained, exported: Exported, reference: nn.Module | None) -> float | None:
    """Run the file on a batch of 5 (not the batch of 2 it was traced with; a sequence model's at each
    of CHECK_WIDTHS, not the width it was traced with) and compare with PyTorch: the largest difference."""
    sequence = is_sequence(trained)
    diffs = []
    for width in CHECK_WIDTHS if sequence else CHECK_WIDTHS[:1]:  # a classifier's input has no width
        x = example_input(trained, 5, seed=1, width=width)
        at = f" at width {width}" if sequence else ""
        got = exported.run(x)
        want_shape = output_shape(trained, 5, width)
        if tuple(got.shape) != want_shape:
            raise HwrError(f"{exported.path} returned shape {tuple(got.shape)} for a batch of 5{at}, "
                           f"expected {want_shape}; the export is broken")
        if not torch.isfinite(got).all():
            raise HwrError(f"{exported.path} returned non-finite outputs{at}; the export is broken")
        if reference is None:
            continue
        with torch.no_grad():
            want = reference(x)
        diff = float((got - want).abs().max())
        if diff > 1e-4 * max(1.0, float(want.abs().max())):
            raise HwrError(f"{exported.path} differs from the PyTorch model by {diff:.2e} on the same input{at}; "
                           "the export is broken")
        diffs.append(diff)
    return max(diffs) if diffs else None
