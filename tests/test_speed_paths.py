"""The fast paths train correctly on the CPU (no timing asserted here: see bench/RESULTS.md), the
step makes no host sync, and the GPU path's choices (device-side indices, fused AdamW, the
speedrun's settings) are taken where they should be."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, train_module

from hwr_dist.allocator import glibc, user_setting
from hwr_dist.recipes import load as load_config
from hwr_dist.data.loader import ShardedBatches
from hwr_dist.train.optim import build_optimizer

sys.path.insert(0, str(ROOT / "bench"))

QUICK = ["model.name=fast_cnn", "model.width=8", "model.head=mlp", "model.dropout=0", "data.batch_size=64",
         "train.epochs=1", "train.max_steps=40", "train.log_every=10", "optim.lr=0.01", "data.augment.enabled=false"]


def trained(tmp_path: Path, *overrides: str) -> dict:
    proc = train_module("configs/default.yaml", *QUICK, f"train.out_dir={tmp_path}", "train.name=r", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "r"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("fast", [["model.channels_last=true"], ["train.mixed_precision=bf16"],
                                  ["model.channels_last=true", "train.mixed_precision=bf16"],
                                  ["model.channels_last=true", "model.pool_first=true"]],
                         ids=["channels_last", "bf16", "channels_last+bf16", "channels_last+pool_first"])
def test_fast_options_train(tmp_path, fast):
    summary = trained(tmp_path, *fast)
    assert summary["test_accuracy"] > 0.6  # 40 steps of a tiny net on the sample: ~85-90%


def test_compiled_model_trains_and_its_checkpoint_loads(tmp_path):
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler (none on PATH)")
    summary = trained(tmp_path, "model.compile=true", "model.channels_last=true")
    assert summary["test_accuracy"] > 0.6
    from hwr_dist.checkpoint import load_trained

    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "best.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    load_trained(tmp_path / "r" / "checkpoints" / "best.pt")  # a plain model loads it


def test_the_bare_module_is_the_trained_one_without_its_wrappers():
    from hwr_dist.train.setup import build_model_and_optimizer

    cfg = load_config(None, QUICK + ["model.compile=true"])
    data = SimpleNamespace(classes=list("0123456789"), train=SimpleNamespace(mean=0.1, std=0.3))
    acc = SimpleNamespace(device=torch.device("cpu"), prepare=lambda *objs, device_placement: objs)
    model, bare, _, _ = build_model_and_optimizer(cfg, acc, data, pretrained=False)
    assert getattr(model, "_orig_mod", None) is bare  # state_dict keys without the `_orig_mod.` prefix
    assert not any(k.startswith("_orig_mod.") for k in bare.state_dict())


def test_training_never_imports_the_compiler(tmp_path):
    """torch.optim's methods import torch._dynamo (1.7 s of start-up) unless built by build_optimizer;
    a run, its checkpoints and a resume from them never need it."""
    code = ("import sys; from hwr_dist.train.run import main; args = sys.argv[1:]; main(args); "
            "main(args + ['train.max_steps=8', 'train.resume=auto', 'train.resume_changes=accept']); "
            "print('loaded' if 'torch._dynamo' in sys.modules else 'not loaded')")
    args = ["configs/default.yaml", *QUICK, "train.max_steps=4", "checkpoint.every_steps=2",
            f"train.out_dir={tmp_path}", "train.name=r", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["not", "loaded"]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 8


def three_steps(*pairs: tuple[torch.nn.Module, torch.optim.Optimizer]) -> None:
    """Three optimizer steps of each (net, optimizer) pair on the same batch."""
    x = torch.randn(16, 5)
    for _ in range(3):
        for net, opt in pairs:
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_the_optimizers_step_and_checkpoint_as_torch_optims_own(name):
    """The same updates as torch.optim's class, and state dicts that load into it and back."""
    cfg = load_config(None, [f"optim.name={name}", "optim.weight_decay=0.01", "optim.momentum=0.9"]).optim
    torch.manual_seed(0)
    ours_net, theirs_net = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    theirs_net.load_state_dict(ours_net.state_dict())
    ours = build_optimizer(ours_net, cfg)
    theirs_cls = type(ours).__mro__[1]
    assert theirs_cls is getattr(torch.optim, {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[name])
    theirs = theirs_cls([{**{k: v for k, v in g.items() if k != "params"}, "params": [p]}  # the same settings
                         for g, p in zip(ours.param_groups, theirs_net.parameters())])
    three_steps((ours_net, ours), (theirs_net, theirs))
    torch.testing.assert_close(ours_net.weight, theirs_net.weight)
    assert ours_net.weight.grad_fn is None and not torch.equal(ours_net.weight, torch.zeros(3, 5))
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]


