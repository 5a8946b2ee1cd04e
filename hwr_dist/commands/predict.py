"""`hwr predict`: real images through the same MNIST-style preprocessing, one table or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from hwr_dist.data.imagefolder import IMAGE_SUFFIXES
from hwr_dist.errors import HwrError



def expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders become their image files, sorted."""
    out = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def read_characters(path: Path, segment: bool) -> torch.Tensor:
    """uint8 [K, 28, 28]: one image, or each character of a row when segmenting."""
    from hwr_dist.data.preprocess import characters, open_image

    if not path.exists():
        raise HwrError(f"{path} does not exist")
    return characters(open_image(path), segment, str(path))


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


def predict_files(checkpoint: Path, paths: list[Path], top_k: int, json_out: bool, segment: bool) -> int:
    """Print predictions; each unusable file gets an `error:` line on stderr (and an `error` field in
    JSON) and the others go on. Returns the count of unusable files."""
    from hwr_dist.export.use import load_any

    trained = load_any(checkpoint)
    files = expand(paths)
    if not files:
        raise HwrError("no image files found in the given paths")
    results, failures = [], 0
    for path in files:
        try:
            chars = read_characters(path, segment)
        except HwrError as e:  # this file is unusable: say so, go on with the others
            failures += 1
            why = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
            print(f"error: {why}", file=sys.stderr, flush=True)
            results.append({"file": str(path), "error": str(e)})
            continue
        results.append({"file": str(path), **answer(trained.probabilities(chars), trained.classes, top_k, segment)})
    if json_out:
        print(json.dumps(results, indent=1))
    else:
        print_table(results)
    return failures


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title_justify="left")
    table.add_column("file", overflow="fold")  # whole paths, wrapped rather than cut
    for col in ("prediction", "probability", "top"):
        table.add_column(col)
    for r in results:
        if "error" in r:
            reason = r["error"].removeprefix(r["file"]).lstrip(" :")  # the file is in the first column already
            table.add_row(escape(r["file"]), "[red]skipped", "", f"[red]{escape(reason)}")
            continue
        top = r["top"] or [c[0] for c in r["characters"]]
        table.add_row(escape(r["file"]), r["prediction"], f"{r['probability']:.3f}",
                      "  ".join(f"{c['class']} {c['probability']:.2f}" for c in top))
    Console(file=sys.stdout).print(table)
