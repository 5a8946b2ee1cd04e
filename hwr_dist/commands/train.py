"""`hwr train`: one training job in this process; the same entry as `python -m hwr_dist.train`."""

from __future__ import annotations

from pathlib import Path


def train(config: Path, overrides: list[str], quiet: bool) -> None:
    from hwr_dist.train.run import main

    main([str(config), *overrides, *(["--quiet"] if quiet else [])])
