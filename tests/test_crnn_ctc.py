"""The sequence task's model (CRNN) and CTC maths: decoding, loss reduction, scores, start weights, export."""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hwr_dist import checkpoint
from hwr_dist.config import Config, ModelConfig
from hwr_dist.ctc import (SequenceScores, beam_decode, ctc_loss, edit_distance, encode, greedy_decode, to_text,
                          worst_readings)
from hwr_dist.errors import HwrError
from hwr_dist.models import build_model
from hwr_dist.models.crnn import build_crnn, init_from, load_conv_stages

DIGITS = "0123456789"
BACKGROUND = -0.42  # the padding value: a normalised blank pixel


def one_hot_frames(ids: list[int], classes: int, peak: float = 20.0) -> torch.Tensor:
    return F.one_hot(torch.tensor(ids), classes).float() * peak


# --- decoding ------------------------------------------------------------------------------


def test_greedy_decode_collapses_repeats_drops_blanks_and_stops_at_each_length():
    frames = [[1, 1, 0, 1, 2, 2, 0, 0, 3, 3], [0, 2, 2, 2, 0, 0, 0, 0, 0, 0], [3, 0, 3, 3, 1, 0, 2, 0, 0, 4]]
    logits = torch.stack([one_hot_frames(f, 5) for f in frames])
    assert greedy_decode(logits, torch.tensor([10, 10, 7])) == [[1, 1, 2, 3], [2], [3, 3, 1, 2]]
    assert greedy_decode(logits, torch.tensor([1, 0, 10])) == [[1], [], [3, 3, 1, 2, 4]]


def test_beam_equals_greedy_when_every_frame_is_sure():
    torch.manual_seed(0)
    logits = torch.randn(3, 12, 11) * 20
    for row, ids in zip(logits, greedy_decode(logits, torch.tensor([12, 12, 12]))):
        assert beam_decode(row.log_softmax(-1), DIGITS, beam=4) == to_text(ids, DIGITS)


def test_beam_sums_the_paths_that_read_the_same():
    # Every frame: blank 0.6, 'a' 0.4. Greedy reads "" (0.36); "a" has three paths, 0.16 + 0.24 + 0.24.
    log_probs = torch.tensor([[0.6, 0.4], [0.6, 0.4]]).log()
    assert to_text(greedy_decode(log_probs[None], torch.tensor([2]))[0], "a") == ""
    assert beam_decode(log_probs, "a") == "a"


@pytest.mark.parametrize("seed", range(3))
def test_beam_finds_the_most_probable_text(seed):
    """Against brute force: every path of 5 frames over blank, 'a', 'b', summed by the text it reads."""
    torch.manual_seed(seed)
    log_probs = (torch.randn(5, 3) * 1.5).log_softmax(-1)
    texts: dict[str, float] = {}
    for path in itertools.product(range(3), repeat=5):
        text = to_text([c for i, c in enumerate(path) if c and (i == 0 or c != path[i - 1])], "ab")
        texts[text] = texts.get(text, 0.0) + math.exp(sum(log_probs[t, c].item() for t, c in enumerate(path)))
    assert beam_decode(log_probs, "ab", beam=64) == max(texts, key=texts.get)


def test_a_pattern_picks_the_best_matching_reading():
    # Four sure digits and, between 2 and 3, a frame that is blank (0.55) or 7 (0.45).
    sure = one_hot_frames([2, 0, 3, 0, 0, 4, 0, 5], 11).log_softmax(-1)
    unsure = torch.full((11,), 1e-9).index_put_((torch.tensor([0, 8]),), torch.tensor([0.55, 0.45])).log()
    log_probs = torch.cat([sure[:4], unsure[None], sure[4:]])
    assert beam_decode(log_probs, DIGITS) == "1234"
    assert beam_decode(log_probs, DIGITS, pattern=r"\d{5}") == "12734"
    assert beam_decode(log_probs, DIGITS, pattern=r"\d{4}") == "1234"
    assert beam_decode(log_probs, DIGITS, pattern=r"[a-z]+") == "1234"  # no reading matches: the best one
    with pytest.raises(HwrError, match="not a regular expression"):
        beam_decode(log_probs, DIGITS, pattern="(")


# --- loss ----------------------------------------------------------------------------------


