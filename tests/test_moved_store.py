"""A copied or moved checkout logs into its own MLflow store: the local SQLite store records
absolute artifact locations (MLflow resolves every local one), which follow the store when it has
moved, so new runs, registry URIs and downloads stay inside the checkout they run in."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import make_cfg
from test_evaluate import overrides, tiny  # noqa: F401 (the session's trained smoke model)
from test_predict import run_cli

EXPERIMENT = "covid-xray"


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _locations(db: Path) -> list[str]:
    from covidxray.infra.tracking import LOCATION_COLUMNS

    with sqlite3.connect(db) as conn:
        return [
            value
            for table, column in LOCATION_COLUMNS
            for (value,) in conn.execute(f"SELECT {column} FROM {table}")
            if value and not value.startswith("models:/")
        ]


def test_a_moved_checkout_predicts_validates_and_trains_into_itself(tiny, tmp_path):  # noqa: F811
    from covidxray.stages import train
    from covidxray.tools.predict import predict_cli
    from covidxray.tools.validate import validate_cli

    original = Path(tiny["root"]) / "mlruns" / "artifacts"
    before = _files(original)
    copy = tmp_path / "checkout"
    for name in ("mlruns", "models"):
        shutil.copytree(Path(tiny["root"]) / name, copy / name)
    moved = tmp_path / "moved"
    copy.rename(moved)  # a copy of one checkout, then moved: both places it was made in are elsewhere
    store = f"sqlite:///{moved / 'mlruns' / 'mlflow.db'}"

    rng = np.random.default_rng(0)
    for label in ("normal", "covid"):
        (moved / "set" / label).mkdir(parents=True)
        for i in range(3):
            pixels = np.clip(rng.normal(100, 30, (32, 32)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(moved / "set" / label / f"{i}.png")
    image = moved / "set" / "normal" / "0.png"
    code, out, err = run_cli(predict_cli, [image, "--model", tiny["meta"]["model_uri"], "--tracking-uri", store])
    assert code == 0, err
    argv = [moved / "set", "--model", tiny["meta"]["model_uri"], "--out", moved / "report", "--tracking-uri", store]
    code, out, err = run_cli(validate_cli, [*argv, "--bootstrap", 10])
    assert code == 0, err
    dirs = {**tiny, "models": moved / "models", "reports": moved / "reports", "tracking_uri": store}
    train.main(make_cfg(overrides(dirs, extra=["train.epochs=1", "mlflow.register=true"])))

    assert _files(original) == before  # nothing written into the checkout the store came from
    assert not (tmp_path / "checkout").exists()
    locations = _locations(moved / "mlruns" / "mlflow.db")
    ours = [v for v in locations if v.startswith("file://")]  # not MLflow's Default experiment (cwd/mlruns/0)
    assert len(ours) > 4 and all(v.startswith((moved / "mlruns").as_uri()) for v in ours), locations
    assert not [v for v in locations if str(tiny["root"]) in v or str(tmp_path / "checkout") in v], locations
    artifacts = _files(moved / "mlruns" / "artifacts")
    assert any(name.endswith("validation/metrics.json") for name in artifacts)
    assert any(name.endswith("cv/metrics.json") for name in artifacts)


def test_an_older_store_moved_or_pointing_elsewhere(tmp_path):
    """An older store made in another checkout (its experiment at <there>/mlruns/artifacts) is
    moved here on first use; one whose artifacts were put in a folder of another layout on
    purpose (a shared artifact folder) is left alone."""
    import mlflow

    from covidxray.infra import tracking

    there, here = tmp_path / "there" / "mlruns", tmp_path / "here" / "mlruns"
    here.mkdir(parents=True)
    uri = f"sqlite:///{here / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("shared", artifact_location=(tmp_path / "shared" / "artifacts").as_uri())
    mlflow.create_experiment("old", artifact_location=(there / "artifacts").as_uri())
    assert tracking.follow_moved_store(uri) == there
    assert mlflow.get_experiment_by_name("old").artifact_location == (here / "artifacts").as_uri()
    assert mlflow.get_experiment_by_name("shared").artifact_location == (tmp_path / "shared" / "artifacts").as_uri()
    assert tracking.follow_moved_store(uri) is None  # done once
