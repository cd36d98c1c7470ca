"""The split stage's settings."""

from __future__ import annotations

from dataclasses import dataclass

from pathlib import Path

from covidxray.infra.config import integer, number, text


@dataclass(frozen=True)
class SplitSettings:
    """What the split stage reads."""

    test_fraction: float
    folds: int
    seed: int
    curated: Path
    splits: Path


def split_settings(cfg) -> SplitSettings:
    return SplitSettings(
        test_fraction=number(cfg, "split.test_fraction", 0.0, 1.0, True, True, "a number in (0, 1)"),
        folds=integer(cfg, "split.folds", 2),
        seed=integer(cfg, "seed", 0, "an integer >= 0"),
        curated=Path(text(cfg, "paths.curated")),
        splits=Path(text(cfg, "paths.splits")),
    )