def test_ctc_loss_of_equal_micro_batches_averages_to_the_whole_batch():
    torch.manual_seed(0)
    texts = ["12", "30045", "7", "99", "1234", "0"]  # unequal lengths: the per-character scaling matters
    targets, target_lengths = encode(texts, DIGITS)
    output_lengths = torch.tensor([12, 12, 9, 5, 12, 3])
    logits = torch.randn(6, 12, 11, requires_grad=True)

    whole = ctc_loss(logits, targets, target_lengths, output_lengths)
    (g_whole,) = torch.autograd.grad(whole, logits)
    cut = int(target_lengths[:3].sum())
    halves = (ctc_loss(logits[:3], targets[:cut], target_lengths[:3], output_lengths[:3])
              + ctc_loss(logits[3:], targets[cut:], target_lengths[3:], output_lengths[3:])) / 2
    (g_halves,) = torch.autograd.grad(halves, logits)

    torch.testing.assert_close(halves, whole)
    torch.testing.assert_close(g_halves, g_whole)
    reference = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), targets, output_lengths, target_lengths)
    torch.testing.assert_close(whole, reference)  # PyTorch's own 'mean' is this reduction


def test_ctc_loss_ignores_an_impossible_alignment():
    targets, target_lengths = encode(["1111", "2"], DIGITS)  # "1111" needs 7 frames, it gets 3
    logits = torch.randn(2, 3, 11, requires_grad=True)
    loss = ctc_loss(logits, targets, target_lengths, torch.tensor([3, 3]))
    loss.backward()
    assert torch.isfinite(loss) and logits.grad[0].abs().sum() == 0 and logits.grad[1].abs().sum() > 0
    with pytest.raises(HwrError, match="'x' is not in the alphabet"):
        encode(["1x"], DIGITS)


# --- scores --------------------------------------------------------------------------------


def test_edit_distance_and_scores():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance("12345", "12345") == 0

    a, b = SequenceScores(), SequenceScores()
    readings = [a.add("12345", "12345", 0), a.add("1234", "1284", 1), b.add("999", "9", 2), b.add("10", "01", 3)]
    both = SequenceScores.from_tensor(a.as_tensor() + b.as_tensor())  # what an all-reduce of two ranks gives
    assert both == a.merge(b)
    assert (both.edits, both.chars, both.exact, both.same_length, both.count) == (5, 14, 1, 3, 4)
    assert both.cer == pytest.approx(5 / 14)
    assert both.sequence_accuracy == 0.25 and both.length_accuracy == 0.75
    assert [r.index for r in worst_readings(readings, 2)] == [2, 3]  # distances 2, 2, 1, 0
    assert SequenceScores().cer == 0.0


# --- the model -----------------------------------------------------------------------------


def small_crnn(encoder: str = "lstm", width: int = 8):
    torch.manual_seed(0)
    return build_crnn(ModelConfig(name="crnn", width=width, encoder=encoder, hidden=16, layers=2), len(DIGITS))


@pytest.mark.parametrize("encoder", ["lstm", "transformer"])
def test_crnn_reads_a_frame_per_four_columns(encoder):
    model = small_crnn(encoder).eval()
    widths = torch.tensor([1, 4, 5, 37, 96])
    assert model.output_lengths(widths).tolist() == [1, 1, 2, 10, 24]
    for w in widths.tolist():
        with torch.no_grad():
            out = model(torch.randn(2, 1, 32, w))
        assert out.shape == (2, math.ceil(w / 4), len(DIGITS) + 1)
    out = model.train()(torch.randn(2, 1, 32, 40), torch.tensor([40, 17]))
    out.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("encoder", ["lstm", "transformer"])
def test_an_image_reads_the_same_however_wide_its_batch(encoder):
    model = small_crnn(encoder).eval()
    torch.manual_seed(1)
    images = [torch.randn(1, 32, 13), torch.randn(1, 32, 30)]
    widths = torch.tensor([13, 30])

    def batch(width: int) -> torch.Tensor:
        return torch.stack([F.pad(im, (0, width - im.shape[-1]), value=BACKGROUND) for im in images])

    with torch.no_grad():
        narrow, wide = model(batch(40), widths), model(batch(64), widths)
        unpacked = model(batch(40)), model(batch(64))
    for i, n in enumerate(model.output_lengths(widths).tolist()):
        torch.testing.assert_close(wide[i, :n], narrow[i, :n], atol=1e-5, rtol=0)
    if encoder == "lstm":  # without the widths the backward direction reads the padding
        assert (unpacked[1][0, :4] - unpacked[0][0, :4]).abs().max() > 1e-4


