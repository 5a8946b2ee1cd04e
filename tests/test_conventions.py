"""The tool works the way users already work: launcher settings, the CLI's manners, recipes, runs, doctor."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT, hwr, run

from hwr_dist.errors import HwrError
from hwr_dist.files import RunLock
from hwr_dist.train.launcher import TRAIN_MODULE, accelerate_argv

TINY_RUN = ["train.max_steps=4", "train.epochs=1", "model.width=4", "data.eval_batch_size=500"]


# --- precision and accumulation: the config > the launcher > the default ----------------------------


def test_precision_and_accumulation_rule(monkeypatch):
    from hwr_dist.train.distributed import from_launcher

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert from_launcher("p", None, "ACCELERATE_MIXED_PRECISION", "no") == "no"  # nobody set it
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert from_launcher("p", None, "ACCELERATE_MIXED_PRECISION", "no") == "bf16"  # the launcher's
    assert from_launcher("p", "bf16", "ACCELERATE_MIXED_PRECISION", "no") == "bf16"  # both, agreeing
    with pytest.raises(HwrError, match="p=no in the config but bf16 from the launcher"):
        from_launcher("p", "no", "ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # a launcher's "no" is its default: no conflict
    assert from_launcher("p", "bf16", "ACCELERATE_MIXED_PRECISION", "no") == "bf16"


def test_launcher_accumulation_is_not_applied_twice(monkeypatch):
    from hwr_dist.recipes import load
    from hwr_dist.train.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cfg = load("default", ["train.device=cpu"])
    acc = make_accelerator(cfg)
    assert cfg.train.grad_accum_steps == 4  # the loop accumulates 4 micro-batches ...
    assert acc.gradient_accumulation_steps == 1  # ... and Accelerate does not divide the loss again


@pytest.mark.slow
def test_accelerate_launch_flags_reach_the_run(tmp_path):
    """`accelerate launch --mixed_precision bf16` with the accumulation in the environment, on CPU,
    without ACCELERATE_USE_CPU: the run says and records what was in effect."""
    cmd = accelerate_argv(2, [*TRAIN_MODULE, "configs/default.yaml", *TINY_RUN, f"train.out_dir={tmp_path}",
                              "train.name=flags"], main_port=29000 + (hash(str(tmp_path)) % 2000))
    cmd.insert(cmd.index("--multi_gpu"), "--mixed_precision=bf16")
    proc = run(cmd, ACCELERATE_GRADIENT_ACCUMULATION_STEPS="2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), DDP over gloo | precision bf16 | batch" in proc.stderr
    assert "x 2 accumulation" in proc.stderr
    system = json.loads((tmp_path / "flags" / "tracking.json").read_text())["system"]
    assert (system["mixed_precision"], system["grad_accum_steps"], system["backend"]) == ("bf16", 2, "gloo")


@pytest.mark.slow
def test_sharded_engines_are_refused(tmp_path, monkeypatch):
    """`accelerate launch --use_fsdp` (and DeepSpeed, Megatron-LM): the loop is DDP's, so one error
    line before anything is written, not a half-working run."""
    from hwr_dist.recipes import load
    from hwr_dist.train.distributed import make_accelerator

    cmd = accelerate_argv(1, [*TRAIN_MODULE, "configs/default.yaml", *TINY_RUN, f"train.out_dir={tmp_path}",
                              "train.name=fsdp"], main_port=29000 + (hash(str(tmp_path)) % 2000))
    cmd[cmd.index("--multi_gpu")] = "--use_fsdp"
    proc = run(cmd, timeout=300)
    assert proc.returncode != 0
    assert "error: accelerate launch --use_fsdp (ACCELERATE_USE_FSDP=true" in proc.stderr
    assert not (tmp_path / "fsdp").exists()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what --use_deepspeed sets, DeepSpeed installed or not
    with pytest.raises(HwrError, match="--use_deepspeed .* is not supported: hwr-dist trains with DDP"):
        make_accelerator(load("default", ["train.device=cpu"]))


# --- the CLI's manners -----------------------------------------------------------------------------


def test_version_help_and_choices():
    from hwr_dist import __version__

    assert hwr("--version").stdout.strip() == f"hwr-dist {__version__}"
    proc = run([sys.executable, "-m", "hwr_dist.train", "--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m hwr_dist.train")
    assert "--install-completion" in hwr("--help").stdout
    export_help = hwr("export", "--help").stdout
    assert "torchscript|onnx|sta" in export_help  # the choices are listed
    proc = hwr("export", "x.pt", "--format", "zip")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "zip" in proc.stderr
    proc = hwr("evaluate", "x.pt", "--split", "train")
    assert proc.returncode == 2 and "'train' is not one of" in proc.stderr


def test_quiet_prints_only_the_summary_line(tmp_path):
    proc = hwr("train", "default", *TINY_RUN, f"train.out_dir={tmp_path}", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [proc.stdout.strip()] and proc.stdout.startswith("default: completed, test")
    assert proc.stderr.strip() == ""
    loud = hwr("train", "default", *TINY_RUN, f"train.out_dir={tmp_path}", "train.name=loud")
    assert "optimizer steps" in loud.stderr and "summary" in loud.stdout  # without --quiet: the whole story


def test_config_show_doc():
    out = hwr("config", "show", "default", "optim.lr=0.5", "--doc").stdout
    assert "optim.lr = 0.5\n    Peak learning rate." in out
    assert "train.mixed_precision = None\n    no, bf16 or fp16" in out


# --- recipes by name ------------------------------------------------------------------------------


def test_recipes_by_name_from_any_folder(tmp_path):
    listing = hwr("recipes", cwd=tmp_path).stdout
    assert listing.startswith("adapt_own") and "fast_sample" in listing
    proc = hwr("config", "run-dir", "fast_sample", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "runs" / "fast_sample")
    assert hwr("recipes", "copy", "fast_sample", cwd=tmp_path).returncode == 0
    assert (tmp_path / "fast_sample.yaml").read_text() == (ROOT / "configs" / "fast_sample.yaml").read_text()
    proc = hwr("recipes", "copy", "fast_sample", cwd=tmp_path)  # never over an existing file
    assert proc.returncode == 2 and "exists" in proc.stderr
    proc = hwr("train", "no_such_recipe", cwd=tmp_path)
    assert proc.returncode == 2 and "no recipe of that name" in proc.stderr
    script = hwr("slurm", "script").stdout.strip()
    assert script.endswith("launchers/slurm/train.sh") and (ROOT / "slurm" / "train.sh").resolve() == \
        __import__("pathlib").Path(script).resolve()


# --- hwr runs and hwr doctor ----------------------------------------------------------------------


def fake_run(folder, name: str, **files) -> None:
    d = folder / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 1.0, "val_accuracy": 0.5}) + "\n")
    for fname, content in files.items():
        (d / fname.replace("_json", ".json")).write_text(json.dumps(content))


def test_runs_lists_every_status(tmp_path):
    fake_run(tmp_path, "done", summary_json={"outcome": "completed", "test_accuracy": 0.9, "wall_time_s": 3.0},
             tracking_json={"status": "completed", "run_id": "ab12", "wandb": {"mode": "offline"}})
    fake_run(tmp_path, "stopped", preempted_json={"step": 10, "reason": "SIGTERM"})
    fake_run(tmp_path, "nan", tracking_json={"status": "diverged"})
    fake_run(tmp_path, "crashed")
    fake_run(tmp_path, "busy")
    lock = RunLock(tmp_path / "busy")
    assert lock.acquire() == ""
    try:
        rows = json.loads(hwr("runs", str(tmp_path), "--json").stdout)
    finally:
        lock.release()
    assert {r["run"]: r["status"] for r in rows} == {
        "busy": "running", "crashed": "failed", "done": "completed", "nan": "diverged", "stopped": "preempted"}
    done = next(r for r in rows if r["run"] == "done")
    assert (done["test_accuracy"], done["best_val_accuracy"], done["wandb_run_id"]) == (0.9, 0.5, "ab12")
    table = hwr("runs", str(tmp_path)).stdout
    assert "runs in" in table and "90.00%" in table


def test_doctor_on_this_machine():
    proc = hwr("doctor", ACCELERATE_MIXED_PRECISION="bf16")
    assert proc.returncode == 0, proc.stderr
    for row in ("torch", "CUDA", "GPUs", "precision in effect", "accumulation in effect", "W&B", "SLURM client",
                "free disk"):
        assert row in proc.stdout
    assert "bf16" in proc.stdout  # the launcher's precision, as a run would get it
    proc = hwr("doctor", "default", "train.mixed_precision=no", ACCELERATE_MIXED_PRECISION="bf16")
    assert proc.returncode == 2 and "from the launcher" in proc.stderr  # the conflict a run would refuse
