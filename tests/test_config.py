"""Config layering and every bad config input: one-line error naming the key, exit code 2."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT, hwr, one_error_line

from hwr_dist.recipes import load as load_config
from hwr_dist.errors import HwrError


def test_layering_defaults_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.5\ntrain:\n  epochs: 7\n")
    assert load_config(f, ["optim.lr=1e-3"]).optim.lr == 0.001
    cfg = load_config(f, ["optim.lr=0.01", "data.augment.rotation=3", "tracking.wandb.tags=[a, b]"])
    assert cfg.optim.lr == 0.01  # override beats file
    assert cfg.train.epochs == 7  # file beats default
    assert cfg.data.augment.rotation == 3.0 and isinstance(cfg.data.augment.rotation, float)
    assert cfg.tracking.wandb.tags == ["a", "b"]
    assert cfg.train.name == "c"  # run name defaults to the file's stem


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(ROOT / "configs" / name)


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=0", "optim.lr: expected a number > 0"),
    ("optim.lr=-1", "optim.lr: expected a number > 0"),
    ("data.batch_size=0", "data.batch_size: expected a positive integer"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps: expected a positive integer"),
    ("model.name=resnet", "model.name: expected one of"),
    ("data.name=cifar", "data.name: expected one of"),
    ("optim.nope=1", "unknown config key 'optim.nope'"),
    ("nope.lr=1", "unknown config key 'nope'"),
    ("data.batch_size=abc", "data.batch_size: expected int"),
    ("train.epochs=1.5", "train.epochs: expected int"),
    ("data.augment=3", "data.augment: expected a section"),
    ("optim.lr", "bad override 'optim.lr'"),
    ("schedule.name=linear", "schedule.name: expected one of"),
    ("train.mixed_precision=fp8", "train.mixed_precision: expected no, bf16, fp16 or null"),
])
def test_bad_override(override, expected):
    with pytest.raises(HwrError) as e:
        load_config(ROOT / "configs" / "default.yaml", [override])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_bad_override_cli_and_module_exit_2():
    """The same error through both entry points: one line on stderr, exit code 2."""
    from conftest import train_module

    for proc in (hwr("config", "show", "configs/default.yaml", "optim.lr=0"),
                 train_module("configs/default.yaml", "optim.lr=0")):
        assert proc.returncode == 2
        assert "optim.lr: expected a number > 0" in one_error_line(proc)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    proc = hwr("config", "show", str(bad))
    assert proc.returncode == 2 and "not valid YAML" in one_error_line(proc)
    proc = hwr("config", "show", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "not found" in one_error_line(proc)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(HwrError, match="must hold a mapping"):
        load_config(notmap)


def test_config_show_round_trips():
    proc = hwr("config", "show", "configs/default.yaml", "optim.lr=0.02")
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["optim"]["lr"] == 0.02 and shown["model"]["name"] == "fast_cnn"