# --- starting from a digit classifier -------------------------------------------------------


def digit_checkpoint(folder: Path, name: str = "fast_cnn", width: int = 16, stem: str = "pool",
                     pool_first: bool = False, norm=(0.13, 0.31)) -> tuple[Path, object]:
    """A checkpoint as `hwr train` writes it, of an untrained classifier with made-up statistics."""
    torch.manual_seed(2)
    cfg = Config()
    cfg.model = ModelConfig(name=name, width=width, head="mlp", stem=stem, pool_first=pool_first)
    net = build_model(cfg.model, 10)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    ckpt = checkpoint.pack(model=net.state_dict(), optimizer={}, scaler=None, ema=None, state=checkpoint.TrainState(),
                           rng=[], world_size=1, config=cfg.to_dict(), classes=list(DIGITS), norm=norm)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.write(ckpt, folder)
    return folder / "last.pt", net.eval()


def test_init_from_copies_a_fast_cnn_and_folds_the_normalisation(tmp_path):
    path, net = digit_checkpoint(tmp_path)
    model = small_crnn(width=16).eval()
    note = init_from(model, path)
    assert "conv stages 1-2" in note and str(path) in note and model.weights_note == note
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():  # the stem computes what the classifier's backbone did
        torch.testing.assert_close(model.features[:8](x), net[:8](x))

    # Data normalised otherwise: the first stage sees what it saw, but for the zero-padded border.
    pixels = torch.rand(3, 1, 28, 28)
    model.set_input_norm(0.4, 0.2)
    with torch.no_grad():
        want = net[:2]((pixels - 0.13) / 0.31)
        got = model.features[:2]((pixels - 0.4) / 0.2)
    torch.testing.assert_close(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], atol=1e-4, rtol=1e-4)


def test_init_from_refuses_what_does_not_fit(tmp_path):
    path, net = digit_checkpoint(tmp_path / "w16")
    with pytest.raises(HwrError, match=r"fast_cnn of width 16 and this CRNN has width 8; set model.width=16"):
        init_from(small_crnn(width=8), path)
    with pytest.raises(HwrError, match=r"does not fit this CRNN's conv stack \(.*shape of 0.weight"):
        load_conv_stages(small_crnn(width=8), net.state_dict(), "w16")
    other, _ = digit_checkpoint(tmp_path / "bn", name="cnn_bn")
    with pytest.raises(HwrError, match="holds a cnn_bn model"):
        init_from(small_crnn(width=16), other)
    strided, _ = digit_checkpoint(tmp_path / "s2", stem="stride2")
    with pytest.raises(HwrError, match="model.stem=stride2.*model.stem=pool"):
        init_from(small_crnn(width=16), strided)
    pooled_first, _ = digit_checkpoint(tmp_path / "pf", pool_first=True)
    with pytest.raises(HwrError, match="model.pool_first=true.*model.pool_first=false"):
        init_from(small_crnn(width=16), pooled_first)
    with pytest.raises(HwrError, match="model.init_from: checkpoint .* not found"):
        init_from(small_crnn(width=16), tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(HwrError, match="model.init_from: .*junk.pt is corrupt or not a checkpoint"):
        init_from(small_crnn(width=16), tmp_path / "junk.pt")


# --- export ----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["lstm", "transformer"])
def test_onnx_and_torchscript_read_any_width(encoder):
    ort = pytest.importorskip("onnxruntime")
    from hwr_dist.export.quantize import quiet_exporters

    model = small_crnn(encoder).eval()
    buf = io.BytesIO()
    with torch.no_grad(), quiet_exporters():
        torch.onnx.export(model, (torch.randn(2, 1, 32, 40),), buf, dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch", 3: "width"}, "logits": {0: "batch", 1: "frames"}})
        traced = torch.jit.trace(model, torch.randn(2, 1, 32, 40))
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for batch, width in ((3, 37), (1, 96)):
        x = torch.randn(batch, 1, 32, width)
        with torch.no_grad():
            want = model(x)
            assert (traced(x) - want).abs().max() < 1e-4
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        assert got.shape == want.shape == (batch, math.ceil(width / 4), len(DIGITS) + 1)
        assert (got - want).abs().max() < 1e-4
