"""`hwr predict`, `hwr evaluate` and `hwr export` on a sequence model (CRNN + CTC): scans of numbers
laid out like the training strings, greedy, beam and pattern readings, the run's split rebuilt for
evaluation, ONNX and TorchScript exports that read any width."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hwr, one_error_line
from PIL import Image, ImageOps

from hwr_dist import recipes
from hwr_dist.checkpoint import load_trained
from hwr_dist.commands.evaluate import evaluate_checkpoint
from hwr_dist.commands.export import export_checkpoint
from hwr_dist.commands.predict import check_options, predict_files, reading, text_probability
from hwr_dist.config import StringsConfig
from hwr_dist.data import load_dataset
from hwr_dist.data.digit_strings import render_string
from hwr_dist.data.preprocess import LineLayout, line_image, line_layout
from hwr_dist.errors import HwrError
from hwr_dist.export.formats import load_exported
from hwr_dist.export.use import load_any

HAVE_ONNX = bool(importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"))
EVAL_SIZE = 40


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A CRNN barely trained on digit strings (it reads little or nothing: the plumbing is under test)."""
    from hwr_dist.train.run import run_training

    out = tmp_path_factory.mktemp("sequence")
    cfg = recipes.load("configs/digit_strings.yaml", [
        "train.max_steps=3", "data.strings.train_size=96", f"data.strings.eval_size={EVAL_SIZE}",
        "data.batch_size=8", f"data.eval_batch_size={EVAL_SIZE}", "model.width=8", "model.hidden=32",
        f"train.out_dir={out}", "train.name=seq"])
    run_training(cfg, quiet=True)
    return out / "seq"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("mnist-sample", ".").test


def scan(line: torch.Tensor, zoom: int = 3, pad: int = 40) -> Image.Image:
    """A rendered string as a scan would hold it: dark ink on light paper, larger, in a wide margin."""
    ink = Image.fromarray(255 - line.numpy()).resize((line.shape[1] * zoom, line.shape[0] * zoom),
                                                      Image.Resampling.BILINEAR)
    page = Image.new("L", (ink.width + 3 * pad, ink.height + 2 * pad), 255)
    page.paste(ink, (pad, pad))
    return page


@pytest.fixture(scope="module")
def number(digits) -> torch.Tensor:
    """Five test digits as DigitStrings draws a string: uint8 [32, W], white on black."""
    return render_string(digits.images[:5], [3, 1, 4, 2], StringsConfig())


