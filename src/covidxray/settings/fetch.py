"""The fetch stage's settings."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from covidxray.infra.config import fail, integer, number, text


@dataclass(frozen=True)
class FetchSettings:
    """What the fetch stage reads: the collection's repository, commit and URL, its manifest, how
    hard to try, and where data/raw goes."""

    repo: str
    commit: str
    base_url: str
    manifest: Path
    retries: int
    timeout_s: float
    raw: Path


def fetch_settings(cfg) -> FetchSettings:
    repo = text(cfg, "fetch.repo")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        fail("fetch.repo", "a GitHub owner/name", repo)
    commit = text(cfg, "fetch.commit")
    if not re.fullmatch(r"[0-9a-fA-F]{40}", commit):
        fail("fetch.commit", "a full 40-digit hex commit", commit)
    base_url = text(cfg, "fetch.base_url")
    if not re.match(r"https?://", base_url):
        fail("fetch.base_url", "an http(s):// URL", base_url)
    return FetchSettings(
        repo=repo,
        commit=commit,
        base_url=base_url,
        manifest=Path(text(cfg, "fetch.manifest")),
        retries=integer(cfg, "fetch.retries", 0),
        timeout_s=number(cfg, "fetch.timeout_s", 0.0, math.inf, True, True, "a number of seconds > 0"),
        raw=Path(text(cfg, "paths.raw")),
    )
