"""The sequence task (CRNN + CTC) through the loop the classifier uses: the task interface on both
tasks, exact accumulation on two processes, bit-identical resume after kill -9, a folder of line
images end to end, and `hwr train` on the shipped digit-strings recipe.

Every run is tiny (width 8, one LSTM layer of 32, a few hundred short strings) so that each test
takes seconds to tens of seconds on two CPU cores; the model learns nothing in that time, which
does not matter here: what is checked is the plumbing, the arithmetic and the files.
"""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from hwr_dist.errors import HwrError
from hwr_dist.models import build_model
from hwr_dist.recipes import load
from hwr_dist.tasks import check_config, task_for
from hwr_dist.tasks.classification import ClassificationTask
from hwr_dist.tasks.sequence import SequenceTask
from hwr_dist.train.launcher import accelerate_argv
from hwr_dist.train.setup import load_data
from conftest import ROOT, env, free_port, hwr, run, train_module, wait_for

PROBE = str(Path(__file__).parent / "dist_probe.py")
STRINGS = "configs/digit_strings.yaml"


def tiny_strings(train_size: int = 480, batch_size: int = 8) -> list[str]:
    """A tiny CRNN on `train_size` strings of 4 or 5 digits a training epoch, 60 each for validation and test."""
    return ["model.width=8", "model.hidden=32", "model.layers=1", f"data.strings.train_size={train_size}",
            "data.strings.eval_size=60", "data.strings.max_length=5", f"data.batch_size={batch_size}",
            "data.eval_batch_size=25", "train.log_every=10"]


def read_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --- the task interface, in this process -------------------------------------------------------


@pytest.mark.parametrize("config, overrides, task_type, keys", [
    ("configs/default.yaml", ["model.width=8"], ClassificationTask, {"val_accuracy", "val_loss"}),
    (STRINGS, tiny_strings(), SequenceTask,
     {"val_accuracy", "val_loss", "val_cer", "val_length_accuracy"}),
], ids=["classification", "sequence"])
def test_task_interface_on_both_tasks(config, overrides, task_type, keys):
    cfg = load(config, overrides)
    task = task_for(cfg)
    assert isinstance(task, task_type) and task.name == task_type.name
    torch.manual_seed(0)
    data = load_data(cfg, "cpu", cfg.train.seed)
    model = build_model(cfg.model, len(data.classes))

    x, y = data.train.batch(torch.arange(8))
    loss = task.loss(model, x, y, cached=False)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)  # every parameter is used
    assert sum(float(g.abs().sum()) for g in grads) > 0

    model.train()
    # A batch size that does not divide the split: the last batch is short, nothing is counted twice.
    result = task.evaluate(model, data.val, data.classes, batch_size=7)
    assert model.training  # evaluation puts the mode back
    assert result.count == len(data.val) > 0
    assert 0 <= result.accuracy <= 1 and math.isfinite(result.loss) and result.loss > 0
    metrics = result.metrics("val")
    assert keys <= set(metrics) and all(k.startswith("val_") for k in metrics)
    assert metrics["val_accuracy"] == result.accuracy and metrics["val_loss"] == result.loss
    headline = result.headline()
    if task_type is SequenceTask:
        assert data.classes == [str(d) for d in range(10)]
        assert "sequence accuracy" in headline and "CER" in headline
        assert 0 <= metrics["val_cer"] and 0 <= metrics["val_length_accuracy"] <= 1
    else:
        assert headline.startswith("accuracy ") and headline.endswith("%")


def test_config_checks_refuse_a_model_that_cannot_read_the_data():
    with pytest.raises(HwrError, match=r"model.name=crnn reads rows of characters.*data.name=digit-strings"):
        load("configs/default.yaml", ["model.name=crnn"])
    with pytest.raises(HwrError, match=r"data.name=digit-strings holds rows of characters.*use model.name=crnn"):
        load(STRINGS, ["model.name=fast_cnn"])
    with pytest.raises(HwrError, match=r"data.name=textlines holds rows of characters"):
        load(STRINGS, ["data.name=textlines", "model.name=small_cnn"])
    for config, overrides in (("configs/default.yaml", []), (STRINGS, []), (STRINGS, ["data.name=textlines"])):
        check_config(load(config, overrides))  # the matching pairs pass


