"""`hwr export`: a checkpoint to a deployable file that carries its own preprocessing contract.

Formats:

* ``torchscript``: a traced TorchScript module; the contract is the ``_extra_files`` entry
  ``hwr_meta.json``.
* ``onnx``: an ONNX graph (opset 17, batch axis dynamic), checked with ``onnx.checker`` and run
  once in onnxruntime against PyTorch; the contract is in ``metadata_props`` (one key per field,
  values JSON-encoded).
* ``state-dict``: ``{"meta": contract, "config": run config, "state_dict": weights}``, plain
  tensors and primitives only, so it loads with ``torch.load(..., weights_only=True)``.

Every format takes normalised float32 images ``[batch, 1, 28, 28]`` and returns logits
``[batch, classes]``. The EMA weights are exported when the run kept them.

``--quantize int8``: dynamic int8 for the dense layers in every format (int8 weights, activations
quantised per batch at run time: PyTorch's ``quantize_dynamic`` on ``nn.Linear``, onnxruntime's
``quantize_dynamic`` on MatMul/Gemm for ONNX); for TorchScript also static int8 convolutions,
calibrated on training images, kept only where they measure faster here at no more than 0.5 points
of accuracy (`choose_int8`). Figures and what was dropped: docs/export.md, bench/quantize.py.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hwr_dist.errors import HwrError

FORMATS = ("torchscript", "onnx", "state-dict")
QUANTIZE = ("int8",)
SUFFIX = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "state-dict": ".state_dict.pt"}
META_FILE = "hwr_meta.json"  # TorchScript _extra_files entry
CONTRACT_VERSION = 1
CALIBRATION = 512  # training images for static int8 scales
OPSET = 17
SIDE = 28
INPUT_NAME, OUTPUT_NAME = "image", "logits"
ONNX_EXTRA = "ONNX export needs the optional packages onnx and onnxruntime: pip install 'hwr-dist[onnx]'"


# --- the contract --------------------------------------------------------------------------------


def contract(trained, fmt: str, quantization: dict[str, Any] | None, ema: bool) -> dict[str, Any]:
    """What a user of the exported file needs to feed it: the preprocessing the model was trained with."""
    from hwr_dist import __version__

    return {
        "hwr_export": CONTRACT_VERSION,
        "format": fmt,
        "model": trained.cfg.model.name,
        "classes": list(trained.classes),
        "input_size": [SIDE, SIDE],
        "input_shape": ["batch", 1, SIDE, SIDE],
        "color": "grayscale",
        "ink": "white on black",
        "mean": trained.mean,
        "std": trained.std,
        "preprocess": "uint8 pixels p (MNIST-style: ink white on black, digit centred by mass in 28x28) "
                      "-> float32 (p / 255 - mean) / std, shape [batch, 1, 28, 28]",
        "output": "logits [batch, classes]; softmax gives probabilities, classes[i] names column i",
        "weights": "ema" if ema else "model",
        "quantization": quantization,
        "data_set": trained.cfg.data.name,
        "source_checkpoint": str(trained.path.resolve()),
        "source_sha256": _sha256(trained.path),
        "producer": f"hwr-dist {__version__}, torch {torch.__version__}",
    }


def dynamic_meta(fmt: str) -> dict[str, Any]:
    tool = ("onnxruntime.quantization.quantize_dynamic (MatMul, Gemm)" if fmt == "onnx"
            else "torch.ao.quantization.quantize_dynamic (nn.Linear)")
    return {"scheme": "int8 dynamic dense", "layers": "dense (Linear)", "weights": "int8, per tensor",
            "activations": "quantised per batch at run time", "tool": tool}


def static_conv_meta(calibration: str) -> dict[str, Any]:
    return {"scheme": "int8 static conv + int8 dynamic dense", "layers": "conv block (static), dense (dynamic)",
            "weights": "int8: conv per channel, dense per tensor",
            "activations": f"conv block: uint8, scales calibrated on {calibration}; dense: quantised per batch",
            "tool": "torch.ao.quantization FX graph mode (x86 backend)"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- exported files back -----------------------------------------------------------------------


@dataclass
class Exported:
    """An exported file loaded in its own runtime (TorchScript, onnxruntime or an nn.Module)."""

    path: Path
    format: str
    meta: dict[str, Any]
    run: Callable[[torch.Tensor], torch.Tensor]  # normalised float32 [N, 1, 28, 28] -> logits [N, C]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 28, 28] -> the float input the contract asks for."""
        return images.unsqueeze(1).float().div(255).sub(self.meta["mean"]).div(self.meta["std"])

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(self.normalise(images)).float().softmax(1)


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
            with _quiet():
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

    with _quiet():
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "meta" not in obj or "state_dict" not in obj:
        raise HwrError(f"{path} is not an hwr-dist state-dict export (no meta and state_dict inside)")
    meta = obj["meta"]
    cfg = config_from_dict(obj["config"])
    model = build_model(cfg.model, len(meta["classes"]), pretrained=False)
    if meta.get("quantization"):
        model = quantize_dynamic_linear(model)
    model.load_state_dict(obj["state_dict"])
    return Exported(path, "state-dict", meta, _no_grad(model.eval()))


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


