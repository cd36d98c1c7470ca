"""The pretrained stage's settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from covidxray.infra.config import text


@dataclass(frozen=True)
class PretrainedSettings:
    """What the pretrained stage reads: where the converted weights go (the files to convert and
    their pinned sha256 are the backbones' own: networks/catalogue.py)."""

    folder: Path


def pretrained_settings(cfg) -> PretrainedSettings:
    return PretrainedSettings(Path(text(cfg, "paths.pretrained")))
