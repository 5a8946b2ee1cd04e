"""VGG fine-tuning: the gray fold, weight sources, freezing, the feature cache, unfreezing, errors.

Kept fast on 2 CPU cores: vgg11 at input 32 on a 120 + 30 image MNIST subset written as IDX
files (data.name=mnist, data.root=<tmp>), a few optimizer steps per run.
"""

from __future__ import annotations

import gzip
import json
import socket
import struct

import pytest
import torch
from conftest import hwr, one_error_line, train_module

from hwr_dist.recipes import load as load_config
from hwr_dist.data import load_dataset
from hwr_dist.errors import HwrError
from hwr_dist.models.pretrained import build_vgg, load_into
from hwr_dist.models.vgg import IMAGENET_MEAN, IMAGENET_STD, VGG

MEAN, STD = 0.1307, 0.3081


def _write_idx(path, t: torch.Tensor) -> None:
    code = 0x08  # unsigned byte
    header = struct.pack(">I", (code << 8) | t.ndim) + b"".join(struct.pack(">I", d) for d in t.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + t.contiguous().numpy().tobytes())


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    """120 training and 30 test digits (every class) from the built-in sample, as an `mnist` root."""
    root = tmp_path_factory.mktemp("tiny_mnist")
    sample = load_dataset("mnist-sample", "data")
    for name, split, n in (("train", sample.train, 120), ("t10k", sample.test, 30)):
        pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:n]  # the files are sorted by class
        _write_idx(root / f"{name}-images-idx3-ubyte.gz", split.images[pick])
        _write_idx(root / f"{name}-labels-idx1-ubyte.gz", split.labels[pick].to(torch.uint8))
    return root


def base(root, out, **extra) -> list[str]:
    args = {"data.name": "mnist", "data.root": root, "data.batch_size": 54, "data.eval_batch_size": 200,
            "data.augment.enabled": False, "model.name": "vgg", "model.variant": "vgg11", "model.input_size": 32,
            "model.dropout": 0.0, "train.epochs": 1, "train.log_every": 1, "train.out_dir": out,
            "schedule.name": "constant", "optim.lr": 0.003}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def tv_features(variant: str) -> torch.nn.Sequential:
    """torchvision's own RGB feature extractor, randomly initialised."""
    from torchvision.models.vgg import cfgs, make_layers

    plans = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}
    return make_layers(cfgs[plans[variant.removesuffix("_bn")]], batch_norm=variant.endswith("_bn"))


def tv_state(variant: str) -> dict[str, torch.Tensor]:
    """A torchvision-layout state dict (features.*; the 480 MB classifier is left out: the linear
    head does not use it, and building it takes seconds)."""
    return {f"features.{k}": v for k, v in tv_features(variant).state_dict().items()}


def params(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


# --- the gray fold ---------------------------------------------------------------------


def test_folded_gray_conv_equals_rgb_model_on_repeated_gray_image():
    torch.manual_seed(0)
    rgb = tv_features("vgg11_bn").eval()
    for m in rgb.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
            m.bias.data.normal_()
    model = VGG("vgg11_bn", 10, input_size=32).eval()
    load_into(model, {f"features.{k}": v for k, v in rgb.state_dict().items()}, "test")
    model.set_input_norm(MEAN, STD)
    pixels = torch.rand(3, 1, 28, 28)
    pixels[0] = 0  # black borders: zero padding differs between the two spaces
    x = (pixels - MEAN) / STD  # what the loop feeds the model
    rgb_mean, rgb_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    ref = (pixels.repeat(1, 3, 1, 1) - rgb_mean) / rgb_std
    ref = torch.nn.functional.interpolate(ref, size=32, mode="bilinear", align_corners=False)
    with torch.no_grad():
        conv1 = model.features[0](model.resize(x))
        assert model.features[0].weight.shape == (64, 1, 3, 3)
        torch.testing.assert_close(conv1, rgb[0](ref), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(model.features(model.resize(x)), rgb(ref), atol=1e-4, rtol=1e-4)


# --- weight sources ----------------------------------------------------------------------


def test_torchvision_weights_from_the_hub_cache(tmp_path, monkeypatch):
    torch.manual_seed(1)
    state = tv_state("vgg11")
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / "vgg11-8a719046.pth")  # the file name torchvision expects
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = load_config(None, ["model.name=vgg", "model.weights=IMAGENET1K_V1"]).model
    model = build_vgg(cfg, 10)
    assert "torchvision vgg11 IMAGENET1K_V1" in model.weights_note and "new head" in model.weights_note
    own = model.state_dict()
    for k, v in state.items():
        if k != "features.0.weight":
            assert torch.equal(own[k], v), k
    w = state["features.0.weight"]
    folded = (w / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)).sum(1, keepdim=True)
    torch.testing.assert_close(own["features.0.weight"], folded)


