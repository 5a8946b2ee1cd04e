"""Models, schedules and optimizer plumbing: pure functions, checked without training."""

from __future__ import annotations

import math

import pytest
import torch

from hwr_dist.config import Config
from hwr_dist.errors import HwrError
from hwr_dist.models import MODELS, FineTunable, build_model, load_model_state
from hwr_dist.tasks import SEQUENCE_MODELS
from hwr_dist.train.optim import EMA, build_optimizer, get_lr, set_lr

CLASSIFIERS = sorted(set(MODELS) - set(SEQUENCE_MODELS))


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("classes", [10, 47])
def test_every_model_follows_the_class_count_and_trains(name, classes):
    cfg = Config().model
    cfg.name = name
    torch.manual_seed(0)
    model = build_model(cfg, classes)
    x = torch.randn(4, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (4, classes) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()  # every trainable parameter takes part in the output
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    twin = build_model(cfg, classes)  # a checkpoint's weights load into a fresh build of the same config
    load_model_state(twin, model.state_dict(), "test")
    model.eval(), twin.eval()
    torch.testing.assert_close(twin(x), model(x))
    assert isinstance(model, FineTunable) == (name == "vgg")  # the loop's optional hooks, by type


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_checkpoint_of_another_class_count_is_refused(name):
    cfg = Config().model
    cfg.name = name
    with pytest.raises(HwrError, match="does not fit this model.*shape of"):
        load_model_state(build_model(cfg, 10), build_model(cfg, 26).state_dict(), "ckpt.pt")


def test_small_cnn_is_the_classic_tutorial_net():
    layers = [type(m).__name__ for m in build_model(Config().model, 10)]
    assert layers == ["Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU", "Dropout", "Linear"]


@pytest.mark.parametrize("name", ["onecycle", "cosine", "step", "constant"])
def test_schedules(name):
    cfg = Config().schedule
    cfg.name, cfg.step_epochs = name, 2
    lrs = [get_lr(s, 100, 10, 0.1, cfg) for s in range(100)]
    assert all(lr > 0 or (name == "cosine" and s == 0 and lr >= 0) for s, lr in enumerate(lrs))
    assert max(lrs) == pytest.approx(0.1)
    if name in ("onecycle", "cosine"):
        peak = lrs.index(max(lrs))
        assert peak == 19  # warmup_fraction 0.2 of 100 steps
        assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))  # rises
        assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))  # then falls
        assert lrs[-1] == pytest.approx(0.1 * cfg.min_lr_ratio, rel=0.05)
    if name == "step":
        assert lrs[19] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.01)
    if name == "constant":
        assert set(lrs) == {0.1}


def test_no_weight_decay_on_biases_and_lr_scale():
    cfg = Config()
    model = build_model(cfg.model, 10)
    opt = build_optimizer(model, cfg.optim)
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {0.0, cfg.optim.weight_decay}
    for g in opt.param_groups:
        assert all((p.ndim > 1) == (g["weight_decay"] > 0) for p in g["params"])
    set_lr(opt, 0.5)
    assert all(math.isclose(g["lr"], 0.5) for g in opt.param_groups)


def test_ema_tracks_weights():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(2.0)
    before = ema.state_dict()["weight"].clone()
    ema.update(model)
    torch.testing.assert_close(ema.state_dict()["weight"], before + 1.0)


def test_fast_cnn_stride2_stem_halves_the_image_in_one_conv():
    cfg = Config().model
    cfg.name, cfg.width, cfg.head, cfg.stem = "fast_cnn", 16, "mlp", "stride2"
    model = build_model(cfg, 10)
    first = model[0]
    assert isinstance(first, torch.nn.Conv2d) and first.stride == (2, 2) and first.kernel_size == (4, 4)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in list(model)[:3])  # no full-resolution pooling
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