# --- writing -----------------------------------------------------------------------------------


def need_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise HwrError(ONNX_EXTRA) from None
    return onnx, onnxruntime


@contextlib.contextmanager
def _quiet():
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

    with _quiet():
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def example_input(trained, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, 1, SIDE, SIDE, generator=g)
    return (pixels - trained.mean) / trained.std


@contextlib.contextmanager
def _atomic(out: Path):
    """A temporary path beside `out`, renamed over it only when the writer succeeded."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


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
    with _quiet(), torch.no_grad():
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
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:CALIBRATION]
    calib = train.images[idx].unsqueeze(1).float().div(255).sub(trained.mean).div(trained.std)
    try:
        static = static_conv_dynamic_dense(trained.model, calib)
        with _quiet(), torch.no_grad():
            candidates = {k: torch.jit.trace(m, calib[:2]) for k, m in (("dynamic", dynamic), ("static", static))}
    except Exception as e:  # noqa: BLE001 - FX cannot trace every model; dense-only int8 still works
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        echo(f"int8: dense layers only; static int8 convolutions do not work for this model ({first[:120]})")
        return dynamic, dynamic_meta("torchscript")
    runs = {k: _no_grad(m) for k, m in candidates.items()}
    acc = {k: _accuracy(run, trained.mean, trained.std, test) for k, run in (("float", _no_grad(trained.model)),
                                                                          *runs.items())}
    x1, x256 = example_input(trained, 1), example_input(trained, 256)
    t1: dict[str, list[float]] = {k: [] for k in runs}
    t256: dict[str, list[float]] = {k: [] for k in runs}
    with torch_threads(threads):
        for _ in range(3):  # rounds in turn, so that load from other processes falls on both alike
            for k, run in runs.items():
                t1[k].append(median_ms(lambda: run(x1), 30))
                t256[k].append(median_ms(lambda: run(x256), 3, warmup=1))
    (d1, s1), (d256, s256) = ([statistics.median(t[k]) for k in ("dynamic", "static")] for t in (t1, t256))
    keep = s256 <= 0.9 * d256 and s1 <= 1.05 * d1 and acc["static"] >= acc["float"] - 0.005
    echo(f"int8 static convolutions (calibrated on {len(calib)} {trained.cfg.data.name} training images) vs "
         f"dense-only int8: batch 1 {s1:.3f} vs {d1:.3f} ms, batch 256 {s256:.1f} vs {d256:.1f} ms, "
         f"test accuracy {100 * acc['static']:.2f}% vs {100 * acc['dynamic']:.2f}% (float "
         f"{100 * acc['float']:.2f}%): {'kept' if keep else 'dropped, dense layers only'}")
    if keep:
        return static, static_conv_meta(f"{len(calib)} {trained.cfg.data.name} training images")
    return dynamic, dynamic_meta("torchscript")


def write_export(trained, fmt: str, meta: dict[str, Any], out: Path, module: nn.Module | None = None
                 ) -> nn.Module | None:
    """Write `module` (default: the float model) to `out`; for ONNX, meta["quantization"] asks for
    onnxruntime's dynamic int8. Returns the PyTorch module whose outputs the file must reproduce
    (None for quantised ONNX, which onnxruntime quantises its own way)."""
    reference = (module or trained.model).eval()
    with _atomic(out) as tmp, _quiet():
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
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = Path(tmp) / "int8.onnx"
            quantize_dynamic(str(plain), str(quantized), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
            plain = quantized
        graph = onnx.load(str(plain))
    del graph.metadata_props[:]
    for key, value in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    graph.doc_string = f"hwr-dist {meta['model']} ({len(meta['classes'])} classes); see metadata_props"
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(out))


def verify(trained, exported: Exported, reference: nn.Module | None) -> float | None:
    """Run the file on a batch of 5 (not the batch of 2 it was traced with) and compare with PyTorch."""
    x = example_input(trained, 5, seed=1)
    got = exported.run(x)
    if tuple(got.shape) != (5, len(trained.classes)):
        raise HwrError(f"{exported.path} returned shape {tuple(got.shape)} for a batch of 5, "
                       f"expected (5, {len(trained.classes)}); the export is broken")
    if not torch.isfinite(got).all():
        raise HwrError(f"{exported.path} returned non-finite outputs; the export is broken")
    if reference is None:
        return None
    with torch.no_grad():
        want = reference(x)
    diff = float((got - want).abs().max())
    if diff > 1e-4 * max(1.0, float(want.abs().max())):
        raise HwrError(f"{exported.path} differs from the PyTorch model by {diff:.2e} on the same input; "
                       "the export is broken")
    return diff


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Measure:
    name: str
    bytes: int
    latency_1_ms: float
    latency_256_ms: float
    accuracy: float | None  # on the test split, None when the data set is not here
    count: int = 0


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def accuracy(exported: Exported, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            logits = exported.run(exported.normalise(images[i:i + batch]))
            correct += int((logits.argmax(1) == labels[i:i + batch]).sum())
    return correct / max(1, len(labels))


def _accuracy(run: Callable[[torch.Tensor], torch.Tensor], mean: float, std: float, split) -> float:
    return accuracy(Exported(Path(), "", {"mean": mean, "std": std}, run), split.images, split.labels)


def measure(exported: Exported, name: str, test=None, threads: int = 1, repeats_1: int = 50,
            repeats_256: int = 5) -> Measure:
    """Size of the file, median CPU latency at batch 1 and 256, and accuracy on `test` (a Split)."""
    x1 = torch.randn(1, 1, SIDE, SIDE)
    x256 = torch.randn(256, 1, SIDE, SIDE)
    with torch_threads(threads):
        ms1 = median_ms(lambda: exported.run(x1), repeats_1)
        ms256 = median_ms(lambda: exported.run(x256), repeats_256)
        acc = accuracy(exported, test.images, test.labels) if test is not None else None
    return Measure(name, exported.path.stat().st_size, ms1, ms256, acc, len(test) if test is not None else 0)


def load_split(trained, which: str = "test"):
    """The checkpoint's data set split ("train" or "test"), or None and the reason when it is not here."""
    from hwr_dist.data import load_dataset

    try:
        bundle = load_dataset(trained.cfg.data.name, trained.cfg.data.root, download=False)
    except HwrError as e:
        return None, str(e)
    if bundle.classes != trained.classes:
        return None, f"data set {trained.cfg.data.name} has other classes than the checkpoint"
    return getattr(bundle, which), ""


