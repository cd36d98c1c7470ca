"""The registry moves @champion only on purpose: the committed default pipeline or `covidxray
promote`; versions whose run never installed are marked and cannot be promoted. Model files and
their metadata are checked like input files are."""

from __future__ import annotations

import json
import math
import subprocess
import zipfile

import numpy as np
import pytest

from conftest import BIN, REPO, clean_env
from covidxray import CovidXrayError

NAME = "covid-xray-detector"


@pytest.fixture
def store(tmp_path):
    """A real SQLite MLflow store with NAME registered: version 1 installed, version 2 not."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from covidxray.serving import registry

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient()
    client.create_registered_model(NAME)
    for installed in ("true", "false"):
        version = client.create_model_version(NAME, source=(tmp_path / "model").as_uri())
        client.set_model_version_tag(NAME, version.version, registry.INSTALLED_TAG, installed)
    return uri


def test_promote_moves_champion_and_refuses_a_version_never_installed(store):
    from mlflow.tracking import MlflowClient

    from covidxray.serving import registry

    assert registry.promote(NAME, "1") is None
    assert str(MlflowClient().get_model_version_by_alias(NAME, registry.CHAMPION).version) == "1"
    with pytest.raises(CovidXrayError, match="version 2 was never installed"):
        registry.promote(NAME, "2")
    with pytest.raises(CovidXrayError, match="no version 9"):
        registry.promote(NAME, "9")
    assert str(MlflowClient().get_model_version_by_alias(NAME, registry.CHAMPION).version) == "1"


def _promote(version: str, store: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "covidxray"), "promote", version, "--tracking-uri", store],
        capture_output=True,
        text=True,
        env=clean_env(PYTHONPATH=str(REPO / "src")),  # this tree's code, as installed
        cwd=cwd,
    )


def test_promote_command_says_what_moved_in_one_line(store, tmp_path):
    done = _promote("2", store, tmp_path)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith("covidxray promote: error: ")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = _promote("1", store, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"promote: {NAME} @champion: no version -> version 1",
        "  no LOCO figures on this version (the loco stage has not run for it)",
    ]
    # from -> to, with the LOCO figures the loco stage tagged each version with
    from covidxray.serving import registry

    registry.tag_figures(NAME, "1", {"loco_auc_mean": 0.70201, "loco_auc_worst": 0.66394, "loco_margin_mean": 0.1})
    registry.tag_figures(NAME, "2", {"loco_auc_mean": 0.75, "loco_auc_worst": 0.6812, "loco_margin_worst": -0.2})
    registry.mark_installed(NAME, "2")
    done = _promote("2", store, tmp_path)
    assert done.stdout.splitlines() == [
        f"promote: {NAME} @champion: version 1 -> version 2",
        "  LOCO: auc_mean 0.75 (was 0.702), auc_worst 0.6812 (was 0.6639), margin_worst -0.2",
    ], done.stderr


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_only_the_committed_default_pipeline_is_intended(tmp_path, monkeypatch):
    from covidxray.serving import registry

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    repo = tmp_path / "repo"
    (repo / "conf").mkdir(parents=True)
    (repo / "params.yaml").write_text("seed: 42\n")
    (repo / "conf" / "config.yaml").write_text("seed: 42\n")
    (repo / "dvc.lock").write_text("a\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x")
    assert registry.committed_default(repo) == (True, "")
    assert registry.committed_default(repo, params={"seed": 42}) == (True, "")
    assert registry.committed_default(repo, params={"seed": 7})[0] is False  # another config, same tree
    (repo / "dvc.lock").write_text("b\n")  # the pipeline's own outputs change while it runs
    assert registry.committed_default(repo) == (True, "")
    (repo / "params.yaml").write_text("seed: 1\n")  # dvc exp run -S ... rewrites params.yaml
    intended, why = registry.committed_default(repo)
    assert not intended and "params.yaml" in why
    _git(repo, "checkout", "--", "params.yaml")
    monkeypatch.setenv("DVC_EXP_NAME", "smoke-exp")
    assert registry.committed_default(repo) == (False, "a DVC experiment (smoke-exp)")
    assert registry.committed_default(tmp_path / "elsewhere")[0] is False


# -- model files and their metadata ------------------------------------------------------------------


def _tiny_model():
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8, 8, 1)), layers.Flatten(), layers.Dense(2, activation="softmax")])


def test_saved_models_carry_no_time_stamps(tmp_path):
    import time

    from covidxray.networks import model_file

    model = _tiny_model()
    first = model_file.save(model, tmp_path / "a.keras").read_bytes()
    time.sleep(2.1)  # zip dates have a 2 s resolution
    second = model_file.save(model, tmp_path / "b.keras").read_bytes()
    assert first == second
    with zipfile.ZipFile(tmp_path / "a.keras") as archive:
        assert {info.date_time for info in archive.infolist()} == {model_file.ZIP_DATE}
        assert json.loads(archive.read("metadata.json"))["date_saved"] == model_file.SAVED_DATE
        assert b'"shared_object_id": 1' in archive.read("config.json")  # not a memory address
    assert model_file.load(tmp_path / "a.keras").count_params() == model.count_params()


GOOD = {"classes": ["normal", "covid"], "image_size": 32, "resize": "stretch", "threshold": 0.4}


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("threshold", float("nan"), "threshold must be a finite number in [0, 1], got nan"),
        ("threshold", "abc", "threshold must be a finite number in [0, 1], got 'abc'"),
        ("threshold", 1.5, "threshold must be a finite number in [0, 1], got 1.5"),
        ("classes", ["cat", "dog"], "classes must be ['normal', 'covid'] or"),
        ("image_size", 0, "image_size must be an integer number of pixels in [8, 4096], got 0"),
        ("store_size", "224", "store_size must be an integer number of pixels"),
    ],
)
def test_check_meta_names_the_bad_field_in_one_line(field, value, message):
    from covidxray.networks.model_file import check_meta

    with pytest.raises(CovidXrayError) as err:
        check_meta({**GOOD, field: value}, "models/model.json")
    assert str(err.value).startswith(f"models/model.json: model metadata field {field}")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert math.isclose(check_meta(GOOD, "x")["threshold"], 0.4)


def test_pixels_pass_the_same_xray_checks_as_files():
    import pandas as pd

    from covidxray.networks.inference import decode_rows

    meta = {**GOOD, "store_size": 32, "normalize": "none", "crop_border": 0.0}
    with pytest.raises(CovidXrayError, match="too small for a chest X-ray: row 0"):
        decode_rows(pd.DataFrame({"pixels": [[[200]]]}), meta)
    flat = np.full((64, 64), 200).tolist()
    with pytest.raises(CovidXrayError, match="too flat for a chest X-ray: row 0"):
        decode_rows(pd.DataFrame({"pixels": [flat]}), meta)
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64)).tolist()
    assert decode_rows(pd.DataFrame({"pixels": [noisy]}), meta).shape == (1, 32, 32)


INSTALLER = """
import json, sys
from pathlib import Path
from covidxray.infra import fileset, tracking
models, version = Path(sys.argv[1]), sys.argv[2]
with fileset.install_together([models]) as (staged,):
    (staged / "model.keras").write_bytes(b"the model of version " + version.encode())
    run = {"registered_model": "covid-xray-detector", "registered_version": int(version)}
    run["model_md5"] = tracking.dvc_md5(staged / "model.keras")
    (staged / "model.run.json").write_text(json.dumps(run))
"""


def test_promote_after_a_kill_between_commit_and_install(store, tmp_path, monkeypatch):
    """A training killed after committing its install (journal written) but before tagging the
    version installed: whoever finishes the install marks it, so `promote 2` moves @champion
    instead of refusing a version every reader already serves."""
    import sys

    from mlflow.tracking import MlflowClient

    from covidxray.serving import registry
    from covidxray.tools.promote import promote_cli
    from test_fileset import _kill_at

    models = tmp_path / "models"
    argv = [sys.executable, "-c", INSTALLER, str(models), "2"]
    _kill_at("committed", argv, tmp_path / "paused", cwd=tmp_path)
    assert not (models / "model.keras").exists()  # committed, not yet installed
    assert MlflowClient().get_model_version(NAME, "2").tags[registry.INSTALLED_TAG] == "false"
    monkeypatch.chdir(tmp_path)  # paths.models: models/ here
    assert promote_cli(["2", "--tracking-uri", store]) == 0
    assert (models / "model.keras").read_bytes() == b"the model of version 2"
    assert MlflowClient().get_model_version(NAME, "2").tags[registry.INSTALLED_TAG] == "true"
    assert str(MlflowClient().get_model_version_by_alias(NAME, registry.CHAMPION).version) == "2"
