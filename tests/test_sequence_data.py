"""Sequence data (CTC): digit strings drawn by (seed, epoch, index), padded line batches, line image folders."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import pytest
import torch
from PIL import Image, ImageDraw

from hwr_dist.config import AugmentConfig, StringsConfig
from hwr_dist.data import load_dataset
from hwr_dist.data.digit_strings import MARGIN, DigitStrings, check_settings, render_string
from hwr_dist.data.sequences import RIGHT_PAD, LineData, Targets, encode
from hwr_dist.data.splits import Split
from hwr_dist.data.textlines import load_textlines
from hwr_dist.errors import HwrError

MEAN, STD = 0.2, 0.3
PAD = (0 - MEAN) / STD  # a normalised background pixel


@pytest.fixture(scope="module")
def digits() -> Split:
    return load_dataset("mnist-sample", "unused").train


def settings(**kw) -> StringsConfig:
    return dataclasses.replace(StringsConfig(), **kw)


def strings(split: Split, seed: int = 0, fixed: bool = False, salt: int = 0, size: int = 200, **kw) -> DigitStrings:
    return DigitStrings(split, settings(**kw), seed, MEAN, STD, "cpu", fixed=fixed, size=size, salt=salt)


def real(x: torch.Tensor, t: Targets, i: int) -> torch.Tensor:
    """String i's image without its padding."""
    return x[i, 0, :, : int(t.widths[i])]


def block_split(values: list[int]) -> Split:
    """One 28x28 image per class: a solid 8x12 block of the class's own grey value (its marker)."""
    images = torch.zeros(len(values), 28, 28, dtype=torch.uint8)
    for k, v in enumerate(values):
        images[k, 8:20, 10:18] = v
    return Split(images, torch.arange(len(values)))


def ink_runs(image: torch.Tensor) -> list[torch.Tensor]:
    """Runs of inked columns, left to right, each as its columns' maxima."""
    profile = image.amax(0)
    runs, current = [], []
    for v in profile.tolist() + [0]:
        if v > 0:
            current.append(v)
        elif current:
            runs.append(torch.tensor(current))
            current = []
    return runs


def test_a_string_is_the_same_in_any_batch_and_after_anything(digits):
    ds = strings(digits)
    x1, t1 = ds.batch(torch.tensor([3, 7, 9]))
    x2, t2 = ds.batch(torch.tensor([150, 9, 4, 3]))
    assert torch.equal(real(x1, t1, 0), real(x2, t2, 3)) and torch.equal(real(x1, t1, 2), real(x2, t2, 1))
    assert t1.texts(ds.alphabet)[0] == t2.texts(ds.alphabet)[3]
    assert torch.allclose(x2[1, :, :, int(t2.widths[1]):], torch.tensor(PAD))  # padded with background

    idx = torch.tensor([5, 0, 42])
    ds.set_epoch(2)
    x, t = ds.batch(idx)
    ds.batch(torch.arange(64))
    ds.set_epoch(3)
    ds.batch(torch.arange(10))
    ds.set_epoch(2)
    again, resumed = ds.batch(idx), strings(digits)
    resumed.set_epoch(2)
    for xb, tb in (again, resumed.batch(idx)):
        assert torch.equal(xb, x)
        assert all(torch.equal(getattr(tb, f.name), getattr(t, f.name)) for f in dataclasses.fields(Targets))


def test_epochs_seeds_and_salts_draw_other_strings_and_fixed_sets_stay(digits):
    idx = torch.arange(32)

    def texts(ds: DigitStrings, epoch: int = 0) -> list[str]:
        ds.set_epoch(epoch)
        return ds.batch(idx)[1].texts(ds.alphabet)

    ds = strings(digits)
    assert texts(ds, 0) != texts(ds, 1)
    assert texts(strings(digits, seed=1)) != texts(strings(digits))
    assert texts(strings(digits, salt=1)) != texts(strings(digits))
    fixed = strings(digits, fixed=True, salt=1)
    x, t = fixed.batch(idx)
    fixed.set_epoch(7)
    assert torch.equal(fixed.batch(idx)[0], x)