SYNCING = ["item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy", "nonzero"]


def test_a_training_step_never_waits_for_the_device(tmp_path, monkeypatch):
    """Every call that reads a tensor back to the host (a sync on CUDA) counted over steps between
    log points: none in the step, the batch gather, augmentation (all kinds on) or grad clipping."""
    from accelerate.state import AcceleratorState

    from hwr_dist.train.loop import train_step
    from hwr_dist.train.setup import setup

    AcceleratorState._reset_state(True)
    cfg = load_config(ROOT / "configs" / "default.yaml", [
        *QUICK, f"train.out_dir={tmp_path}", "optim.grad_clip=1.0", "data.augment.enabled=true",
        "data.augment.elastic_alpha=2", "data.augment.erasing=0.5", "train.ema_decay=0.9", "model.channels_last=true"])
    run = setup(cfg, quiet=True)
    windows = list(run.batches.batches(0))[:4]
    assert all(w.device == run.acc.device for w in windows)
    calls = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            # The optimizers' step counters are host tensors by design (torch.optim keeps `step` on
            # the CPU unless fused/capturable, precisely so that reading it never syncs): not counted.
            caller = sys._getframe(1).f_code.co_filename
            if not (self.device.type == "cpu" and f"torch{os.sep}optim" in caller):
                calls.append(f"{_name} from {Path(caller).name}")
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    try:
        losses = [train_step(run, [w], want_norm=False) for w in windows]
        assert calls == [], f"host syncs in a training step: {calls}"
        _, norm = train_step(run, [windows[0]], want_norm=True)  # a log point reads the norm back
        assert any(c.startswith("__float__") for c in calls) and norm is not None and math.isfinite(norm)
    finally:
        monkeypatch.undo()
        run.tracker.finish("completed")
        AcceleratorState._reset_state(True)
    assert all(torch.isfinite(loss) for loss, _ in losses)


def test_batch_indices_live_on_the_training_device():
    cpu = ShardedBatches(1000, 64, seed=3)
    meta = ShardedBatches(1000, 64, seed=3, device="meta")
    a, b = list(cpu.batches(2)), list(meta.batches(2))
    assert all(x.device.type == "cpu" for x in a) and all(x.device.type == "meta" for x in b)
    assert [len(x) for x in a] == [len(x) for x in b]
    assert torch.equal(torch.cat(a).sort().values, torch.arange(1000))  # still a permutation, same as before


def test_fused_adamw_on_cpu_takes_the_per_tensor_step():
    """The fused kernel is used on CPU parameters too, and computes the per-tensor loop's update."""
    cfg = load_config(None, ["optim.weight_decay=0.01"]).optim
    torch.manual_seed(0)
    fused_net, plain_net = torch.nn.Linear(5, 3, bias=False), torch.nn.Linear(5, 3, bias=False)
    plain_net.load_state_dict(fused_net.state_dict())
    fused = build_optimizer(fused_net, cfg)
    plain = torch.optim.AdamW(plain_net.parameters(), lr=cfg.lr, betas=(cfg.momentum, cfg.beta2),
                              weight_decay=cfg.weight_decay, foreach=False)
    assert fused.param_groups[0]["fused"] is True and not plain.param_groups[0]["fused"]
    three_steps((fused_net, fused), (plain_net, plain))
    assert not torch.equal(fused_net.weight, torch.zeros(3, 5))
    torch.testing.assert_close(fused_net.weight, plain_net.weight)


