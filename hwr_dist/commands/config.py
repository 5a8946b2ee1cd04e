"""`hwr config show` and `hwr config run-dir`."""

from __future__ import annotations

from pathlib import Path

from hwr_dist.config import to_yaml
from hwr_dist.recipes import load


def show(config: Path, overrides: list[str]) -> None:
    """The resolved config: defaults, then the file, then the overrides."""
    print(to_yaml(load(config, overrides)), end="")


def run_dir(config: Path, overrides: list[str]) -> None:
    """The run directory (train.out_dir/train.name, absolute) the config resolves to."""
    cfg = load(config, overrides)
    print(str((Path(cfg.train.out_dir) / cfg.train.name).absolute()))


def field_docs() -> dict[str, str]:
    """class name -> {field -> doc}: the string under each field in hwr_dist/config.py."""
    import ast
    import inspect

    from hwr_dist import config as module

    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.ClassDef):
            body, fields = node.body, {}
            for this, after in zip(body, body[1:] + [None]):
                if isinstance(this, ast.AnnAssign) and isinstance(after, ast.Expr) \
                        and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                    fields[this.target.id] = " ".join(after.value.value.split())
            docs[node.name] = fields
    return docs


def show_doc(config: Path | None, overrides: list[str]) -> None:
    """Every key with its resolved value and what it means."""
    import dataclasses

    cfg = load(config, overrides)
    docs = field_docs()

    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            print(f"{prefix}{f.name} = {value!r}")
            if doc := docs.get(type(obj).__name__, {}).get(f.name):
                print(f"    {doc}")

    walk(cfg, "")