def test_texts_round_trip_and_lengths_stay_in_range(digits):
    ds = strings(digits, min_length=2, max_length=5)
    x, t = ds.batch(torch.arange(100))
    texts = t.texts(ds.alphabet)
    assert len(t) == 100 and [len(s) for s in texts] == t.lengths.tolist()
    assert 2 <= t.lengths.min() and t.lengths.max() <= 5 and set(t.lengths.tolist()) == {2, 3, 4, 5}
    assert 1 <= t.labels.min() and t.labels.max() <= 10 and len(t.labels) == t.lengths.sum()
    assert x.shape == (100, 1, 32, int(t.widths.max()) + RIGHT_PAD) and x.dtype == torch.float32
    assert [encode(s, ds.alphabet, "here") for s in texts[:3]] == \
        [t.labels[a:a + n].tolist() for a, n in zip((t.lengths.cumsum(0) - t.lengths)[:3].tolist(), t.lengths[:3].tolist())]


def test_digits_come_from_the_given_split_with_their_labels():
    marks = {"train": [40 + 20 * k for k in range(10)], "test": [50 + 20 * k for k in range(10)]}
    for values in marks.values():
        # Height 28 with scale 1 and no jitter: one output pixel per digit pixel, blocks 8 wide.
        ds = strings(block_split(values), min_length=3, max_length=6, gap=[4, 4], scale=[1, 1], jitter=0, slant=0,
                     height=28)
        x, t = ds.pixels(torch.arange(40))
        for i, text in enumerate(t.texts(ds.alphabet)):
            runs = ink_runs(x[i, :, : int(t.widths[i])])
            assert [int(r.max()) for r in runs] == [values[int(c)] for c in text]
            assert all(len(r) in (8, 9) for r in runs)  # the block, maybe half a pixel either side
        assert not t.touching.any()


def test_touching_flag_follows_the_gaps():
    split = block_split([255] * 10)
    kw = dict(min_length=2, max_length=4, scale=[1, 1], jitter=0, slant=0, height=28)
    x, t = strings(split, gap=[2, 6], **kw).pixels(torch.arange(30))
    assert not t.touching.any()
    assert [len(ink_runs(x[i, :, : int(t.widths[i])])) for i in range(30)] == t.lengths.tolist()
    x, t = strings(split, gap=[-3, 0], **kw).pixels(torch.arange(30))
    assert t.touching.all()
    assert all(len(ink_runs(x[i, :, : int(t.widths[i])])) == 1 for i in range(30))


def test_widths_margins_and_a_blank_digit():
    split = block_split([0] + [255] * 9)  # digit 0 has no ink at all
    ds = strings(split, min_length=1, max_length=3)
    x, t = ds.pixels(torch.arange(50))
    for i in range(50):
        w = int(t.widths[i])
        assert (x[i, :, w:] == 0).all() and (x[i, :, :MARGIN] == 0).all() and (x[i, :, w - MARGIN:w] == 0).all()
    assert t.widths.max() == x.shape[2] and "0" in "".join(t.texts(ds.alphabet))


def test_render_string_and_settings_checks(digits):
    s = settings()
    near = render_string(digits.images[:3], [1, 1], s)
    far = render_string(digits.images[:3], [8, 8], s, scales=[1.1] * 3, slants=[10, -10, 0], jitters=[2, -2, 0])
    assert near.dtype == torch.uint8 and near.shape[0] == far.shape[0] == 32 and far.shape[1] > near.shape[1]
    for key, value in (("min_length", 0), ("max_length", 1), ("gap", [3, 1]), ("scale", [1.0]), ("height", 4)):
        with pytest.raises(HwrError, match=f"data.strings.{key}"):
            check_settings(settings(**{"min_length": 2, key: value}))
    with pytest.raises(HwrError, match="labels 0..9"):
        DigitStrings(Split(digits.images[:5], torch.arange(5) + 8), settings(), 0, MEAN, STD)


