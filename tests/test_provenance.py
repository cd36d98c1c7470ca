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
