"""Data: strict IDX reading, clear errors for missing or broken files, splits and sharding."""

from __future__ import annotations

import gzip

import pytest
import torch
from conftest import hwr, one_error_line

from hwr_dist.data import DATASETS, load_dataset, stratified_split
from hwr_dist.data.augment import augment
from hwr_dist.data.idx import read_idx, write_idx
from hwr_dist.data.loader import ShardedBatches
from hwr_dist.config import AugmentConfig
from hwr_dist.errors import HwrError


def make_mnist(folder, n_train=50, n_test=20, classes=10):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", torch.arange(n) % classes)


def test_builtin_sample_is_real_and_balanced():
    b = load_dataset("mnist-sample", "unused")
    assert b.train.images.shape == (4000, 28, 28) and b.test.images.shape == (1000, 28, 28)
    assert b.train.images.dtype == torch.uint8
    assert b.train.labels.bincount().tolist() == [400] * 10
    assert b.test.labels.bincount().tolist() == [100] * 10


def test_idx_reader_rejects_broken_files(tmp_path):
    good = tmp_path / "ok-images-idx3-ubyte"
    write_idx(good, torch.zeros(3, 28, 28))
    assert read_idx(good, 3).shape == (3, 28, 28)
    raw = good.read_bytes()
    cases = {
        "truncated": (raw[:-10], "truncated"),
        "magic": (b"\x12\x34" + raw[2:], "wrong magic number"),
        "longer": (raw + b"\0", "longer than its header says"),
        "header": (raw[:9], "truncated inside its header"),
    }
    for name, (data, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(HwrError, match=msg):
            read_idx(p, 3)
    with pytest.raises(HwrError, match="3 dimensions, expected 1"):
        read_idx(good, 1)
    gz = tmp_path / "cut.gz"
    gz.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(HwrError, match="truncated gzip"):
        read_idx(gz, 3)


def test_missing_dataset_says_where_and_how(tmp_path):
    proc = hwr("data", "verify", "mnist", "--root", str(tmp_path))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "train-images-idx3-ubyte" in line and str(tmp_path / "MNIST" / "raw") in line and "data.download" in line


def test_download_offline_fails_clearly(tmp_path):
    # The machine has no route to the data hosts: the download path must fail in one line.
    with pytest.raises(HwrError, match="could not download KMNIST"):
        load_dataset("kmnist", tmp_path, download=True)


def test_count_mismatch_and_bad_labels(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    make_mnist(raw)
    assert len(load_dataset("mnist", tmp_path).train) == 50
    write_idx(raw / "train-labels-idx1-ubyte.gz", torch.zeros(49))
    with pytest.raises(HwrError, match="50 images but .* 49 labels"):
        load_dataset("mnist", tmp_path)
    write_idx(raw / "train-labels-idx1-ubyte.gz", torch.full((50,), 12))
    with pytest.raises(HwrError, match="labels .* fall outside 0..9"):
        load_dataset("mnist", tmp_path)


def test_data_verify_and_list(tmp_path):
    make_mnist(tmp_path / "FashionMNIST" / "raw")
    proc = hwr("data", "verify", "fashion-mnist", "--root", str(tmp_path))
    assert proc.returncode == 0 and "fashion-mnist: ok" in proc.stdout, proc.stderr
    proc = hwr("data", "list", "--root", str(tmp_path))
    assert proc.returncode == 0
    for name in DATASETS:
        assert name in proc.stdout


def test_stratified_split_is_seeded_and_stratified():
    b = load_dataset("mnist-sample", "unused")
    train, val = stratified_split(b.train, 0.1, seed=3)
    assert val.labels.bincount().tolist() == [40] * 10
    assert len(train) + len(val) == 4000
    again, _ = stratified_split(b.train, 0.1, seed=3)
    assert torch.equal(train.labels, again.labels) and torch.equal(train.images, again.images)
    other, _ = stratified_split(b.train, 0.1, seed=4)
    assert not torch.equal(train.images, other.images)


def test_shards_are_disjoint_equal_and_change_every_epoch():
    n, world = 103, 3
    shards = [ShardedBatches(n, 8, seed=1, rank=r, world=world) for r in range(world)]
    e0 = [s.shard(0) for s in shards]
    assert len({len(s) for s in e0}) == 1 and len(e0[0]) == n // world
    union = torch.cat(e0)
    assert len(union.unique()) == len(union)  # disjoint
    assert not torch.equal(shards[0].shard(0), shards[0].shard(1))  # new order each epoch
    assert torch.equal(shards[0].shard(5), ShardedBatches(n, 8, seed=1, rank=0, world=world).shard(5))
    batches = list(shards[1].batches(0))
    assert torch.equal(torch.cat(batches), e0[1])
    assert torch.equal(torch.cat(list(shards[1].batches(0, start=2))), e0[1][16:])  # resume mid-epoch


def test_augmentation_is_batched_seeded_and_keeps_shape():
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 10:18, 12:16] = 1.0
    cfg = AugmentConfig(elastic_alpha=8.0, erasing=0.5)
    a = augment(x, torch.Generator().manual_seed(0), cfg)
    b = augment(x, torch.Generator().manual_seed(0), cfg)
    c = augment(x, torch.Generator().manual_seed(1), cfg)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # every image gets its own transform
    assert 0 <= a.min() and a.max() <= 1.0 + 1e-6
