"""The content tags of a training run hold the md5 DVC itself records (checked against real
`dvc add` on a temporary folder), so a run's tags can be compared with any revision's dvc.lock."""

from __future__ import annotations

import subprocess

import yaml

from conftest import BIN


def test_dvc_md5_is_what_dvc_records_for_files_and_folders(tmp_path):
    from covidxray.infra.tracking import content_tags, dvc_md5

    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.csv").write_text("x,y\n1,2\n")
    (tmp_path / "data" / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "model.keras").write_bytes(b"PK\x03\x04 not really a zip")
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    for name in ("data", "model.keras"):
        subprocess.run([str(BIN / "dvc"), "add", "-q", name], cwd=tmp_path, check=True, capture_output=True)
        recorded = yaml.safe_load((tmp_path / f"{name}.dvc").read_text())["outs"][0]["md5"]
        assert dvc_md5(tmp_path / name) == recorded, name
    tags = content_tags([tmp_path / "data", tmp_path / "model.keras", tmp_path / "missing"], root=tmp_path)
    assert tags == {
        "dvc.md5:data": dvc_md5(tmp_path / "data"),
        "dvc.md5:model.keras": dvc_md5(tmp_path / "model.keras"),
    }


def test_run_names_say_what_differs(monkeypatch):
    """A run on a composed params.yaml (dvc repro, dvc exp run -S) is named for the preset it
    matches and the values that differ from it (the -S overrides), its collections and config hash."""
    from omegaconf import OmegaConf

    from covidxray.infra import tracking
    from covidxray.infra.config import compose

    def named(overrides: list[str]) -> str:
        params = OmegaConf.to_container(compose(overrides))
        preset, changed = tracking.preset_and_overrides(params)
        collections = list(params["data"]["collections"])
        return tracking.run_name("m-cv2", preset, changed, collections, tracking.config_hash(params))

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    default = named(["paths.models=/elsewhere"])  # where-to keys are not what differs
    assert default == f"pipeline default [ieee8023+kermany+radiography] #{default.split('#')[1][:7]} (m-cv2)"
    assert named([]) == default
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-pods")
    one = named(["experiment=smoke", "train.epochs=3"])
    assert one.startswith("exp bushy-pods smoke train.epochs=3 [ieee8023+kermany+radiography] #")
    two = named(["experiment=smoke", "train.epochs=3", "collection=[ieee8023,kermany]"])  # a collection less
    assert two.startswith("exp bushy-pods smoke train.epochs=3 [ieee8023+kermany] #") and two[-17:] != one[-17:]
    # a long sweep point: cut in the middle to MLflow's limit, told apart by the config hash
    long = [f"model.head.dense_units={u}" for u in (4, 8)]
    names = [tracking.run_name("m", "default", [*["x.y=1"] * 80, o], ["a"], h) for o, h in zip(long, ("1", "2"))]
    assert all(len(n) <= 250 for n in names) and names[0] != names[1]
    assert names[0].endswith("dense_units=4 [a] #1 (m)")