def test_line_data_pads_and_keeps_every_pixel():
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (16, w), dtype=torch.uint8, generator=g) for w in (5, 12, 1, 9)]
    texts = ["ab", "b", "cab", "a"]
    data = LineData(images, texts, ["a", "b", "c"], MEAN, STD)
    idx = torch.tensor([2, 0, 1])
    x, t = data.batch(idx)
    assert x.shape == (3, 1, 16, 12 + RIGHT_PAD) and t.widths.tolist() == [1, 5, 12] and not t.touching.any()
    assert t.texts(data.alphabet) == ["cab", "ab", "b"] and t.labels.tolist() == [3, 1, 2, 1, 2, 2]
    for i, k in enumerate(idx.tolist()):
        back = (x[i, 0] * STD + MEAN) * 255
        assert torch.equal(back[:, : images[k].shape[1]].round().to(torch.uint8), images[k])
        assert torch.allclose(x[i, 0, :, images[k].shape[1]:], torch.tensor(PAD))
    with pytest.raises(HwrError, match=r"labels.tsv line 7: 'z' is not in the alphabet"):
        LineData(images[:1], ["az"], ["a"], MEAN, STD, where=["labels.tsv line 7"])


def test_line_augmentation_is_pixel_true_and_seeded():
    images = [torch.full((16, w), 200, dtype=torch.uint8) for w in (10, 40)]
    data = LineData(images, ["a", "a"], ["a"], MEAN, STD)
    idx = torch.tensor([0, 1])
    plain, _ = data.batch(idx)
    off = AugmentConfig(rotation=0, scale=0, translate=0, shear=0)
    assert torch.allclose(data.batch(idx, torch.Generator().manual_seed(0), off)[0], plain, atol=1e-5)
    on = AugmentConfig(rotation=2, scale=0.05, translate=0.05, shear=5, elastic_alpha=1)
    a, _ = data.batch(idx, torch.Generator().manual_seed(1), on)
    b, _ = data.batch(idx, torch.Generator().manual_seed(1), on)
    assert torch.equal(a, b) and not torch.allclose(a, plain)
    # Pixel-true and about its own centre: the short line's middle stays ink, its padding stays background.
    assert (a[0, 0, 6:10, 3:7] > 0).all() and torch.allclose(a[0, 0, :, 14:], torch.tensor(PAD))


# Line image folders ---------------------------------------------------------------------------------


def line_png(path, text: str, light: bool = True) -> None:
    """Dark text on light paper (or the reverse), like a scan."""
    img = Image.new("L", (12 + 9 * len(text), 24), 235 if light else 10)
    ImageDraw.Draw(img).text((6, 6), text, fill=30 if light else 220)
    img.save(path)


