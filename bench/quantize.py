"""Float vs int8: file size, CPU latency (batch 1 and 256) and test accuracy of the exported files.

    python bench/quantize.py [CHECKPOINT_OR_RUN_DIR] [--threads 1] [--rounds 3] [--json OUT.json]

Without a checkpoint it first trains the default config for 6 epochs (about 20 s on 2 cores).
Variants, each measured through the exported file in its own runtime:

* float32 / int8 dynamic (dense layers): what `hwr export --quantize int8` writes;
* TorchScript, int8 static conv + dynamic dense: what `hwr export --format torchscript --quantize
  int8` writes when it wins on this CPU (it measures and decides at export time);
* int8 static everything: calibrated on 512 training images; PyTorch FX graph mode (x86 backend)
  for TorchScript, onnxruntime's quantize_static (QDQ, per-channel) for ONNX. Measured only,
  `hwr export` does not write it (see docs/export.md for why).

Latencies are medians over all timed calls of `--rounds` interleaved rounds (variants take turns,
so that load from other processes falls on all of them alike).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from hwr_dist.checkpoint import load_trained  # noqa: E402
from hwr_dist.export.contract import META_FILE, SUFFIX, contract, dynamic_meta, example_input  # noqa: E402
from hwr_dist.export.formats import load_exported, write_export  # noqa: E402
from hwr_dist.export.measure import Measure, accuracy, load_split, print_report, torch_threads  # noqa: E402
from hwr_dist.export.quantize import (CALIBRATION, calibration_images, quantize_dynamic_linear,  # noqa: E402
                                      quiet_exporters, static_conv_dynamic_dense, static_conv_meta)

ROOT = Path(__file__).resolve().parent.parent


def train_default(folder: Path) -> Path:
    print("no checkpoint given: training configs/default.yaml for 6 epochs ...", flush=True)
    subprocess.run([sys.executable, "-m", "hwr_dist.train", str(ROOT / "configs" / "default.yaml"), "train.epochs=6",
                    f"train.out_dir={folder}", "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return folder / "default"


def static_all_torchscript(trained, calib: torch.Tensor, out: Path) -> None:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with quiet_exporters(), torch.no_grad():
        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(copy.deepcopy(trained.model).eval(), get_default_qconfig_mapping("x86"),
                              example_inputs=(calib[:2],))
        for i in range(0, len(calib), 64):
            prepared(calib[i:i + 64])
        quantized = convert_fx(prepared)
        traced = torch.jit.trace(quantized, calib[:2])
        meta = contract(trained, "torchscript", {"scheme": "int8 static", "layers": "conv and dense",
                                                 "tool": "torch FX x86"}, False)
        traced.save(str(out), _extra_files={META_FILE: json.dumps(meta)})


def static_onnx(trained, calib: torch.Tensor, float_onnx: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": calib[i:i + 64].numpy()} for i in range(0, len(calib), 64)])

        def get_next(self):
            return next(self.batches, None)

    with quiet_exporters():
        quantize_static(str(float_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    model = onnx.load(str(out))  # the quantiser drops metadata_props: copy the contract over
    source = onnx.load(str(float_onnx))
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    onnx.save(model, str(out))


def timed(run, x: torch.Tensor, n: int) -> list[float]:
    run(x)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t) * 1000)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="a .pt file or a run directory (default: train one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--formats", default="torchscript,onnx")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trained = load_trained(args.checkpoint or train_default(tmp / "runs"))
        test, why = load_split(trained, "test")
        if test is None:
            sys.exit(f"error: cannot measure accuracy: {why}")
        calib = calibration_images(trained, load_split(trained, "train")[0])  # found: the test split loaded
        variants: list[tuple[str, Path]] = []
        for fmt in args.formats.split(","):
            plain, dyn, conv, static = (tmp / f"{k}{SUFFIX[fmt]}" for k in ("float", "int8", "conv", "static"))
            write_export(trained, fmt, contract(trained, fmt, None, False), plain)
            dense = quantize_dynamic_linear(trained.model) if fmt != "onnx" else None
            write_export(trained, fmt, contract(trained, fmt, dynamic_meta(fmt), False), dyn, dense)
            variants += [(f"float32 {fmt}", plain), (f"int8 dynamic dense {fmt}", dyn)]
            if fmt == "torchscript":
                write_export(trained, fmt, contract(trained, fmt, static_conv_meta("calibration"), False), conv,
                             static_conv_dynamic_dense(trained.model, calib))
                static_all_torchscript(trained, calib, static)
                variants += [(f"int8 static conv + dyn. dense {fmt}", conv), (f"int8 static all {fmt}", static)]
            elif fmt == "onnx":
                static_onnx(trained, calib, plain, static)
                variants.append((f"int8 static all (QDQ) {fmt}", static))

        loaded = {name: load_exported(path, args.threads) for name, path in variants}
        x1, x256 = example_input(trained, 1), example_input(trained, 256)
        t1: dict[str, list[float]] = {n: [] for n in loaded}
        t256: dict[str, list[float]] = {n: [] for n in loaded}
        with torch_threads(args.threads):
            for _ in range(args.rounds):
                for name, ex in loaded.items():
                    t1[name] += timed(ex.run, x1, 100)
                    t256[name] += timed(ex.run, x256, 8)
            rows = [Measure(name, path.stat().st_size, statistics.median(t1[name]), statistics.median(t256[name]),
                            accuracy(loaded[name], test.images, test.labels), len(test))
                    for name, path in variants]

    print_report(rows, f"{trained.path}: CPU, {args.threads} thread(s), torch {torch.__version__}, "
                       f"median of {args.rounds} rounds",
                 f"accuracy: {trained.cfg.data.name} test split, {len(test)} images; "
                 f"static variants calibrated on {CALIBRATION} training images")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))


if __name__ == "__main__":
    main()
