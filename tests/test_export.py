"""`hwr export`: TorchScript, ONNX and state-dict round trips, the metadata contract, int8 quantisation;
`hwr predict` and `hwr evaluate` on the exported files."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from conftest import hwr, one_error_line, run

from hwr_dist.checkpoint import load_trained, resolve_checkpoint
from hwr_dist.commands.export import export_checkpoint
from hwr_dist.data import load_dataset
from hwr_dist.data.loader import normalise
from hwr_dist.errors import HwrError
from hwr_dist.export.contract import SUFFIX
from hwr_dist.export.formats import load_exported
from hwr_dist.export.measure import accuracy
from hwr_dist.export.use import load_any

HAVE_ONNX = bool(importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"))


@pytest.fixture(scope="module")
def run_dir(default_run):
    """The session's trained default model (about 98% on the sample's test split)."""
    return default_run[0]


@pytest.fixture(scope="module")
def trained(run_dir):
    return load_trained(run_dir)


@pytest.fixture(scope="module")
def test_split():
    return load_dataset("mnist-sample", ".").test


def check_contract(meta: dict, trained, fmt: str) -> None:
    ckpt = torch.load(trained.path, map_location="cpu", weights_only=True)
    assert meta["format"] == fmt and meta["model"] == "fast_cnn"
    assert meta["classes"] == [str(d) for d in range(10)] == trained.classes
    assert meta["input_size"] == [28, 28] and meta["color"] == "grayscale" and meta["ink"] == "white on black"
    assert (meta["mean"], meta["std"]) == pytest.approx(tuple(float(v) for v in ckpt["norm"]))
    assert meta["source_checkpoint"] == str(resolve_checkpoint(trained.path).resolve())
    assert meta["weights"] == "model" and meta["data_set"] == "mnist-sample" and len(meta["source_sha256"]) == 64


def logits(trained, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return trained.model(normalise(images, trained.mean, trained.std))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trip(run_dir, trained, test_split, tmp_path):
    out = tmp_path / "model.pt"
    proc = hwr("export", str(run_dir), "--format", "torchscript", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "outputs match PyTorch" in proc.stdout
    extra = {"hwr_meta.json": ""}
    module = torch.jit.load(str(out), _extra_files=extra)  # plain TorchScript, no hwr-dist needed
    meta = json.loads(extra["hwr_meta.json"])
    check_contract(meta, trained, "torchscript")
    assert meta["quantization"] is None
    images = test_split.images[:7]  # not the batch size it was traced with
    x = images.unsqueeze(1).float().div(255).sub(meta["mean"]).div(meta["std"])  # the documented contract, spelled out
    with torch.no_grad():
        assert torch.allclose(module(x), logits(trained, images), atol=1e-5)


def test_onnx_round_trip(run_dir, trained, test_split, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    result = export_checkpoint(run_dir, "onnx", out=out, echo=lambda line: None)
    assert result.path == out and result.max_diff < 1e-4
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    check_contract(meta, trained, "onnx")
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # a dynamic batch axis
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 33):
        images = test_split.images[:n]
        x = images.unsqueeze(1).float().div(255).sub(meta["mean"]).div(meta["std"]).numpy()
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x})[0])
        assert torch.allclose(got, logits(trained, images), atol=1e-4), (got - logits(trained, images)).abs().max()


def test_state_dict_loads_with_weights_only(run_dir, trained, test_split, tmp_path):
    from hwr_dist.config import config_from_dict
    from hwr_dist.models import build_model

    out = tmp_path / "weights.pt"
    export_checkpoint(run_dir, "state-dict", out=out, echo=lambda line: None)
    obj = torch.load(out, map_location="cpu", weights_only=True)
    check_contract(obj["meta"], trained, "state-dict")
    model = build_model(config_from_dict(obj["config"]).model, len(obj["meta"]["classes"]), pretrained=False)
    model.load_state_dict(obj["state_dict"])
    images = test_split.images[:16]
    with torch.no_grad():
        assert torch.equal(model.eval()(normalise(images, trained.mean, trained.std)), logits(trained, images))


def test_int8_keeps_accuracy_and_shrinks_the_file(run_dir, trained, test_split, tmp_path):
    float_acc = (trained.probabilities(test_split.images).argmax(1) == test_split.labels).float().mean().item()
    assert float_acc >= 0.95, float_acc  # a decent model, or the comparison says little

    out = tmp_path / "int8.pt"
    proc = hwr("export", str(run_dir), "--quantize", "int8", "--out", str(out), COLUMNS="200")
    assert proc.returncode == 0, proc.stderr
    for word in ("file bytes", "batch 1 ms", "batch 256 ms", "test accuracy", "float32 torchscript",
                 "int8 torchscript", "change", "1000 images"):
        assert word in proc.stdout, proc.stdout
    assert "int8 static convolutions" in proc.stdout  # measured, then kept or dropped with the figures
    exported = load_exported(out)
    assert exported.meta["quantization"]["scheme"].startswith("int8")
    acc = accuracy(exported, test_split.images, test_split.labels)
    assert abs(acc - float_acc) <= 0.005, (acc, float_acc)
    float_bytes = sum(p.numel() * 4 for p in trained.model.parameters())
    # int8 weights are a quarter, plus the TorchScript archive's own ~40 KB, and the convolutions stay
    # float when static int8 costs accuracy (a few KB here): a float export would be over 100%
    assert out.stat().st_size < 0.35 * float_bytes

    fmts = [("state-dict", "int8.sd.pt")]
    if HAVE_ONNX:
        fmts.append(("onnx", "int8.onnx"))
    for fmt, name in fmts:
        lines = []
        export_checkpoint(run_dir, fmt, "int8", tmp_path / name, report=False, echo=lines.append)
        assert len(lines) == 1 and "int8 dynamic dense" in lines[0], lines
        exported = load_exported(tmp_path / name)
        assert abs(accuracy(exported, test_split.images, test_split.labels) - float_acc) <= 0.005, fmt
        if fmt == "state-dict":
            obj = torch.load(tmp_path / name, map_location="cpu", weights_only=True)
            assert obj["meta"]["quantization"]["scheme"] == "int8 dynamic dense"


def test_ema_weights_are_exported(run_dir, trained, test_split, tmp_path):
    """A run that kept an EMA exports the EMA weights, and says so."""
    ckpt = torch.load(resolve_checkpoint(run_dir), map_location="cpu", weights_only=True)
    ckpt["ema"] = {k: v * 0.5 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "ema.pt")
    out = tmp_path / "ema.torchscript.pt"
    lines = []
    export_checkpoint(tmp_path / "ema.pt", out=out, echo=lines.append)
    assert "EMA weights" in lines[0], lines
    exported = load_exported(out)
    assert exported.meta["weights"] == "ema"
    halved = load_trained(tmp_path / "ema.pt")
    images = test_split.images[:5]
    assert torch.allclose(exported.run(normalise(images, exported.mean, exported.std)), logits(halved, images),
                          atol=1e-5)
    assert not torch.allclose(logits(halved, images), logits(trained, images), atol=1e-3)


def test_bad_inputs_are_one_line_errors(run_dir, tmp_path):
    proc = hwr("export", str(run_dir), "--format", "tflite")
    assert proc.returncode == 2 and "'tflite' is not one of" in one_error_line(proc)
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    proc = hwr("export", str(tmp_path / "corrupt.pt"), "--format", "state-dict")
    assert proc.returncode == 2 and "corrupt" in one_error_line(proc)
    # onnx and onnxruntime not installed: None in sys.modules makes their import fail
    code = ("import sys; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None; "
            "from hwr_dist.cli import main; sys.argv = ['hwr'] + sys.argv[1:]; main()")
    proc = run([sys.executable, "-c", code, "export", str(run_dir), "--format", "onnx"])
    assert proc.returncode == 2 and "pip install 'hwr-dist[onnx]'" in one_error_line(proc)
    assert not (run_dir / "export" / "best.onnx").exists()
    with pytest.raises(HwrError, match="unknown quantisation 'int4'"):
        export_checkpoint(run_dir, "torchscript", "int4")
    with pytest.raises(HwrError, match="not found"):
        export_checkpoint(tmp_path / "missing.pt")


# --- what `hwr export` wrote, used by `hwr predict` and `hwr evaluate` ----------------------------


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    """The fixture's model as float TorchScript, int8 TorchScript, int8 state dict and float ONNX files."""
    folder = tmp_path_factory.mktemp("exports")
    wanted = [("torchscript", None), ("torchscript", "int8"), ("state-dict", "int8")] + [("onnx", None)] * HAVE_ONNX
    return {(fmt, q): export_checkpoint(run_dir, fmt, q, folder / f"model-{q or 'float'}{SUFFIX[fmt]}",
                                        report=False, echo=lambda line: None).path for fmt, q in wanted}


