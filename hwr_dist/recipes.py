"""A run's config as the user names it, loaded and checked whole.

A config is a YAML path or the name of a recipe shipped in the package (`hwr recipes`), so
`hwr train fast_sample` works from any folder after `pip install`. `load` is what every
command calls: defaults <- YAML <- overrides (`hwr_dist.config`), then each section checked
by its owner: data, models, the task (they must fit), the optimizer and schedule, the loop, tracking.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hwr_dist.config import Config, load_config
from hwr_dist.data import check_config as check_data
from hwr_dist.errors import HwrError
from hwr_dist.models import check_config as check_model
from hwr_dist.tasks import check_config as check_task
from hwr_dist.tracking import check_config as check_tracking
from hwr_dist.train.optim import check_config as check_optim
from hwr_dist.train.setup import check_config as check_train

RECIPES = Path(__file__).resolve().parent / "recipes"


def names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def find(config: str | Path) -> Path:
    """A path as given when it exists (or looks like a path); else the shipped recipe of that name."""
    path = Path(config)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    recipe = RECIPES / f"{config}.yaml"
    if recipe.is_file():
        return recipe
    raise HwrError(f"no config file {config} and no recipe of that name; pass a YAML path or one of "
                   f"{', '.join(names())} (`hwr recipes`)")


def load(config: str | Path | None, overrides: list[str] = ()) -> Config:
    cfg = load_config(find(config) if config is not None else None, list(overrides))
    for check in (check_data, check_model, check_task, check_optim, check_train, check_tracking):
        check(cfg)
    return cfg


def describe(name: str) -> str:
    """A recipe's first sentence, from the comment at its top: what it is for."""
    lines = (RECIPES / f"{name}.yaml").read_text().splitlines()
    words = " ".join(line.lstrip("# ").strip() for line in lines[: next(
        (i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))])
    sentence = words.split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= 110 else sentence[:107] + "..."


def copy(name: str, dest: Path | None) -> Path:
    """Write a recipe out for editing; never over an existing file."""
    source = find(name)
    if source.parent != RECIPES:
        raise HwrError(f"{name} is not a shipped recipe; choose one of {', '.join(names())}")
    target = Path(dest) if dest is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise HwrError(f"{target} exists; choose another destination")
    shutil.copyfile(source, target)
    return target
