"""Fault suite, in this process: bad configs, flags and data.

Every case runs the real CLI (`hwr_dist.cli.main`) and checks the same contract (`faults.check`):
the exit code, exactly one `error:` line and no traceback, and every file that existed before
byte-identical afterwards. Checkpoints, resumes, images and file systems are in
tests/test_faults_runs.py; signals, locks, another user and the launcher in
tests/test_faults_processes.py.
"""

from __future__ import annotations

import typing
from dataclasses import is_dataclass
from pathlib import Path

import pytest
from faults import CONFIG, TINY, check, digit_png, hwr_here, image_folder, mnist_folder, snapshot

from hwr_dist.config import Config


def train(capsys, *overrides: str, config: str | Path = CONFIG):
    return hwr_here(capsys, "train", config, *TINY, *overrides)


# --- config: keys, types, numbers, ranges, files ---------------------------------------------------


def float_keys(obj=Config(), prefix="") -> list[str]:
    keys = []
    for name, tp in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name)
        keys += float_keys(value, f"{prefix}{name}.") if is_dataclass(value) else [f"{prefix}{name}"] * (tp is float)
    return keys


NON_FINITE = [(f"{k}={v}", "expected a finite number") for k in float_keys() for v in (".inf", "nan", "-inf")]
BAD_VALUES = [
    ("data.nope=1", "unknown config key 'data.nope'"), ("nope.x=1", "unknown config key 'nope'"),
    ("train.epochs=abc", "train.epochs: expected int"), ("train.epochs=true", "train.epochs: expected int"),
    ("model.width=2.5", "model.width: expected int"), ("data.augment.enabled=maybe", "expected bool"),
    ("data=3", "data: expected a section"), ("train.epochs.x=1", "set both as a value and a section"),
    ("tracking.wandb.tags=5", "expected a list"), ("optim.lr", "bad override"), ("", "bad override"),
    ("=1", "bad override"), ("optim.lr=1e-3x", "optim.lr: expected float"),
    ("data.batch_size=0", "data.batch_size"), ("data.eval_batch_size=-1", "data.eval_batch_size"),
    ("data.val_fraction=1", "data.val_fraction"), ("data.limit_per_class=0", "data.limit_per_class"),
    ("data.augment.rotation=181", "data.augment.rotation"), ("data.augment.scale=1", "data.augment.scale"),
    ("data.augment.translate=-0.1", "data.augment.translate"), ("data.augment.shear=90", "data.augment.shear"),
    ("data.augment.elastic_alpha=100", "elastic_alpha"), ("data.augment.elastic_sigma=0", "elastic_sigma"),
    ("data.augment.erasing=1.5", "data.augment.erasing"), ("model.dropout=1", "model.dropout"),
    ("model.width=0", "model.width"), ("model.width=1000000", "model.width"),
    ("optim.lr=0", "optim.lr"), ("optim.lr=-0.1", "optim.lr"), ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.momentum=1", "optim.momentum"), ("optim.beta2=1", "optim.beta2"), ("optim.grad_clip=-1", "grad_clip"),
    ("optim.label_smoothing=1", "label_smoothing"), ("optim.name=lamb", "optim.name"),
    ("schedule.name=linear", "schedule.name"), ("schedule.warmup_fraction=1", "warmup_fraction"),
    ("schedule.min_lr_ratio=2", "min_lr_ratio"), ("schedule.step_epochs=0", "step_epochs"),
    ("schedule.gamma=0", "schedule.gamma"), ("train.epochs=0", "train.epochs"), ("train.epochs=-3", "train.epochs"),
    ("train.seed=100000000000000", "train.seed"), ("train.seed=-1", "train.seed"),
    ("train.grad_accum_steps=0", "grad_accum_steps"), ("train.log_every=0", "train.log_every"),
    ("train.max_steps=-1", "train.max_steps"), ("train.ema_decay=1", "train.ema_decay"),
    ("train.early_stopping_patience=-1", "early_stopping"), ("train.mixed_precision=fp8", "mixed_precision"),
    ("train.device=tpu", "train.device"), ("train.resume_changes=maybe", "resume_changes"),
    ("train.name=a/b", "train.name"), ("train.name=..", "train.name"), ("checkpoint.keep_last=-1", "keep_last"),
    ("checkpoint.every_steps=-5", "every_steps"), ("tracking.wandb.mode=sometimes", "tracking.wandb.mode"),
    ("data.name=mnist-large", "data.name"), ("model.name=resnet", "model.name"),
    ("train.early_stopping_patience=2 data.val_fraction=0", "validation split"),
]