def test_a_string_reads_the_same_alone_as_beside_a_wider_one():
    """What crnn.CRNN.forward promises (eval mode): an image's frames do not depend on its batch's
    width, so evaluation counts do not depend on data.eval_batch_size or on the number of processes."""
    cfg = load(STRINGS, tiny_strings())
    torch.manual_seed(0)
    data = load_data(cfg, "cpu", cfg.train.seed)
    model = build_model(cfg.model, len(data.classes)).eval()
    x, y = data.val.batch(torch.arange(len(data.val)))
    with torch.no_grad():
        together = model(x, y.widths)
        frames = model.output_lengths(y.widths).tolist()
        for i in range(8):
            xi, yi = data.val.batch(torch.tensor([i]))
            alone = model(xi, yi.widths)
            torch.testing.assert_close(alone[0, : frames[i]], together[i, : frames[i]], atol=1e-5, rtol=0)


# --- two processes: accumulation and DDP ----------------------------------------------------------


def probes(out: Path, world: int) -> list[dict]:
    return [torch.load(out / f"probe-rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.slow
def test_ctc_accumulation_on_two_processes_equals_one_process(tmp_path):
    """2 processes x batch 1 x accumulation 2 == 1 process x batch 1 x accumulation 4, same strings.

    Rank r takes every 2nd string of the epoch's permutation, so optimizer step s covers strings
    4s..4s+3 of it on both runs, each micro-batch's mean loss divided by the window's length, and
    DDP averages the two ranks: the same gradient, up to summation order.

    Why batch 1 and not 2 x B x 2 == 1 x 4B as for the classifier (small_cnn, which has no batch
    norm): the CRNN's conv stack has batch norms, which in training normalise with the statistics
    of each micro-batch (one rank's B strings, not the 4B of the large batch), and a batch is padded
    to its widest string, so the statistics include its padding. Per-string losses then depend on
    the micro-batch, and 1 x 4B differs from 2 x B x 2 by about 1% of the gradient after one step,
    by design. With one string per micro-batch a string's loss depends on nothing else, so the
    equivalence is exact here, and it still checks the sharding, the window scaling, no_sync and
    DDP's averaging. No dropout and no augmentation; SGD at a constant rate.

    Only parameters are compared. The batch norms' running statistics are buffers that each process
    updates in every forward with its own micro-batch: the one process after all four strings of a
    step, each rank after its own two, with DDP broadcasting rank 0's before a synchronised forward
    only; so they differ from the one-process run's, and even between the two replicas after the
    last step (rank 1's last forward updated its own copy).
    """
    common = [*tiny_strings(batch_size=1), "model.dropout=0", "data.augment.enabled=false", "optim.name=sgd",
              "optim.lr=0.05", "optim.grad_clip=0", "schedule.name=constant", "train.epochs=1",
              "train.max_steps=8", "train.log_every=4", f"train.out_dir={tmp_path}"]
    one = run([sys.executable, PROBE, STRINGS, *common, "train.name=one", "train.grad_accum_steps=4"],
              HWR_PROBE_OUT=str(tmp_path / "p1"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert "batch 1 per process x 1 processes x 4 accumulation = 4 global" in one.stderr
    two = run(accelerate_argv(2, [PROBE, STRINGS, *common, "train.name=two", "train.grad_accum_steps=2"],
                              main_port=free_port()),
              ACCELERATE_USE_CPU="1", HWR_PROBE_OUT=str(tmp_path / "p2"), HWR_PROBE_COMM_HOOK="1")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es), DDP over gloo" in two.stderr
    assert "batch 1 per process x 2 processes x 2 accumulation = 4 global" in two.stderr

    (p1,) = probes(tmp_path / "p1", 1)
    p2 = probes(tmp_path / "p2", 2)
    assert p1["steps"] == p2[0]["steps"] == p2[1]["steps"] == 8
    assert [p["world_size"] for p in p2] == [2, 2]
    model = build_model(load(STRINGS, common).model, 10)
    params = [n for n, _ in model.named_parameters()]
    assert set(params) | {n for n, _ in model.named_buffers()} == set(p1["params"])
    for name in params:
        assert torch.equal(p2[0]["params"][name], p2[1]["params"][name]), name  # identical replicas
        torch.testing.assert_close(p2[0]["params"][name], p1["params"][name], rtol=1e-5, atol=1e-6, msg=name)
    # Every parameter fits DDP's first gradient bucket (1 MiB), so one all-reduce per optimizer step
    # and none on the no_sync micro-steps (a sync on every micro-step would give 16). The LSTM reads
    # packed sequences, and every parameter gets a gradient: no find_unused_parameters needed.
    first_bucket = getattr(torch.distributed, "_DEFAULT_FIRST_BUCKET_BYTES", 1024 * 1024)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < first_bucket
    assert [p["allreduce_calls"] for p in p2] == [8, 8]


# dist_probe.py with the main process's checkpoint writes delayed: what a slow disk or a large model
# does. A rank that reads best.pt without waiting for the main process then reads a stale one.
SLOW_WRITE_PROBE = """
import sys, time
sys.path.insert(0, {tests!r})
from hwr_dist import checkpoint
write = checkpoint.write
def slow_write(*args, **kwargs):
    time.sleep(2)
    write(*args, **kwargs)
checkpoint.write = slow_write
import dist_probe
dist_probe.main()
"""


@pytest.mark.slow
def test_every_rank_tests_the_best_checkpoint(tmp_path):
    """Two epochs on two processes; the second is the best (a tie at 0% keeps the later epoch), so
    best.pt is rewritten at its end. The final test evaluation shards the test split over both ranks
    and must score best.pt's weights, batch-norm statistics included, on each of them."""
    probe = tmp_path / "slow_write_probe.py"
    probe.write_text(SLOW_WRITE_PROBE.format(tests=str(Path(__file__).parent)))
    args = [*tiny_strings(train_size=160), "train.epochs=2", f"train.out_dir={tmp_path}", "train.name=best"]
    proc = run(accelerate_argv(2, [str(probe), STRINGS, *args], main_port=free_port()),
               ACCELERATE_USE_CPU="1", HWR_PROBE_OUT=str(tmp_path / "p"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = read_ckpt(tmp_path / "best" / "checkpoints" / "best.pt")
    assert best["state"]["best_epoch"] == 1 and best["state"]["step"] == 20  # 10 steps an epoch
    for rank, p in enumerate(probes(tmp_path / "p", 2)):
        for k, v in best["model"].items():
            assert torch.equal(p["params"][k], v), (rank, k)


# --- resume after kill -9 ------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """Digit strings are drawn per (seed, epoch, index): a run killed mid-epoch and resumed from its
    last step checkpoint trains on the same strings, with the same dropout and augmentation draws,
    as one that never stopped: weights, optimizer state and counters equal bit for bit."""
    args = [*tiny_strings(train_size=320), "model.dropout=0.2", "data.augment.enabled=true",
            "data.augment.rotation=2", "data.augment.scale=0.05", "data.augment.translate=0.05",
            "data.augment.shear=2", "train.epochs=2", "checkpoint.every_steps=10", "train.resume=auto",
            f"train.out_dir={tmp_path / 'runs'}"]  # 40 steps an epoch, 80 in all
    ref = train_module(STRINGS, *args, "train.name=reference")
    assert ref.returncode == 0, ref.stderr[-2000:]

    cmd = [sys.executable, "-m", "hwr_dist.train", STRINGS, *args, "train.name=killed", "--quiet"]
    ckpts = tmp_path / "runs" / "killed" / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: (ckpts / "step-00000020.pt").exists(), 300)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    killed_at = read_ckpt(ckpts / "last.pt")["state"]
    assert 20 <= killed_at["step"] < 40 and killed_at["epoch"] == 0 and killed_at["batch"] > 0, killed_at

    resumed = run([sys.executable, "-m", "hwr_dist.train", STRINGS, *args, "train.name=killed"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {ckpts / 'last.pt'} at step {killed_at['step']}" in resumed.stderr
    a = read_ckpt(tmp_path / "runs" / "reference" / "checkpoints" / "last.pt")
    b = read_ckpt(ckpts / "last.pt")
    assert a["state"]["step"] == 80
    assert {**a["state"], "tracker_run_id": ""} == {**b["state"], "tracker_run_id": ""}
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, sa in a["optimizer"]["state"].items():
        sb = b["optimizer"]["state"][i]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), i
    lines = [json.loads(x) for x in (ckpts.parent / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(x) for x in (ckpts.parent.parent / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [x["step"] for x in ref_lines]  # none duplicated or missing
    for x, r in zip(lines, ref_lines):  # the same losses and validation scores, not just the same steps
        for key in ("loss", "val_loss", "val_accuracy", "val_cer", "test_loss", "test_cer"):
            assert x.get(key) == r.get(key), (x["step"], key)
    test_a = json.loads((tmp_path / "runs" / "reference" / "eval_test" / "metrics.json").read_text())
    test_b = json.loads((ckpts.parent / "eval_test" / "metrics.json").read_text())
    assert test_a == test_b


# --- a folder of line images ------------------------------------------------------------------------

ALPHABET = "ab3h7x"


def write_lines(root: Path, n: int = 40, seed: int = 0) -> list[str]:
    """n line images of short texts over ALPHABET, dark text on a light background, and labels.tsv."""
    rng = random.Random(seed)
    font = ImageFont.load_default(size=24)
    root.mkdir(parents=True)
    texts, rows = [], []
    for i in range(n):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 5)))
        left, top, right, bottom = font.getbbox(text)
        image = Image.new("L", (right + 12 + rng.randint(0, 8), 40), 235)
        ImageDraw.Draw(image).text((6, 20 - (top + bottom) // 2), text, fill=rng.randint(10, 60), font=font)
        image.save(root / f"line{i:03d}.png")
        texts.append(text)
        rows.append(f"line{i:03d}.png\t{text}")
    (root / "labels.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return texts


def test_textlines_train_end_to_end(tmp_path):
    texts = write_lines(tmp_path / "lines")
    proc = train_module(STRINGS, "data.name=textlines", f"data.root={tmp_path / 'lines'}", "model.name=crnn",
                        "model.width=8", "model.hidden=32", "model.layers=1", "data.batch_size=4",
                        "data.eval_batch_size=3", "train.epochs=2", "train.log_every=4",
                        f"train.out_dir={tmp_path / 'runs'}", "train.name=lines")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "lines"
    ckpt = read_ckpt(run_dir / "checkpoints" / "last.pt")
    # 40 lines: 4 held out for testing, 4 of the other 36 for validation, 32 train (8 steps an epoch).
    assert ckpt["state"]["step"] == 16 and ckpt["state"]["epoch"] == 2
    # The alphabet is the training labels' characters, sorted (every character of ALPHABET occurs in
    # training lines: a validation or test line with an unknown one would have been refused).
    assert ckpt["classes"] == sorted(set("".join(texts))) == sorted(ALPHABET)
    assert ckpt["config"]["data"]["name"] == "textlines" and ckpt["config"]["model"]["name"] == "crnn"
    assert ckpt["model"]["head.weight"].shape[0] == len(ALPHABET) + 1  # and the blank
    metrics = json.loads((run_dir / "eval_test" / "metrics.json").read_text())
    assert metrics["task"] == "sequence" and metrics["split"] == "test" and metrics["count"] == 4
    assert 0 <= metrics["sequence_accuracy"] <= 1 and metrics["cer"] >= 0
    assert metrics["accuracy"] == metrics["sequence_accuracy"]
    for worst in metrics["worst"]:  # texts read back in the training alphabet
        assert set(worst["truth"]) <= set(ALPHABET) and set(worst["reading"]) <= set(ALPHABET)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_cer" in r for r in rows) and any("test_cer" in r for r in rows)


# --- the CLI ------------------------------------------------------------------------------------------


def test_hwr_train_on_the_digit_strings_recipe(tmp_path):
    proc = hwr("train", "digit_strings", *tiny_strings(), "train.epochs=1", "train.max_steps=6",
               f"train.out_dir={tmp_path}", "train.name=cli", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = proc.stdout.strip().splitlines()[-1]
    assert final.startswith("cli: completed, test sequence accuracy ") and ", CER " in final, proc.stdout
    assert "6 steps" in final and str(tmp_path / "cli") in final
    worst = tmp_path / "cli" / "eval_test" / "worst.png"
    assert worst.is_file() and worst.stat().st_size > 1000
    metrics = json.loads((tmp_path / "cli" / "eval_test" / "metrics.json").read_text())
    assert metrics["count"] == 60 and {"sequence_accuracy", "cer", "length_accuracy"} <= set(metrics)
    assert f"{metrics['sequence_accuracy']:.2%}" in final and f"CER {metrics['cer']:.2%}" in final


@pytest.mark.slow
def test_torchrun_two_processes_keep_identical_replicas(tmp_path):
    """The sequence recipe under torchrun rather than accelerate launch: two gloo ranks end with the
    same parameters (batch-norm running statistics are each rank's own: see the test above)."""
    out = tmp_path / "probe"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", PROBE, STRINGS,
           *tiny_strings(), "train.epochs=1", "train.max_steps=6", f"train.out_dir={tmp_path}", "train.name=tr"]
    proc = run(cmd, HWR_PROBE_OUT=str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), DDP over gloo" in proc.stderr
    ranks = probes(out, 2)
    assert [p["world_size"] for p in ranks] == [2, 2] and ranks[0]["steps"] == 6
    for name, value in ranks[0]["params"].items():
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, ranks[1]["params"][name]), name