def test_pool_first_pools_before_the_batch_norm():
    from torch import nn

    from hwr_dist.models import build_model

    cfg = load_config(None, ["model.name=fast_cnn", "model.pool_first=true"]).model
    net = build_model(cfg, 10)
    kinds = [type(m) for m in net][:8]
    assert kinds == [nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU] * 2
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_evaluation_feeds_a_channels_last_model_its_own_layout():
    from hwr_dist.data.loader import DeviceData
    from hwr_dist.evaluate import evaluate, input_format
    from hwr_dist.models import build_model

    cfg = load_config(None, ["model.name=fast_cnn", "model.width=8"]).model
    torch.manual_seed(0)
    net = build_model(cfg, 10).eval()
    data = DeviceData(torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (300,)), 0.2, 0.3)
    plain = evaluate(net, data, 10, 128, worst_k=5)
    assert input_format(net) == torch.contiguous_format
    net = net.to(memory_format=torch.channels_last)
    assert input_format(net) == torch.channels_last
    fast = evaluate(net, data, 10, 128, worst_k=5)
    assert torch.equal(fast.confusion, plain.confusion) and math.isclose(fast.loss, plain.loss, rel_tol=1e-5)


def test_speedrun_chooses_the_gpu_path_only_on_cuda():
    from gpu_speedrun import speedrun_overrides

    assert speedrun_overrides("cuda", smoke=False) == []  # the recipe as configured: bf16, compile, ...
    smoke = speedrun_overrides("cpu", smoke=True)
    assert "train.device=cpu" in smoke and "model.compile=false" in smoke and "data.name=mnist-sample" in smoke
    assert "model.compile=true" in speedrun_overrides("cpu", smoke=True, compile_on_cpu=True)
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        speedrun_overrides("cpu", smoke=False)
    gpu = load_config(ROOT / "configs" / "fast_mnist_gpu.yaml")
    assert (gpu.train.mixed_precision, gpu.model.channels_last, gpu.model.compile, gpu.train.device) == \
        ("bf16", True, True, "cuda")
    assert 60000 % gpu.data.batch_size == 0  # no short last batch: one compiled shape
    assert gpu.data.val_fraction == 0


@pytest.mark.parametrize("name", ["fast_sample", "fast_fashion", "cnn_fashion", "cnn_mnist", "fast_mnist_gpu",
                                  "fast_mnist_gpu_995"])
def test_shipped_recipes_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    from hwr_dist.models import build_model

    model = build_model(cfg.model, 10)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_keep_epochs_and_epoch_rows_without_validation(tmp_path):
    proc = train_module("configs/default.yaml", *QUICK, "train.max_steps=0", "train.epochs=2",
                        "data.val_fraction=0", "checkpoint.keep_epochs=true", f"train.out_dir={tmp_path}",
                        "train.name=r", "data.batch_size=500")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("epoch-*.pt")) == ["epoch-001.pt", "epoch-002.pt"]
    from time_to_accuracy import epoch_end_times

    assert sorted(epoch_end_times(tmp_path / "r")) == [1, 2]


ALLOCATION_PROBE = """
import ctypes, json
import torch
from hwr_dist.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.empty(4 << 20, dtype=torch.uint8)  # 4 MiB: the size of a small CNN's activation for one batch
mapped = libc.mallinfo2().hblkhd - before
del x
print(json.dumps({"applied": applied, "mapped": mapped, "kept": libc.mallinfo2().fordblks}))
"""


@pytest.mark.skipif(not glibc(), reason="glibc's allocator only")
@pytest.mark.parametrize("user_env", [{}, {"MALLOC_MMAP_THRESHOLD_": "131072"}])
def test_tensor_memory_stays_in_the_heap_unless_the_user_chose_otherwise(user_env):
    """A freed activation stays in the heap for the next step, not mapped afresh (page faults and
    zero-filling every step); an allocator setting of the user's own is left as it is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    proc = subprocess.run([sys.executable, "-c", ALLOCATION_PROBE], env={**env, **user_env}, capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    if user_env:
        assert probe["applied"] is False and probe["mapped"] >= 4 << 20
    else:
        assert probe["applied"] is True and probe["mapped"] == 0 and probe["kept"] >= 4 << 20


def test_the_users_allocator_setting_is_found():
    assert user_setting({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_"
    assert user_setting({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}) == "GLIBC_TUNABLES"
    assert user_setting({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}) == "LD_PRELOAD"
    assert user_setting({"MALLOC_ARENA_MAX": "2"}) == "MALLOC_ARENA_MAX"
    assert user_setting({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048", "PATH": "/bin"}) is None