def test_predict_takes_exported_files(run_dir, exports, test_split, tmp_path, capsys):
    """The same predictions as the checkpoint: equal for float files, one difference at most for int8."""
    from PIL import Image

    from hwr_dist.commands.predict import predict_files

    for i in range(40):  # every 25th test digit: all ten classes
        Image.fromarray(test_split.images[25 * i].numpy()).save(tmp_path / f"{i:02d}.png")

    def predictions(model) -> list[dict]:
        assert predict_files(model, [tmp_path], 3, True, False) == 0
        return json.loads(capsys.readouterr().out)

    want = predictions(run_dir)
    for (fmt, quantize), path in exports.items():
        assert load_any(path).source == fmt
        got = predictions(path)
        assert [g["file"] for g in got] == [w["file"] for w in want]
        same = sum(g["prediction"] == w["prediction"] for g, w in zip(got, want))
        if quantize:
            assert same >= len(want) - 1, (fmt, same)
        else:
            assert same == len(want), fmt
            assert all(abs(g["probability"] - w["probability"]) <= 5e-4 for g, w in zip(got, want)), fmt
    if HAVE_ONNX:
        proc = hwr("predict", str(exports["onnx", None]), str(tmp_path / "00.png"), COLUMNS="200")
        assert proc.returncode == 0 and f"00.png │ {want[0]['prediction']} " in proc.stdout, proc.stdout + proc.stderr