def print_report(rows: list[Measure], title: str, note: str = "") -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, just in (("model", "left"), ("file bytes", "right"), ("batch 1 ms", "right"),
                      ("batch 256 ms", "right"), ("test accuracy", "right")):
        table.add_column(col, justify=just)
    for r in rows:
        table.add_row(r.name, f"{r.bytes:,}", f"{r.latency_1_ms:.3f}", f"{r.latency_256_ms:.2f}",
                      "n/a" if r.accuracy is None else f"{100 * r.accuracy:.2f}%")
    if len(rows) == 2:
        a, b = rows
        acc = "" if a.accuracy is None or b.accuracy is None else f"{100 * (b.accuracy - a.accuracy):+.2f} points"
        table.add_row("change", f"x{b.bytes / a.bytes:.2f}", f"x{b.latency_1_ms / a.latency_1_ms:.2f}",
                      f"x{b.latency_256_ms / a.latency_256_ms:.2f}", acc)
    console = Console(file=sys.stdout, width=120)
    console.print(table)
    if note:
        console.print(note)


# --- the command -------------------------------------------------------------------------------


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


def default_out(trained, fmt: str, quantize: str | None) -> Path:
    return trained.run_dir / "export" / f"{trained.path.stem}{'-' + quantize if quantize else ''}{SUFFIX[fmt]}"


def export_checkpoint(checkpoint: str | Path, fmt: str = "torchscript", quantize: str | None = None,
                      out: str | Path | None = None, report: bool | None = None, threads: int = 1,
                      echo: Callable[[str], None] = print) -> ExportResult:
    from hwr_dist.checkpoint import load_checkpoint
    from hwr_dist.inference import load_trained

    fmt, quantize = check_options(fmt, quantize)
    trained = load_trained(checkpoint)
    ema = bool(load_checkpoint(trained.path).get("ema"))
    out = Path(out) if out else default_out(trained, fmt, quantize)
    if out.is_dir():
        out = out / default_out(trained, fmt, quantize).name
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
    checked = "" if diff is None else f"; outputs match PyTorch (max difference {diff:.1e})"
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
