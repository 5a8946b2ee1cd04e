"""`hwr predict`: real images through the preprocessing the model was trained with, one table or JSON.

A classifier reads each image as one MNIST-style character (or, with --segment, each character of
a row). A sequence model (CRNN) reads each image as one line, cut to its ink and scaled to the
training lines' height (`preprocess.line_image`), greedily or by beam search, optionally held to a
regular expression; its `probability` is that of the text read: the sum over every frame
alignment that reads as it (CTC), the quantity beam search ranks texts by.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch

from hwr_dist.data.imagefolder import IMAGE_SUFFIXES
from hwr_dist.errors import HwrError

TOP_K = 3  # a classifier's classes shown per image unless --top-k says
PATTERN_BEAM = 16  # --pattern searches this many readings unless --beam says


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders become their image files, sorted."""
    out = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def _open(path: Path):
    from hwr_dist.data.preprocess import open_image

    if not path.exists():
        raise HwrError(f"{path} does not exist")
    return open_image(path)


def read_characters(path: Path, segment: bool) -> torch.Tensor:
    """uint8 [K, 28, 28]: one image, or each character of a row when segmenting."""
    from hwr_dist.data.preprocess import characters

    return characters(_open(path), segment, str(path))


def read_line(path: Path, layout) -> torch.Tensor:
    """uint8 [height, W]: the image as one line, laid out as a sequence model's training lines (`layout`)."""
    from hwr_dist.data.preprocess import line_image

    return line_image(_open(path), layout, str(path))


def answer(probs: torch.Tensor, classes: list[str], top_k: int, segment: bool) -> dict:
    """One image's answer from its characters' probabilities [K, classes]; `hwr serve` answers with it too."""
    top = probs.topk(min(top_k, len(classes)), dim=1)
    per_char = [[{"class": classes[i], "probability": round(float(p), 4)}
                 for p, i in zip(ps.tolist(), ix.tolist())] for ps, ix in zip(top.values, top.indices)]
    item = {"prediction": "".join(c[0]["class"] for c in per_char),
            "probability": round(float(top.values[:, 0].prod()), 4), "top": per_char[0] if not segment else None}
    if segment:
        item["characters"] = per_char
    return item


def reading(logits: torch.Tensor, alphabet: list[str], beam: int | None, pattern: str | None) -> dict:
    """One line's reading from its logits [frames, classes + 1]: greedy, or the best of a beam search
    (the best that fullmatches `pattern`, when one does: `matches_pattern` says)."""
    from hwr_dist.ctc import beam_decode, greedy_decode, to_text

    if beam:
        text = beam_decode(logits, alphabet, beam, pattern)
    else:
        text = to_text(greedy_decode(logits[None], torch.tensor([len(logits)]))[0], alphabet)
    item = {"text": text, "probability": round(text_probability(logits, text, alphabet), 4)}
    if pattern is not None:
        item["matches_pattern"] = re.fullmatch(pattern, text) is not None
    return item


def text_probability(logits: torch.Tensor, text: str, alphabet: list[str]) -> float:
    """P(text | image) under CTC, from logits [frames, classes + 1]: every alignment that reads as `text`."""
    from hwr_dist.ctc import ctc_loss, encode

    targets, lengths = encode([text], alphabet)
    # ctc_loss is the negative log probability over the text's length (at least 1); a decoded text
    # always has an alignment, so its zero_infinity never applies here
    loss = ctc_loss(logits[None], targets, lengths, torch.tensor([len(logits)]))
    return math.exp(-float(loss) * max(1, len(text)))