def make_lines(folder, texts: list[str], prefix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(texts):
        name = f"{prefix}{i}.png"
        line_png(folder / name, text, light=i % 3 != 0)
        rows.append(f"{name}\t{text}")
    (folder / "labels.tsv").write_text("\n".join(rows) + "\n")


TEXTS = ["12 ab", "3 4", "ab", "b 1", "42", "a1", "b2", "4 b", "21", "a a", "1b", "3a"]


def test_one_labels_file_is_split_seeded(tmp_path):
    make_lines(tmp_path, TEXTS)
    train, val, test, alphabet = load_textlines(tmp_path, 32, seed=0, val_fraction=0.1)
    assert (len(train), len(val), len(test)) == (10, 1, 1)
    assert sorted(train.texts + val.texts + test.texts) == sorted(TEXTS)
    assert alphabet == sorted(set("".join(train.texts)))
    assert load_textlines(tmp_path, 32, seed=0, val_fraction=0.1)[2].texts == test.texts
    for im in train.images:  # ink white on a black background, whichever way the file had it
        assert im.dtype == torch.uint8 and im.shape[0] == 32 and im.median() == 0 and im.max() == 255
    assert train.images[0].shape[1] == round((12 + 9 * len(train.texts[0])) * 32 / 24)
    data = train.to_device(alphabet, *train.pixel_stats(), "cpu")
    x, t = data.batch(torch.arange(len(data)))
    assert t.texts(alphabet) == train.texts and x.shape[2] == 32
    assert len(load_textlines(tmp_path, 32, seed=0, val_fraction=0)[1]) == 0


def test_train_val_test_folders_are_used_as_given(tmp_path):
    make_lines(tmp_path / "train", TEXTS[:8])
    make_lines(tmp_path / "test", TEXTS[8:10])
    train, val, test, _ = load_textlines(tmp_path, 24, seed=0, val_fraction=0.25)
    assert test.texts == TEXTS[8:10] and (len(train), len(val)) == (6, 2)
    make_lines(tmp_path / "val", TEXTS[10:])
    train, val, test, _ = load_textlines(tmp_path, 24, seed=0, val_fraction=0.25)
    assert (train.texts, val.texts, test.texts) == (TEXTS[:8], TEXTS[10:], TEXTS[8:10])


def zero_width_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 24, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_bad_line_folders_say_which_file_and_line(tmp_path):
    def case(name: str, line: str, files: dict[str, bytes] | None = None) -> str:
        """The error of a labels.tsv whose 5th line is `line`, after four good ones."""
        folder = tmp_path / name
        make_lines(folder, ["12"] * 4, prefix="ok")
        for file, data in (files or {}).items():
            (folder / file).write_bytes(data)
        (folder / "labels.tsv").write_text("".join(f"ok{i}.png\t12\n" for i in range(4)) + line)
        with pytest.raises(HwrError) as e:
            load_textlines(folder, 32, seed=0, val_fraction=0.25)
        assert str(e.value).startswith(f"{folder / 'labels.tsv'} line 5: ")
        return str(e.value)

    assert "expected file<TAB>text" in case("no-tab", "ok0.png 12")
    assert "expected file<TAB>text" in case("two-tabs", "ok0.png\t12\t3")
    assert "the text of 'ok0.png' is empty" in case("empty-text", "ok0.png\t  ")
    assert "the file name is empty" in case("empty-name", "\t12")
    assert "gone.png not found" in case("missing", "gone.png\t12")
    assert "'ok1.png' is listed twice (also on line 2)" in case("duplicate", "ok1.png\t12")
    png = (tmp_path / "no-tab" / "ok0.png").read_bytes()
    assert "bad.png is not an image file" in case("corrupt", "bad.png\t12", {"bad.png": b"not an image"})
    assert "cut.png is damaged or truncated" in case("truncated", "cut.png\t12", {"cut.png": png[: len(png) // 2]})
    assert "empty.png is empty (0 bytes)" in case("zero-bytes", "empty.png\t12", {"empty.png": b""})
    assert "flat.png is not an image file" in case("zero-width", "flat.png\t12", {"flat.png": zero_width_png()})

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HwrError, match="labels.tsv not found"):
        load_textlines(empty, 32, 0, 0.1)
    (empty / "labels.tsv").write_text("\n\n")
    with pytest.raises(HwrError, match="lists no images"):
        load_textlines(empty, 32, 0, 0.1)
    make_lines(tmp_path / "few", TEXTS[:2])
    with pytest.raises(HwrError, match="too few to hold out"):
        load_textlines(tmp_path / "few", 32, 0, 0.1)
    make_lines(tmp_path / "split" / "train", TEXTS[:6])
    make_lines(tmp_path / "split" / "val", ["ab", "a\u00e9"])
    with pytest.raises(HwrError, match=r"val/labels.tsv line 2: '\u00e9' is not in the training labels' alphabet"):
        load_textlines(tmp_path / "split", 32, 0, 0.1)
    (tmp_path / "split" / "val" / "labels.tsv").write_text("\n")
    with pytest.raises(HwrError, match=r"val/labels.tsv lists no images"):
        load_textlines(tmp_path / "split", 32, 0, 0.1)
    make_lines(tmp_path / "no-train" / "val", TEXTS[:3])
    with pytest.raises(HwrError, match="train does not"):
        load_textlines(tmp_path / "no-train", 32, 0, 0.1)