@pytest.mark.parametrize("override,match", NON_FINITE + BAD_VALUES,
                         ids=[c[0] or "empty" for c in NON_FINITE + BAD_VALUES])
def test_bad_config_value(capsys, tmp_path, override, match):
    before = snapshot(Path(CONFIG))
    check(train(capsys, *override.split(" "), f"train.out_dir={tmp_path}"), 2, before, match)
    assert not any(tmp_path.iterdir()), "nothing is written for a bad config"


CONFIG_FILES = {
    "duplicate-section": ("data:\n  batch_size: 8\ndata:\n  batch_size: 16\n", "given twice .lines 1 and 3"),
    "duplicate-key": ("optim:\n  lr: 0.1\n  lr: 0.2\n", "'lr' is given twice"),
    "duplicate-nested-key": ("data:\n  augment:\n    rotation: 1\n    rotation: 2\n", "'rotation' is given twice"),
    "not-utf8": (b"# caf\xe9\ndata:\n  batch_size: 8\n", "not UTF-8"),
    "binary": (bytes(range(256)), "not UTF-8"),
    "a-list": ("- data\n- model\n", "must hold a mapping"),
    "a-number": ("42\n", "must hold a mapping"),
    "bad-syntax": ("data: [1, 2\n", "not valid YAML"),
    "tab-indent": ("data:\n\tbatch_size: 8\n", "not valid YAML"),
    "section-is-a-number": ("data: 5\n", "data: expected a section"),
    "unknown-section": ("dataset:\n  name: mnist\n", "unknown config key 'dataset'"),
    "number-as-key": ("1: 2\n", "unknown config key '1'"),
    "word-for-number": ("train:\n  epochs: ten\n", "train.epochs: expected int"),
    "nan-in-file": ("optim:\n  lr: .nan\n", "optim.lr: expected a finite number"),
}


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_bad_config_file(capsys, tmp_path, name):
    content, match = CONFIG_FILES[name]
    path = tmp_path / "cfg" / f"{name}.yaml"
    path.parent.mkdir()
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = snapshot(path.parent)
    check(train(capsys, f"train.out_dir={tmp_path / 'runs'}", config=path), 2, before, match)


@pytest.mark.parametrize("name", ["missing", "a-directory"])
def test_config_path_that_is_no_file(capsys, tmp_path, name):
    path = tmp_path / "missing.yaml" if name == "missing" else tmp_path
    check(train(capsys, f"train.out_dir={tmp_path / 'runs'}", config=path), 2, {}, "not found")


# --- refused at set-up: the run's size, the device, the starting weights ----------------------------

SETUP = [
    ("data.batch_size=1000000", "more than the 3600 training images"),
    ("data.batch_size=3601", "more than the 3600 training images"),
    ("train.device=cuda", "no CUDA GPU"), ("train.mixed_precision=fp16", "needs a CUDA GPU"),
    ("model.weights=/nonexistent/weights.pt", "weights"),
]


@pytest.mark.parametrize("override,match", SETUP, ids=[c[0] for c in SETUP])
def test_refused_at_setup(capsys, tmp_path, override, match):
    check(train(capsys, override, f"train.out_dir={tmp_path}"), 2, {}, match)
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("config.yaml"))


# --- flags ----------------------------------------------------------------------------------------