def check_options(trained, top_k: int | None, segment: bool, beam: int | None, pattern: str | None) -> None:
    """The flags that suit the model: --top-k and --segment a classifier's, --beam and --pattern a
    sequence model's; a pattern must compile."""
    what = f"{trained.path} holds a {trained.architecture}"
    if trained.task == "sequence":
        if segment:
            raise HwrError(f"--segment cuts a row into characters for a classifier; {what} sequence model, which "
                           "reads the whole row: leave --segment out")
        if top_k is not None:
            raise HwrError(f"--top-k ranks a classifier's classes; {what} sequence model, which reads whole rows: "
                           "leave --top-k out (--beam N searches N readings)")
    elif beam is not None or pattern is not None:
        raise HwrError(f"--beam and --pattern search a sequence model's readings; {what} classifier: leave them out "
                       "(--segment reads a row of characters with it)")
    if pattern is not None:
        from hwr_dist.ctc import PatternAutomaton

        try:
            re.compile(pattern)
        except re.error as e:
            raise HwrError(f"--pattern '{pattern}' is not a regular expression ({e}); e.g. --pattern '\\d{{5}}' "
                           "for five digits") from None
        PatternAutomaton(pattern, trained.classes)  # one the search can follow (no back-references)


def predict_files(checkpoint: Path, paths: list[Path], top_k: int | None, json_out: bool, segment: bool,
                  beam: int | None = None, pattern: str | None = None) -> int:
    """Print predictions; each unusable file gets an `error:` line on stderr (and an `error` field in
    JSON) and the others go on. Returns the count of unusable files."""
    from hwr_dist.export.use import load_any

    trained = load_any(checkpoint)
    check_options(trained, top_k, segment, beam, pattern)
    sequence = trained.task == "sequence"
    beam = beam or (PATTERN_BEAM if pattern is not None else None)

    def read(path: Path) -> torch.Tensor:
        return read_line(path, trained.layout) if sequence else read_characters(path, segment)

    def respond(image: torch.Tensor) -> dict:
        if sequence:
            return reading(trained.line_logits(image), trained.classes, beam, pattern)
        return answer(trained.probabilities(image), trained.classes, top_k or TOP_K, segment)

    files = expand(paths)
    if not files:
        raise HwrError("no image files found in the given paths")
    results, failures = [], 0
    for path in files:
        try:
            image = read(path)
        except HwrError as e:  # this file is unusable: say so, go on with the others
            failures += 1
            why = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
            print(f"error: {why}", file=sys.stderr, flush=True)
            results.append({"file": str(path), "error": str(e)})
            continue
        results.append({"file": str(path), **respond(image)})
    if json_out:
        print(json.dumps(results, indent=1))
    elif sequence:
        print_readings(results, pattern)
    else:
        print_table(results)
    return failures


def _table(*columns: str):
    from rich.table import Table

    table = Table(title_justify="left")
    table.add_column("file", overflow="fold")  # whole paths, wrapped rather than cut
    for col in columns:
        table.add_column(col)
    return table


def _skipped(r: dict) -> tuple[str, str]:
    """An unusable file's row: its name, and its reason without the name (the first column has it)."""
    from rich.markup import escape

    return escape(r["file"]), f"[red]{escape(r['error'].removeprefix(r['file']).lstrip(' :'))}"


def _show(table) -> None:
    from rich.console import Console

    Console(file=sys.stdout).print(table)


def print_table(results: list[dict]) -> None:
    from rich.markup import escape

    table = _table("prediction", "probability", "top")
    for r in results:
        if "error" in r:
            file, reason = _skipped(r)
            table.add_row(file, "[red]skipped", "", reason)
            continue
        top = r["top"] or [c[0] for c in r["characters"]]
        table.add_row(escape(r["file"]), r["prediction"], f"{r['probability']:.3f}",
                      "  ".join(f"{c['class']} {c['probability']:.2f}" for c in top))
    _show(table)


def print_readings(results: list[dict], pattern: str | None) -> None:
    """A sequence model's table: the text read and its probability (and whether it matches --pattern)."""
    from rich.markup import escape

    table = _table("text", "probability", *(["pattern"] if pattern is not None else []))
    for r in results:
        if "error" in r:
            file, reason = _skipped(r)
            table.add_row(file, "[red]skipped", reason)
            continue
        match = [] if pattern is None else ["matches" if r["matches_pattern"] else "[yellow]no match"]
        table.add_row(escape(r["file"]), escape(r["text"]), f"{r['probability']:.3f}", *match)
    _show(table)