def test_evaluate_takes_exported_files(run_dir, exports, tmp_path):
    """`hwr evaluate FILE`: the checkpoint's confusion matrix for float files, its accuracy within
    0.5 points for int8; --split val where the file carries the run's config, a clear error where not."""
    want = json.loads((run_dir / "eval_test" / "metrics.json").read_text())  # the checkpoint's, from training
    for (fmt, quantize), path in exports.items():
        out = None if fmt == "torchscript" and not quantize else tmp_path / f"{fmt}-{quantize}"
        proc = hwr("evaluate", str(path), *(["--out", str(out)] if out else []))
        assert proc.returncode == 0 and "Warning" not in proc.stderr, proc.stderr  # int8 TorchScript: none
        report = out or path.with_name(f"{path.name}-report")  # default: beside the file, one folder per file
        got = json.loads((report / "eval_test" / "metrics.json").read_text())
        assert got["count"] == want["count"] == 1000
        if quantize:
            assert abs(got["accuracy"] - want["accuracy"]) <= 0.005, (fmt, got["accuracy"], want["accuracy"])
        else:
            assert got["confusion"] == want["confusion"], fmt
    proc = hwr("evaluate", str(exports["state-dict", "int8"]), "--split", "val", "--out", str(tmp_path))
    assert proc.returncode == 0 and json.loads((tmp_path / "eval_val" / "metrics.json").read_text())["count"] == 400
    proc = hwr("evaluate", str(exports["torchscript", None]), "--split", "val")
    assert proc.returncode == 2 and "--split val needs the run's data.val_fraction" in one_error_line(proc)
