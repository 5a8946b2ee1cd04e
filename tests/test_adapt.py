"""The shipped digit model, adapting it (freezing, normalisation), few-shot sampling, the few-shot report.

Kept fast on 2 CPU cores: a generated folder of 10 classes x (12 train + 3 test) digits, written
from the built-in sample as dark-on-light 32x32 PNGs; runs of a few optimizer steps.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hwr, one_error_line
from PIL import Image

from hwr_dist.checkpoint import load_checkpoint
from hwr_dist.config import Config
from hwr_dist.data import DIGITS, load_dataset
from hwr_dist.data.splits import Split, limit_per_class, training_splits
from hwr_dist.data.loader import normalise, pixel_stats
from hwr_dist.errors import HwrError
from hwr_dist.models import FineTunable, build_model
from hwr_dist.models.pretrained import BUILTIN
from hwr_dist.recipes import load

BUILTIN_SAMPLE_ACCURACY = 0.99  # README, "Adapting the shipped digit model"


@pytest.fixture(scope="module")
def sample():
    return load_dataset("mnist-sample", "unused")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sample):
    """root/train/<digit>/ (12 each) and root/test/<digit>/ (3 each), dark ink on light paper."""
    root = tmp_path_factory.mktemp("digits")
    for split, source, n in (("train", sample.train, 12), ("test", sample.test, 3)):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True)
            for i, img in enumerate(source.images[source.labels == c][:n]):
                page = Image.fromarray(255 - img.numpy()).resize((32, 32), Image.Resampling.BICUBIC)
                page.save(root / split / str(c) / f"{i}.png")
    return root


def adapt_args(root, out, *extra: str) -> list[str]:
    return ["configs/adapt_own.yaml", f"data.root={root}", f"train.out_dir={out}", "train.log_every=1", *extra]


# --- the shipped weights -------------------------------------------------------------------


def test_builtin_weights_are_plain_data_and_read_the_sample(sample):
    assert BUILTIN.stat().st_size < 5_000_000
    shipped = torch.load(BUILTIN, map_location="cpu", weights_only=True)
    meta = shipped["meta"]
    assert meta["classes"] == DIGITS and meta["data_set"] == "mnist-sample"
    cfg = load(None, ["model.name=fast_cnn", "model.width=16", "model.head=mlp", "model.weights=builtin"])
    model = build_model(cfg.model, 10).eval()
    assert "head loaded" in model.weights_note
    with torch.no_grad():
        logits = model(normalise(sample.test.images, meta["mean"], meta["std"]))
    accuracy = (logits.argmax(1) == sample.test.labels).float().mean().item()
    assert accuracy >= BUILTIN_SAMPLE_ACCURACY, accuracy


@pytest.mark.parametrize("overrides, words", [
    (["model.name=small_cnn"], "model.name=fast_cnn model.width=16"),
    (["model.name=fast_cnn", "model.width=8"], "model.width=16"),
    (["model.name=fast_cnn", "model.pool_first=true"], "model.pool_first=false"),
    (["model.name=vgg"], "model.weights"),
])
def test_builtin_refused_for_another_network(overrides, words):
    with pytest.raises(HwrError, match=words) as e:
        load(None, [*overrides, "model.weights=builtin"])
    assert "\n" not in str(e.value)


def test_the_normalisation_of_the_weights_is_folded_into_the_first_layer(sample):
    """A model fed data normalised its own way computes what the source model computes on
    source-normalised data: exactly for small_cnn (no padding), up to the padded border for fast_cnn."""
    x = sample.test.images[:64]
    cases = (("small_cnn", False, 1e-4), ("fast_cnn", False, 0.05), ("fast_cnn", True, 0.05))
    for name, pool_first, tolerance in cases:
        cfg = Config().model
        cfg.name, cfg.freeze, cfg.pool_first = name, "features", pool_first
        torch.manual_seed(0)
        source = build_model(cfg, 10).eval()
        model = build_model(cfg, 10).eval()
        model.load_state_dict(source.state_dict())
        model.source_norm = (0.13, 0.31)
        model.set_input_norm(0.2, 0.4)
        with torch.no_grad():
            want, got = source(normalise(x, 0.13, 0.31)), model(normalise(x, 0.2, 0.4))
        assert (got - want).abs().max() <= tolerance * want.abs().max(), name


# --- few-shot sampling ---------------------------------------------------------------------


def test_limit_per_class_is_stratified_seeded_and_nested(sample):
    ten = limit_per_class(sample.train, 10, seed=3, classes=DIGITS)
    assert ten.labels.bincount(minlength=10).tolist() == [10] * 10
    assert torch.equal(limit_per_class(sample.train, 10, seed=3, classes=DIGITS).images, ten.images)
    assert not torch.equal(limit_per_class(sample.train, 10, seed=4, classes=DIGITS).images, ten.images)
    five = limit_per_class(sample.train, 5, seed=3, classes=DIGITS)
    rows = {bytes(img.numpy()) for img in ten.images}
    assert all(bytes(img.numpy()) in rows for img in five.images)  # K=5 is part of K=10
    assert limit_per_class(sample.train, None, seed=3, classes=DIGITS) is sample.train


def test_the_validation_split_is_carved_from_the_k_images(sample):
    cfg = load(None, ["data.limit_per_class=10", "data.val_fraction=0.2"])
    train, val = training_splits(sample, cfg.data, seed=0)
    assert train.labels.bincount().tolist() == [8] * 10 and val.labels.bincount().tolist() == [2] * 10


def test_bad_limits_are_refused(folder, tmp_path):
    assert Config().data.limit_per_class is None  # every image
    for k in (0, -1, 1.5):
        proc = hwr("config", "show", "configs/adapt_own.yaml", f"data.limit_per_class={k}")
        assert proc.returncode == 2 and "data.limit_per_class" in one_error_line(proc)
    proc = hwr("train", *adapt_args(folder, tmp_path, "data.limit_per_class=13"))
    assert proc.returncode == 2
    assert "data.limit_per_class=13 but class '0' has only 12 training images" in one_error_line(proc)
    with pytest.raises(HwrError, match="class 'b' has only 1"):
        limit_per_class(Split(torch.zeros(3, 28, 28, dtype=torch.uint8), torch.tensor([0, 0, 1])), 2, 0, ["a", "b"])


# --- adapting ------------------------------------------------------------------------------


def test_frozen_backbone_then_everything_at_a_lower_rate(folder, tmp_path):
    proc = hwr("train", *adapt_args(folder, tmp_path, "train.epochs=2", "checkpoint.keep_epochs=true",
                                    "model.freeze=features", "model.unfreeze_after_epochs=1",
                                    "model.backbone_lr_scale=0.25"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights from the shipped digit model (builtin); head loaded" in proc.stderr
    assert "epoch 2: the whole network trains from now on" in proc.stderr
    shipped = torch.load(BUILTIN, map_location="cpu", weights_only=True)
    first, last = (load_checkpoint(tmp_path / "adapt_own" / "checkpoints" / f) for f in ("epoch-001.pt", "last.pt"))
    # the second conv (4.*) is frozen in epoch 1 and trains in epoch 2; the head trains in both
    assert torch.equal(first["model"]["4.weight"], shipped["state_dict"]["4.weight"])
    assert not torch.equal(last["model"]["4.weight"], first["model"]["4.weight"])
    assert not torch.equal(first["model"]["12.weight"], shipped["state_dict"]["12.weight"])
    assert sorted(g["lr_scale"] for g in last["optimizer"]["param_groups"]) == [0.25, 0.25, 1.0, 1.0]
    # the run's own normalisation is the folder's; the first conv was rescaled to it
    assert last["norm"][0] != pytest.approx(shipped["meta"]["mean"])
    assert not torch.equal(first["model"]["0.weight"], shipped["state_dict"]["0.weight"])


def test_a_frozen_backbone_stays_unchanged(folder, tmp_path):
    cfg = load("configs/adapt_own.yaml", [f"data.root={folder}", "model.freeze=features",
                                          "model.unfreeze_after_epochs=0"])
    model = build_model(cfg.model, 10)
    assert isinstance(model, FineTunable)
    model.set_input_norm(*pixel_stats(load_dataset("imagefolder", folder).train.images))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.SGD([p for _, _, ps in model.param_groups() for _, p in ps], lr=0.1)
    model(torch.randn(8, 1, 28, 28)).logsumexp(1).sum().backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    # the head alone: the backbone's weights and its batch-norm statistics stay as shipped
    assert changed and all(int(k.split(".")[0]) > model.backbone_len for k in changed)


def test_few_shot_report(folder, tmp_path):
    proc = hwr("compare-finetuning", *adapt_args(folder, tmp_path, "train.max_steps=1", "train.name=fs"),
               "--shots", "20,2", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert [r["per_class"] for r in report["rows"]] == [2, "all"]  # K=2: no image left to validate on
    assert report["config"]["skipped_shots"] == [20] and 0 <= report["as_is_test_accuracy"] <= 1
    assert all(r[k]["steps"] >= 1 for r in report["rows"] for k in ("adapted", "scratch"))
    assert (tmp_path / "fs-finetune-report.png").stat().st_size > 0
    saved = json.loads((tmp_path / "fs-finetune-report.json").read_text())
    assert saved["rows"] == report["rows"]
    proc = hwr("compare-finetuning", *adapt_args(folder, tmp_path, "train.name=fs"), "--shots", "0")
    assert proc.returncode == 2 and "--shots" in one_error_line(proc)