FLAGS = [
    (["launch", CONFIG, "--nproc", "0"], "--nproc"), (["launch", CONFIG, "--nproc", "-2"], "--nproc"),
    (["launch", CONFIG, "--nproc", "two"], "--nproc"), (["launch", CONFIG, "--nnodes", "2"], "--master-addr"),
    (["launch", CONFIG, "--nnodes", "0"], "--nnodes"),
    (["launch", CONFIG, "--nnodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.1"], "node-rank"),
    (["launch", CONFIG, "--launcher", "mpirun"], "--launcher"), (["launch", CONFIG, "data.batch_size=0"], "batch_size"),
    (["frobnicate"], "No such command"), (["train", "--fast", CONFIG], "No such option"),
    (["train"], "Missing argument"),
    (["config", "show", CONFIG, "optim.lr=zero"], "optim.lr"), (["evaluate", "{ckpt}", "--split", "train"], "--split"),
    (["export", "{ckpt}", "--format", "tflite"], "tflite"), (["export", "{ckpt}", "--quantize", "int4"], "int4"),
    (["predict", "{ckpt}", "{image}", "--top-k", "0"], "top-k"), (["predict", "{ckpt}"], "Missing argument"),
    (["data", "verify", "mnist-large"], "unknown data set"), (["report", "{missing}"], "missing"),
    (["evaluate", "{missing}"], "not found"), (["train", CONFIG, "--quiet", "--quiet=2"], "--quiet"),
]


@pytest.mark.parametrize("argv,match", FLAGS,
                         ids=[" ".join("CONFIG" if x == CONFIG else x for x in a) for a, _ in FLAGS])
def test_bad_flag(capsys, tmp_path, argv, match):
    digit_png(tmp_path / "digit.png", seed=1)
    (tmp_path / "model.pt").write_text("flags are checked before the checkpoint is read\n")
    fill = {"{ckpt}": str(tmp_path / "model.pt"), "{image}": str(tmp_path / "digit.png"),
            "{missing}": str(tmp_path / "missing")}
    before = snapshot(tmp_path)
    check(hwr_here(capsys, *(fill.get(a, a) for a in argv)), 2, before, match)


# --- data: IDX files and image folders ------------------------------------------------------------


def _rewrite(name: str, edit):
    def fault(folder: Path) -> None:
        path = folder / name
        path.write_bytes(edit(path.read_bytes()))
    return fault


def _replace_with_gz(name: str, content: bytes):
    def fault(folder: Path) -> None:
        (folder / name).unlink()
        (folder / f"{name}.gz").write_bytes(content)
    return fault


def _write_idx(name: str, tensor_fn):
    def fault(folder: Path) -> None:
        from hwr_dist.data.idx import write_idx

        write_idx(folder / name, tensor_fn())
    return fault