def test_plain_state_dicts_rgb_and_own_layout(tmp_path):
    torch.manual_seed(3)
    rgb = tmp_path / "rgb.pt"
    torch.save(tv_state("vgg11"), rgb)
    a = build_vgg(load_config(None, ["model.name=vgg", f"model.weights={rgb}"]).model, 10)
    assert a.features[0].weight.shape == (64, 1, 3, 3)
    own = tmp_path / "own.pt"
    torch.save(a.state_dict(), own)
    b = build_vgg(load_config(None, ["model.name=vgg", f"model.weights={own}"]).model, 10)
    assert "head loaded" in b.weights_note
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


# --- training: freezing, cache, unfreezing, tool checkpoints --------------------------------


@pytest.fixture(scope="module")
def frozen_run(tiny_mnist, tmp_path_factory):
    """A real `python -m hwr_dist.train` run: vgg11_bn from a plain state dict, all but the last
    block frozen, augmentation (so no cache), weight decay and EMA on."""
    tmp = tmp_path_factory.mktemp("frozen")
    torch.manual_seed(4)
    source = VGG("vgg11_bn", 10, input_size=32)
    for m in source.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
    torch.save(source.state_dict(), tmp / "source.pt")
    proc = train_module("configs/vgg_finetune_sample.yaml", *base(tiny_mnist, tmp / "runs", **{
        "model.variant": "vgg11_bn", "model.weights": tmp / "source.pt", "model.freeze": "features",
        "model.trainable_blocks": 1, "data.augment.enabled": True, "train.max_steps": 2,
        "optim.weight_decay": 0.1, "train.ema_decay": 0.5, "train.name": "frozen"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp / "runs" / "frozen" / "checkpoints" / "last.pt", weights_only=True)
    return source, ckpt


def test_frozen_parameters_stay_bit_unchanged(frozen_run):
    source, ckpt = frozen_run
    before = source.state_dict()
    last_block = source.blocks[-1]
    for state in (ckpt["model"], ckpt["ema"]):
        for k, v in state.items():
            if k.startswith("features.") and int(k.split(".")[1]) < last_block.start and "data_" not in k:
                assert torch.equal(v, before[k]), k  # weights and batch-norm statistics alike
    changed = [k for k, v in ckpt["model"].items() if not torch.equal(v, before[k])]
    assert any(k.startswith(f"features.{last_block.start}.") for k in changed)
    assert any(k.startswith("head.") for k in changed)
    assert ckpt["model"]["features.0.data_mean"] != 0  # the data set's normalisation went in


def test_tool_checkpoint_as_weights_other_head_is_replaced(frozen_run, tmp_path):
    _, ckpt = frozen_run
    path = tmp_path / "tool.pt"
    torch.save(ckpt, path)
    same = build_vgg(load_config(None, ["model.name=vgg", "model.variant=vgg11_bn", f"model.weights={path}"]).model, 10)
    assert "checkpoint" in same.weights_note and "head loaded" in same.weights_note
    assert torch.equal(same.state_dict()["head.classifier.1.weight"], ckpt["ema"]["head.classifier.1.weight"])
    other = build_vgg(load_config(None, ["model.name=vgg", "model.variant=vgg11_bn", "model.head=mlp",
                                         f"model.weights={path}"]).model, 26)
    assert "new head" in other.weights_note
    assert torch.equal(other.state_dict()["features.8.weight"], ckpt["ema"]["features.8.weight"])


def _train_in_process(overrides: list[str]) -> dict:
    from hwr_dist.train.run import run_training

    return run_training(load_config(None, overrides), quiet=True)


def test_cache_and_no_cache_give_the_same_head(tiny_mnist, tmp_path):
    heads = {}
    for mode in ("on", "off"):
        _train_in_process(base(tiny_mnist, tmp_path, **{"model.freeze": "features", "model.cache_features": mode,
                                                        "train.name": mode, "train.seed": 5}))
        ckpt = torch.load(tmp_path / mode / "checkpoints" / "last.pt", weights_only=True)
        heads[mode] = params(ckpt["model"], "head.")
        assert ckpt["state"]["epoch"] == 1
    assert list((tmp_path / "on" / "feature_cache").glob("*.pt"))
    assert not (tmp_path / "off" / "feature_cache").exists()
    for k in heads["on"]:
        torch.testing.assert_close(heads["on"][k], heads["off"][k], atol=1e-5, rtol=1e-4)


def test_cache_key_changes_with_weights_input_size_and_data():
    from hwr_dist.data.loader import DeviceData
    from hwr_dist.train.feature_cache import cache_key

    torch.manual_seed(6)
    images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
    data = DeviceData(images, torch.zeros(8, dtype=torch.long), MEAN, STD)
    model = VGG("vgg11", 10, 32)
    key = cache_key(model, data, "no")
    assert cache_key(model, data, "no") == key
    assert cache_key(VGG("vgg11", 10, 64), data, "no") != key
    other = images.clone()
    other[0, 0, 0] ^= 1
    assert cache_key(model, DeviceData(other, data.labels, MEAN, STD), "no") != key
    with torch.no_grad():
        model.features[3].weight[0, 0, 0, 0] += 1e-3
    changed = cache_key(model, data, "no")
    assert changed != key
    model.head.classifier[1].weight.data += 1  # the head is not part of the cached features
    assert cache_key(model, data, "no") == changed


def test_gradual_unfreezing_after_cached_head_epochs(tiny_mnist, tmp_path):
    """Epoch 1 trains the head on cached features; from epoch 2 the whole network trains."""
    _train_in_process(base(tiny_mnist, tmp_path, **{"model.freeze": "features", "model.unfreeze_after_epochs": 1,
                                                    "model.backbone_lr_scale": 0.5, "train.epochs": 2,
                                                    "checkpoint.every_steps": 2, "train.name": "gradual"}))
    folder = tmp_path / "gradual" / "checkpoints"
    epoch1 = torch.load(folder / "step-00000002.pt", weights_only=True)
    last = torch.load(folder / "last.pt", weights_only=True)
    assert last["state"]["step"] == 4
    assert (tmp_path / "gradual" / "feature_cache").is_dir()
    for k, v in params(epoch1["model"], "features.").items():
        if "data_" not in k:
            assert not torch.equal(v, last["model"][k]), f"{k} did not train after unfreezing"
    # the optimizer held every parameter from the start: the backbone groups run at half the rate
    groups = last["optimizer"]["param_groups"]
    assert sorted(g["lr_scale"] for g in groups) == [0.5, 0.5, 1.0, 1.0]


# --- bad inputs ---------------------------------------------------------------------------


def test_unknown_variant_fails_with_exit_code_2():
    proc = hwr("config", "show", "configs/vgg_finetune_sample.yaml", "model.variant=vgg12")
    assert proc.returncode == 2
    assert "model.variant" in one_error_line(proc) and "vgg11_bn" in proc.stderr


@pytest.mark.parametrize("overrides, words", [
    (["model.input_size=28"], "model.input_size"),
    (["model.weights=IMAGENET2"], "model.weights"),
    (["model.trainable_blocks=2"], "model.freeze=features"),
    (["model.cache_features=on", "model.freeze=features"], "data.augment.enabled=false"),
])
def test_bad_config_values(overrides, words):
    with pytest.raises(HwrError, match=words.replace(".", r"\.")) as e:
        load_config(None, ["model.name=vgg", *overrides])
    assert "\n" not in str(e.value)


def test_input_too_small_for_the_model_itself():
    with pytest.raises(HwrError, match="too small"):
        VGG("vgg11", 10, input_size=16)


def test_missing_weights_offline_says_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "create_connection", offline)
    with pytest.raises(HwrError) as e:
        build_vgg(load_config(None, ["model.name=vgg", "model.weights=IMAGENET1K_V1"]).model, 10)
    msg = str(e.value)
    assert "vgg11-8a719046.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg and "\n" not in msg


def test_mismatched_keys_are_listed(tmp_path):
    path = tmp_path / "vgg13.pt"
    torch.save(tv_state("vgg13"), path)
    with pytest.raises(HwrError, match=r"does not fit vgg11 \(.*(missing|unexpected|shape).*features\.") as e:
        build_vgg(load_config(None, ["model.name=vgg", f"model.weights={path}"]).model, 10)
    assert "\n" not in str(e.value)
    cnn = tmp_path / "cnn.pt"
    torch.save({"0.weight": torch.zeros(32, 1, 3, 3), "0.bias": torch.zeros(32)}, cnn)
    with pytest.raises(HwrError, match="missing features.0.weight.*unexpected 0.weight"):
        build_vgg(load_config(None, ["model.name=vgg", f"model.weights={cnn}"]).model, 10)
    with pytest.raises(HwrError, match="not found"):
        build_vgg(load_config(None, ["model.name=vgg", f"model.weights={tmp_path / 'nope.pt'}"]).model, 10)


def test_finetune_report_compares_three_policies(tiny_mnist, tmp_path):
    from hwr_dist.commands.compare_finetuning import compare_finetuning as finetune_report

    weights = tmp_path / "w.pt"
    torch.save(tv_state("vgg11"), weights)
    cfg = load_config(None, base(tiny_mnist, tmp_path / "runs", **{"model.weights": weights, "train.max_steps": 1,
                                                                   "train.name": "rep"}))
    report = finetune_report(cfg, json_out=True)
    assert list(report["runs"]) == ["head", "full", "scratch"]
    saved = json.loads((tmp_path / "runs" / "rep-finetune-report.json").read_text())
    assert saved["runs"]["head"]["trainable_parameters"] < saved["runs"]["full"]["trainable_parameters"]
    assert saved == json.loads(json.dumps(report))  # the file holds what was returned
    assert [r["steps"] for r in saved["runs"].values()] == [1, 1, 1]  # same budget for every policy
    # head and full start from the same weights and the same new head; scratch from random weights
    assert saved["runs"]["head"]["test_accuracy_before"] == saved["runs"]["full"]["test_accuracy_before"]
    assert saved["runs"]["scratch"]["weights"] == "none" and saved["runs"]["full"]["weights"] == str(weights)