@pytest.fixture(scope="module")
def lines(number, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lines")
    scan(number).save(folder / "number.png")
    scan(number[:, : number.shape[1] // 2], zoom=2).save(folder / "half.png")
    return folder


# --- preprocessing ---------------------------------------------------------------------------


def test_line_image_lays_a_scan_out_like_the_training_strings(number):
    layout = line_layout(recipes.load("configs/digit_strings.yaml"))
    assert layout.height == 32 and 0.6 < layout.ink < 0.8
    got = line_image(scan(number), layout)
    assert got.dtype == torch.uint8 and got.shape[0] == 32
    assert abs(got.shape[1] - number.shape[1]) <= 0.15 * number.shape[1]  # the aspect kept, the same size

    def rows(t: torch.Tensor) -> tuple[int, int]:
        r = (t > 0).any(1).nonzero().flatten()
        return int(r[0]), int(r[-1])

    (top, bottom), (want_top, want_bottom) = rows(got), rows(number)
    assert abs(top - want_top) <= 2 and abs(bottom - want_bottom) <= 2
    cols = (got > 0).any(0).nonzero().flatten()
    assert int(cols[0]) == layout.margin and int(cols[-1]) == got.shape[1] - 1 - layout.margin
    assert got.max() == 255 and torch.median(got.float()) == 0  # white ink on black
    light = line_image(ImageOps.invert(scan(number)), layout)  # a chalkboard: the same line
    assert light.shape == got.shape and (light.float() - got.float()).abs().mean() < 2


def test_line_image_refuses_blank_and_needle_images():
    with pytest.raises(HwrError, match="no ink found in blank.png"):
        line_image(Image.new("L", (200, 60), 128), LineLayout(32, 0.7), "blank.png")
    needle = Image.new("L", (1600, 400), 255)
    needle.paste(0, (10, 200, 1590, 201))  # one pixel tall, 1580 wide
    with pytest.raises(HwrError, match="crop the image to the text"):
        line_image(needle, LineLayout(32, 0.7), "needle.png")


# --- reading ---------------------------------------------------------------------------------


def frames(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_text_probability_sums_the_alignments():
    # Every frame: blank 0.6, 'a' 0.4. "" has one path (0.36); "a" three (0.16 + 0.24 + 0.24).
    logits = frames([[0.6, 0.4], [0.6, 0.4]])
    assert text_probability(logits, "", ["a"]) == pytest.approx(0.36, abs=1e-5)
    assert text_probability(logits, "a", ["a"]) == pytest.approx(0.64, abs=1e-5)


def test_pattern_picks_the_best_matching_reading():
    """Four sure digits and a fifth that is less likely than a blank: greedy reads four, \\d{5} five."""
    alphabet = [str(d) for d in range(10)]
    sure = [[0.001] * 11 for _ in range(5)]
    for k, d in enumerate([1, 2, 3, 4]):
        sure[k][d + 1] = 0.99
    sure[4][0], sure[4][6] = 0.6, 0.39
    logits = frames(sure)
    assert reading(logits, alphabet, None, None)["text"] == "1234"
    assert reading(logits, alphabet, 8, None)["text"] == "1234"
    got = reading(logits, alphabet, 16, r"\d{5}")
    assert got["text"] == "12345" and got["matches_pattern"] is True
    assert got["probability"] == pytest.approx(text_probability(logits, "12345", alphabet), abs=1e-4)
    assert reading(logits, alphabet, 16, r"[a-z]+")["matches_pattern"] is False  # no reading can match


def test_options_that_do_not_fit_the_model():
    sequence = types.SimpleNamespace(task="sequence", path=Path("seq.pt"), architecture="crnn",
                                     classes=[str(d) for d in range(10)])
    classifier = types.SimpleNamespace(task="classification", path=Path("cls.pt"), architecture="fast_cnn")
    with pytest.raises(HwrError, match="--top-k ranks a classifier's classes; seq.pt holds a crnn sequence"):
        check_options(sequence, 3, False, None, None)
    with pytest.raises(HwrError, match="--segment cuts a row"):
        check_options(sequence, None, True, None, None)
    for beam, pattern in ((4, None), (None, r"\d+")):
        with pytest.raises(HwrError, match="--beam and --pattern search a sequence model's readings; cls.pt"):
            check_options(classifier, None, False, beam, pattern)
    check_options(sequence, None, False, 4, r"\d{5}")
    check_options(classifier, 3, True, None, None)


# --- hwr predict -----------------------------------------------------------------------------


def test_predict_prints_the_text_of_each_line(run_dir, lines, tmp_path):
    proc = hwr("predict", str(run_dir), str(lines), COLUMNS="250")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"┃ file\s+┃ text\s+┃ probability ┃", proc.stdout), proc.stdout
    for name in ("number.png", "half.png"):
        assert re.search(rf"{name}\s+│ \d*\s+│ [01]\.\d{{3}}", proc.stdout), proc.stdout

    Image.new("RGB", (120, 40), (230, 230, 225)).save(tmp_path / "blank.png")
    proc = hwr("predict", str(run_dir), str(lines / "number.png"), str(tmp_path / "blank.png"), "--json",
               "--beam", "4")
    assert proc.returncode == 2 and "one colour" in one_error_line(proc)  # the blank one; the other is read
    rows = json.loads(proc.stdout)
    assert set(rows[0]) == {"file", "text", "probability"} and rows[0]["file"].endswith("number.png")
    assert re.fullmatch(r"\d*", rows[0]["text"]) and 0 <= rows[0]["probability"] <= 1
    assert "one colour" in rows[1]["error"]


def test_predict_pattern_and_its_errors(run_dir, lines):
    proc = hwr("predict", str(run_dir), str(lines / "number.png"), "--json", "--pattern", r"\d{5}")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    # even a barely trained model answers five digits: the search follows the pattern
    assert row["matches_pattern"] and re.fullmatch(r"\d{5}", row["text"]), row
    proc = hwr("predict", str(run_dir), str(lines / "number.png"), "--pattern", r"(\d)\1")
    assert proc.returncode == 2 and "groupref" in one_error_line(proc)

    proc = hwr("predict", str(run_dir), str(lines / "number.png"), "--pattern", r"(\d")
    assert proc.returncode == 2 and "--pattern '(\\d' is not a regular expression" in one_error_line(proc)
    proc = hwr("predict", str(run_dir), str(lines / "number.png"), "--segment")
    assert proc.returncode == 2 and "leave --segment out" in one_error_line(proc)


# --- hwr evaluate ----------------------------------------------------------------------------


def test_evaluate_rebuilds_the_runs_lines(run_dir, tmp_path):
    proc = hwr("evaluate", str(run_dir), "--out", str(tmp_path))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    got = json.loads((tmp_path / "eval_test" / "metrics.json").read_text())
    want = json.loads((run_dir / "eval_test" / "metrics.json").read_text())  # the run's own final test
    assert got["task"] == "sequence" and got["count"] == EVAL_SIZE
    for key in ("sequence_accuracy", "cer", "length_accuracy", "loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key  # float sums in another order
    assert (tmp_path / "eval_test" / "worst.png").exists()  # a barely trained model reads them all wrong

    summary = evaluate_checkpoint(run_dir, "val", tmp_path, None)
    assert summary["split"] == "val" and summary["count"] == EVAL_SIZE and 0 <= summary["cer"]
    assert (tmp_path / "eval_val" / "metrics.json").exists()


# --- hwr export ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_reads_any_width_like_the_checkpoint(fmt, run_dir, lines, tmp_path, capsys):
    if fmt == "onnx" and not HAVE_ONNX:
        pytest.skip("onnx and onnxruntime are not installed")
    trained = load_trained(run_dir)
    result = export_checkpoint(run_dir, fmt, out=tmp_path / f"seq.{fmt}", echo=lambda line: None)
    meta = result.meta
    assert meta["task"] == "sequence" and meta["model"] == "crnn" and meta["classes"] == trained.classes
    assert meta["input_height"] == 32 and meta["input_shape"] == ["batch", 1, 32, "width"]
    assert (meta["mean"], meta["std"]) == (trained.mean, trained.std) and result.max_diff < 1e-4

    exported = load_exported(result.path)
    for batch, width in ((2, 45), (1, 130)):
        x = torch.randn(batch, 1, 32, width)
        with torch.no_grad():
            want = trained.model(x)
        got = exported.run(x)
        assert got.shape == want.shape == (batch, math.ceil(width / 4), len(trained.classes) + 1)
        assert (got - want).abs().max() < 1e-4

    def read(model) -> list[dict]:
        assert predict_files(model, [lines], None, True, False) == 0
        return json.loads(capsys.readouterr().out)

    want, got = read(run_dir), read(result.path)
    assert [g["text"] for g in got] == [w["text"] for w in want]
    assert np.allclose([g["probability"] for g in got], [w["probability"] for w in want], atol=2e-4)

    with pytest.raises(HwrError, match="evaluate the checkpoint it came from"):
        evaluate_checkpoint(result.path, "test", tmp_path, None)
    assert load_any(result.path).layout == load_any(run_dir).layout


def test_export_refuses_int8_and_the_report(run_dir, tmp_path):
    with pytest.raises(HwrError, match="--quantize int8 is for classifiers.*export it in float32"):
        export_checkpoint(run_dir, "state-dict", "int8", out=tmp_path / "q.pt", echo=lambda line: None)
    with pytest.raises(HwrError, match="leave --report out"):
        export_checkpoint(run_dir, "state-dict", out=tmp_path / "r.pt", report=True, echo=lambda line: None)
    assert not list(tmp_path.iterdir())


# --- hwr serve ---------------------------------------------------------------------------------


def test_serve_reads_a_number_like_predict(run_dir, lines):
    """`hwr serve` with a sequence model: each image is one line, answered with the text `hwr predict` reads."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from hwr_dist.serve.app import create_app

    with TestClient(create_app(run_dir)) as client:
        info = client.get("/v1/model").json()
        assert info["input"]["task"] == "sequence" and info["input"]["shape"][2] == 32
        data = (lines / "number.png").read_bytes()
        answer = client.post("/v1/predict?include_input=true", content=data, headers={"content-type": "image/png"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        trained = load_trained(run_dir)
        line = line_image(Image.open(lines / "number.png"), line_layout(trained.cfg))
        expected = reading(load_any(run_dir).line_logits(line), trained.classes, None, None)
        assert body["prediction"] == expected["text"] and body["top"] is None
        assert body["probability"] == pytest.approx(expected["probability"], abs=1e-4)
        assert body["input"][0].startswith("data:image/png;base64,")
        batch = client.post("/v1/predict/batch", files=[("files", ("a.png", data, "image/png"))] * 2)
        assert batch.status_code == 200 and [r["prediction"] for r in batch.json()["results"]] == [body["prediction"]] * 2
        blank = io.BytesIO()
        Image.new("L", (90, 30), 240).save(blank, format="PNG")
        refused = client.post("/v1/predict", content=blank.getvalue(), headers={"content-type": "image/png"})
        assert refused.status_code in (400, 422) and "error" in refused.json()