def _gzip_cut(name: str):
    def fault(folder: Path) -> None:
        import gzip

        packed = gzip.compress((folder / name).read_bytes())
        _replace_with_gz(name, packed[: len(packed) // 2])(folder)
    return fault


def _dir_for(name: str):
    def fault(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).mkdir()
    return fault


IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
IDX_FAULTS = {
    "no-files": (lambda f: [p.unlink() for p in f.iterdir()], "mnist not found"),
    "labels-missing": (lambda f: (f / LABELS).unlink(), "mnist not found"),
    "truncated-images": (_rewrite(IMAGES, lambda b: b[: len(b) // 2]), "is truncated"),
    "truncated-labels": (_rewrite(LABELS, lambda b: b[:-1]), "is truncated"),
    "truncated-header": (_rewrite(IMAGES, lambda b: b[:6]), "truncated inside its header"),
    "longer-than-header": (_rewrite(IMAGES, lambda b: b + bytes(100)), "longer than its header says"),
    "wrong-magic": (_rewrite(IMAGES, lambda b: b"\x00\x00\x09\x03" + b[4:]), "wrong magic number"),
    "gzip-under-plain-name": (_rewrite(IMAGES, lambda b: __import__("gzip").compress(b)), "wrong magic number"),
    "empty-file": (_rewrite(LABELS, lambda b: b""), "wrong magic number"),
    "images-and-labels-swapped": (lambda f: [(f / IMAGES).rename(f / "x"), (f / LABELS).rename(f / IMAGES),
                                             (f / "x").rename(f / LABELS)], "dimensions"),
    "count-mismatch": (_write_idx(LABELS, lambda: __import__("torch").arange(59) % 10), "do not belong together"),
    "labels-out-of-range": (_write_idx(LABELS, lambda: __import__("torch").full((60,), 12)), "fall outside 0..9"),
    "corrupt-gzip": (_replace_with_gz(IMAGES, b"\x1f\x8b\x08\x00garbage"), "truncated gzip"),
    "truncated-gzip": (_gzip_cut(IMAGES), "truncated gzip"),
    "directory-for-file": (_dir_for(IMAGES), "unreadable"),
}


@pytest.mark.parametrize("command", ["train", "verify"])
@pytest.mark.parametrize("name", IDX_FAULTS)
def test_bad_idx_files(capsys, tmp_path, name, command):
    fault, match = IDX_FAULTS[name]
    folder = mnist_folder(tmp_path / "data")
    fault(folder)
    before = snapshot(tmp_path / "data")
    if command == "train":
        r = train(capsys, "data.name=mnist", f"data.root={tmp_path / 'data'}", "data.batch_size=8",
                  f"train.out_dir={tmp_path / 'runs'}")
    else:
        r = hwr_here(capsys, "data", "verify", "mnist", "--root", tmp_path / "data")
    check(r, 2, before, match)


def test_good_idx_files_verify(capsys, tmp_path):
    mnist_folder(tmp_path / "data")
    check(hwr_here(capsys, "data", "verify", "mnist", "--root", tmp_path / "data"), 0, {})


def _bytes_in(name: str, content: bytes):
    def fault(root: Path) -> None:
        image_folder(root, {"a": 10, "b": 10})
        (root / "a" / name).write_bytes(content)
    return fault


FOLDER_FAULTS = {
    "one-class": (lambda r: image_folder(r, {"only": 10}), "at least two"),
    "one-image-per-class": (lambda r: image_folder(r, {"a": 1, "b": 1}), "too few training images .2."),
    "one-image-per-class-no-validation": (lambda r: image_folder(r, {"a": 1, "b": 1}), "no test images"),
    "too-few-for-validation": (lambda r: image_folder(r, {"a": 5, "b": 5}), "too few training images .8."),
    "batch-larger-than-split": (lambda r: image_folder(r, {"a": 10, "b": 10}), "more than the 14 training images"),
    "empty-class-folder": (lambda r: image_folder(r, {"a": 5, "b": 0}), "has no images"),
    "only-text-files": (lambda r: [image_folder(r, {"a": 5, "b": 0}), (r / "b" / "notes.txt").write_text("x")],
                        "has no images"),
    "no-class-folders": (lambda r: digit_png(r / "loose.png", seed=0), "no class folders"),
    "text-named-png": (_bytes_in("bad.png", b"hello, not a picture\n"), "not an image file"),
    "truncated-png": (lambda r: [image_folder(r, {"a": 10, "b": 10}),
                                 (r / "a" / "0.png").write_bytes((r / "a" / "0.png").read_bytes()[:60])],
                      "damaged or truncated"),
    "zero-byte-png": (_bytes_in("empty.png", b""), "is empty"),
    "blank-image": (lambda r: [image_folder(r, {"a": 10, "b": 10}),
                               __import__("PIL.Image").Image.new("L", (28, 28), 255).save(r / "a" / "blank.png")],
                    "all one colour"),
    "train-without-test": (lambda r: image_folder(r / "train", {"a": 5, "b": 5}), "does not"),
    "train-test-classes-differ": (lambda r: [image_folder(r / "train", {"a": 5, "b": 5}),
                                             image_folder(r / "test", {"a": 2, "c": 2})], "class folders differ"),
    "root-missing": (lambda r: None, "not found"),
    "root-is-a-file": (lambda r: r.write_text("x"), "not found"),
}


@pytest.mark.parametrize("name", FOLDER_FAULTS)
def test_bad_image_folder(capsys, tmp_path, name):
    fault, match = FOLDER_FAULTS[name]
    root = tmp_path / "images"
    fault(root)
    before = snapshot(root)
    extra = ["data.val_fraction=0"] if name.endswith("no-validation") else []
    check(train(capsys, "data.name=imagefolder", f"data.root={root}", f"train.out_dir={tmp_path / 'runs'}", *extra),
          2, before, match)
