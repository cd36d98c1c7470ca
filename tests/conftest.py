"""Shared test fixtures: where the repository, the shared data folder and the mirror are."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MIRROR = SHARED / "datasets"
COMMIT = "0f7245db6f5aa4001ea75cf69fe6cfe091928403"
COLLECTION = MIRROR / "raw.githubusercontent.com" / "ieee8023" / "covid-chestxray-dataset" / COMMIT
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def collection_dir() -> Path:
    """The mirrored COVID-19 image collection at the pinned commit (../shared)."""
    if not COLLECTION.is_dir():
        pytest.fail(f"the shared mirror is missing: {COLLECTION}")
    return COLLECTION


@pytest.fixture(scope="session")
def external_dir() -> Path:
    """data/external (normal and viral-pneumonia X-rays), pulled from the shared DVC remote if needed."""
    target = REPO / "data" / "external"
    if not (target / "chest_xray" / "NORMAL").is_dir():
        subprocess.run([str(BIN / "dvc"), "pull", "-q", "data.dvc"], cwd=REPO, check=True)
    return target
