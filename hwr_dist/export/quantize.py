"""int8 for `hwr export --quantize int8`: what measured best on CPU here (figures: docs/export.md).

* Dense layers: dynamic int8 in every format (int8 weights, activations quantised per batch at run
  time): PyTorch's ``quantize_dynamic`` on ``nn.Linear``, onnxruntime's ``quantize_dynamic`` on
  MatMul/Gemm for ONNX.
* Convolutions, TorchScript only: static int8, calibrated on training images, kept only where they
  measure faster here at no more than 0.5 points of accuracy (`choose_int8`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import statistics
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hwr_dist.data.loader import normalise
from hwr_dist.errors import HwrError
from hwr_dist.export.contract import dynamic_meta, example_input, static_conv_meta
from hwr_dist.export.measure import accuracy, load_split, median_ms, torch_threads

CALIBRATION = 512  # training images for static int8 scales


@contextlib.contextmanager
def quiet_exporters():
    """torch.ao.quantization, torch.jit and the ONNX exporters warn about their own deprecation."""
    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecations, and TracerWarnings about the fixed 28x28 input shape
        root.setLevel(logging.ERROR)  # onnxruntime's quantizer logs advice through the root logger
        try:
            yield
        finally:
            root.setLevel(level)


def quantize_dynamic_linear(model: nn.Module) -> nn.Module:
    """int8 weights for every nn.Linear, activations quantised per batch (a copy; `model` is kept)."""
    from torch.ao.quantization import quantize_dynamic

    with quiet_exporters():
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def quantize_onnx_dynamic(source: Path, out: Path) -> None:
    """onnxruntime's dynamic int8 for the MatMul and Gemm nodes of the ONNX file `source`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_exporters():
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])


def calibration_images(trained, train) -> torch.Tensor:
    """CALIBRATION images of the training split `train`, seeded, normalised as the model expects."""
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:CALIBRATION]
    return normalise(train.images[idx], trained.mean, trained.std)


def static_conv_dynamic_dense(model: nn.Module, calib: torch.Tensor) -> nn.Module:
    """int8 static for the convolution blocks (conv, batch norm, ReLU, pooling: scales calibrated on
    `calib`), int8 dynamic for the dense layers and the ReLU fused into them; the rest stays float."""
    from torch import fx
    from torch.ao.quantization import QConfigMapping, default_dynamic_qconfig, get_default_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    conv_block = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d,
                  nn.AdaptiveAvgPool2d)
    static = get_default_qconfig("x86")
    mapping = QConfigMapping().set_global(None)
    graph = fx.symbolic_trace(model)
    modules = dict(graph.named_modules())
    dense: set[str] = set()
    convs = 0
    for node in graph.graph.nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        prev = node.args[0] if node.args else None
        after_dense = isinstance(prev, fx.Node) and prev.op == "call_module" and prev.target in dense
        if isinstance(m, nn.Linear) or (after_dense and isinstance(m, nn.ReLU)):
            mapping.set_module_name(node.target, default_dynamic_qconfig)
            dense.add(node.target)
        elif isinstance(m, conv_block):
            mapping.set_module_name(node.target, static)
            convs += isinstance(m, nn.Conv2d)
    if not convs:
        raise HwrError("the model has no nn.Conv2d to quantise statically")
    with quiet_exporters(), torch.no_grad():
        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(copy.deepcopy(model).eval(), mapping, example_inputs=(calib[:2],))
        for i in range(0, len(calib), 64):
            prepared(calib[i:i + 64])
        return convert_fx(prepared).eval()


def choose_int8(trained, echo: Callable[[str], None], threads: int = 1) -> tuple[nn.Module, dict[str, Any]]:
    """TorchScript int8: dynamic dense layers, plus static int8 convolutions where that wins here:
    kept only if, on this CPU, batch 256 is at least 10% faster than dense-only int8, batch 1 is
    not slower, and test accuracy stays within 0.5 points of float."""
    dynamic = quantize_dynamic_linear(trained.model)
    if not any(isinstance(m, nn.Conv2d) for m in trained.model.modules()):
        return dynamic, dynamic_meta("torchscript")
    train, why = load_split(trained, "train")
    test, why_test = load_split(trained, "test")
    if train is None or test is None:
        echo(f"int8: dense layers only; static int8 convolutions need calibration and test images ({why or why_test})")
        return dynamic, dynamic_meta("torchscript")
    calib = calibration_images(trained, train)
    try:
        static = static_conv_dynamic_dense(trained.model, calib)
        with quiet_exporters(), torch.no_grad():
            candidates = {k: torch.jit.trace(m, calib[:2]) for k, m in (("dynamic", dynamic), ("static", static))}
    except Exception as e:  # noqa: BLE001 - FX cannot trace every model; dense-only int8 still works
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        echo(f"int8: dense layers only; static int8 convolutions do not work for this model ({first[:120]})")
        return dynamic, dynamic_meta("torchscript")
    acc = {k: accuracy(replace(trained, model=m), test.images, test.labels)
           for k, m in (("float", trained.model), *candidates.items())}
    x1, x256 = example_input(trained, 1), example_input(trained, 256)
    t1: dict[str, list[float]] = {k: [] for k in candidates}
    t256: dict[str, list[float]] = {k: [] for k in candidates}
    with torch_threads(threads), torch.inference_mode():
        for _ in range(3):  # rounds in turn, so that load from other processes falls on both alike
            for k, m in candidates.items():
                t1[k].append(median_ms(lambda: m(x1), 30))
                t256[k].append(median_ms(lambda: m(x256), 3, warmup=1))
    (d1, s1), (d256, s256) = ([statistics.median(t[k]) for k in ("dynamic", "static")] for t in (t1, t256))
    keep = s256 <= 0.9 * d256 and s1 <= 1.05 * d1 and acc["static"] >= acc["float"] - 0.005
    echo(f"int8 static convolutions (calibrated on {len(calib)} {trained.cfg.data.name} training images) vs "
         f"dense-only int8: batch 1 {s1:.3f} vs {d1:.3f} ms, batch 256 {s256:.1f} vs {d256:.1f} ms, "
         f"test accuracy {100 * acc['static']:.2f}% vs {100 * acc['dynamic']:.2f}% (float "
         f"{100 * acc['float']:.2f}%): {'kept' if keep else 'dropped, dense layers only'}")
    if keep:
        return static, static_conv_meta(f"{len(calib)} {trained.cfg.data.name} training images")
    return dynamic, dynamic_meta("torchscript")
