"""`hwr predict` on real-looking images: photos of digits on paper, MNIST-style files, rows, bad files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import hwr, one_error_line
from paper_images import paper_row, write_paper_digits
from PIL import Image
from test_preprocess import blank_png

from hwr_dist.data import load_dataset


@pytest.fixture(scope="module")
def run_dir(default_run):
    """The session's trained default model (about 98% on the sample's test split)."""
    return default_run[0]


@pytest.fixture(scope="module")
def sample_test():
    return load_dataset("mnist-sample", ".").test


def predict_json(*args: str) -> tuple[int, list[dict]]:
    proc = hwr("predict", *args, "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_paper_digits_read_about_as_well_as_the_originals(run_dir, sample_test, tmp_path):
    from hwr_dist.checkpoint import load_trained

    idx = torch.randperm(len(sample_test), generator=torch.Generator().manual_seed(0))[:100]
    images, labels = sample_test.images[idx], sample_test.labels[idx]
    files = write_paper_digits(images.numpy(), labels.tolist(), tmp_path / "paper")
    sizes = [Image.open(f).size for f, _ in files]
    assert min(w for w, _ in sizes) >= 60 and max(w for w, _ in sizes) <= 300 and len({s for s in sizes}) > 20
    # MNIST-style files too (white on black, 28x28), as a user would save them from a data set
    for n in range(10):
        Image.fromarray(images[n].numpy()).save(tmp_path / "paper" / f"mnist_{n}.png")

    code, results = predict_json(str(run_dir), str(tmp_path / "paper"))
    assert code == 0 and len(results) == 110, results
    by_file = {r["file"]: r for r in results}
    got = [by_file[str(f)]["prediction"] == label for f, label in files]
    model = (load_trained(run_dir).probabilities(images).argmax(1) == labels).float().mean().item()
    paper = sum(got) / len(got)
    assert paper >= model - 0.05, (paper, model)
    mnist = [by_file[str(tmp_path / "paper" / f"mnist_{n}.png")]["prediction"] == str(int(labels[n]))
             for n in range(10)]
    assert sum(mnist) >= 9, mnist
    r = by_file[str(files[0][0])]
    assert len(r["top"]) == 3 and r["top"][0]["class"] == r["prediction"]
    assert r["top"][0]["probability"] >= r["top"][1]["probability"] >= r["top"][2]["probability"]
    assert abs(r["probability"] - r["top"][0]["probability"]) < 1e-6


def test_table_output(run_dir, sample_test, tmp_path):
    files = write_paper_digits(sample_test.images[:3].numpy(), sample_test.labels[:3].tolist(), tmp_path / "dir x",
                               seed=1)
    proc = hwr("predict", str(run_dir), *(str(f) for f, _ in files), COLUMNS="250")  # whole paths on one line
    assert proc.returncode == 0, proc.stderr
    for col in ("file", "prediction", "probability", "top"):
        assert col in proc.stdout
    assert "000.png" in proc.stdout and "002.png" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if re.search(r"\d{3}\.(png|jpg)", line)]
    assert len(rows) == 3
    for row in rows:  # a probability, then three top-3 entries of class and probability
        assert re.search(r"│\s*\d\.\d{3}\s*│", row), row
        assert len(re.findall(r"\S+ \d\.\d\d", row.split("│")[-2])) == 3, row


def test_segment_reads_rows_of_digits(run_dir, sample_test, tmp_path):
    rng = np.random.default_rng(1)
    rows = tmp_path / "rows"
    rows.mkdir()
    truth = {}
    for r in range(10):
        idx = rng.choice(len(sample_test), 5, replace=False)
        path = rows / f"row{r}.png"
        paper_row([sample_test.images[i].numpy() for i in idx], rng).save(path)
        truth[str(path)] = "".join(str(int(sample_test.labels[i])) for i in idx)

    code, results = predict_json(str(run_dir), str(rows), "--segment")
    assert code == 0, results
    read = {r["file"]: r["prediction"] for r in results}
    assert sum(len(read[f]) == 5 for f in truth) >= 9, read  # split into five characters
    assert sum(read[f] == s for f, s in truth.items()) >= 6, (read, truth)  # and read right, mostly
    chars = results[0]["characters"]
    assert len(chars) == len(results[0]["prediction"]) and all(len(c) == 3 for c in chars)


def test_unusable_files_are_skipped_with_a_reason(run_dir, sample_test, tmp_path):
    folder = tmp_path / "mixed"
    good = write_paper_digits(sample_test.images[:2].numpy(), sample_test.labels[:2].tolist(), folder)
    (folder / "notes.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (120, 90), (230, 230, 225)).save(folder / "blank.png")
    blank_png(folder / "huge.png", 8000, 6000)  # 48 megapixels in a few kilobytes
    data = good[0][0].read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    (folder / "readme.txt").write_text("folders may hold other files; they are not images and are left out")

    code, results = predict_json(str(run_dir), str(folder), str(tmp_path / "missing.png"))
    assert code == 2  # some inputs were unusable; the others were still read
    errors = {r["file"].rsplit("/", 1)[-1]: r["error"] for r in results if "error" in r}
    assert set(errors) == {"notes.png", "empty.jpg", "blank.png", "huge.png", "truncated.png", "missing.png"}
    assert "not an image" in errors["notes.png"] and "empty" in errors["empty.jpg"]
    assert "one colour" in errors["blank.png"] and "huge" in errors["huge.png"]
    assert "truncated" in errors["truncated.png"] and "does not exist" in errors["missing.png"]
    assert {r["file"] for r in results if "prediction" in r} == {str(f) for f, _ in good}

    proc = hwr("predict", str(run_dir), str(folder / "blank.png"), str(good[1][0]), COLUMNS="250")
    assert proc.returncode == 2 and "skipped" in proc.stdout and "one colour" in one_error_line(proc)
    assert "001.jpg" in proc.stdout and "Traceback" not in proc.stderr


def test_predict_errors_are_one_line(run_dir, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    proc = hwr("predict", str(tmp_path / "bad.pt"), str(tmp_path))
    assert proc.returncode == 2 and "corrupt" in one_error_line(proc)
    (tmp_path / "only.txt").write_text("x")
    proc = hwr("predict", str(run_dir), str(tmp_path))
    assert proc.returncode == 2 and "no image files" in one_error_line(proc)
