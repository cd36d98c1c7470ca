"""The `covidxray` command itself: parameter files with YAML errors, and one Hydra output folder
per run even when runs start in the same second."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import yaml

from conftest import BIN, REPO


def test_yaml_error_in_params_is_one_line_with_file_and_line(tmp_path):
    params = (REPO / "params.yaml").read_text().splitlines()
    line = next(i for i, text in enumerate(params) if text.startswith("  curated:"))
    params[line] += " :"  # `curated: data/curated :` (a colon inside a plain value)
    bad = tmp_path / "params.yaml"
    bad.write_text("\n".join(params) + "\n")
    done = subprocess.run(
        [str(BIN / "covidxray"), "split", "--params", str(bad)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"covidxray split: error: {bad}:{line + 1}:")
    assert "not valid YAML" in done.stderr

    (tmp_path / "list.yaml").write_text("- seed\n- data\n")
    done = subprocess.run(
        [str(BIN / "covidxray"), "curate", "--params", str(tmp_path / "list.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "expected a mapping" in done.stderr


def test_runs_started_in_the_same_second_get_their_own_output_folders(tmp_path):
    """Hydra's `now` frozen to one instant in two processes: their run and sweep folders differ."""
    code = textwrap.dedent(f"""
        import datetime
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf
        import covidxray.cli  # registers covidxray.run_id, as for every covidxray command
        instant = datetime.datetime(2026, 1, 2, 3, 4, 5)
        with initialize_config_dir(config_dir={str(REPO / "conf")!r}, version_base=None):
            # after Hydra's own registration of `now`, which initialize_config_dir makes
            OmegaConf.register_new_resolver("now", lambda fmt: instant.strftime(fmt), replace=True)
            cfg = compose("config", return_hydra_config=True)
        print(cfg.hydra.run.dir)
        print(cfg.hydra.sweep.dir)
    """)
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    first, second = (run.communicate(timeout=120)[0].split() for run in runs)
    assert all(run.returncode == 0 for run in runs)
    assert first[0].startswith("outputs/2026-01-02/03-04-05") and first[1].startswith("multirun/2026-01-02/03-04-05")
    assert first[0] != second[0] and first[1] != second[1]


def test_a_hydra_run_names_its_folder_by_time_and_run_id(tmp_path):
    """A real run of a stage as a Hydra app (it fails fast on a missing input) resolves the run id."""
    done = subprocess.run(
        [str(BIN / "covidxray"), "split", f"paths.curated={tmp_path / 'none'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "curated index missing" in done.stderr
    (day,) = (tmp_path / "outputs").iterdir()
    (folder,) = day.iterdir()
    assert re.fullmatch(r"\d\d-\d\d-\d\d-\d+-[0-9a-f]{4}", folder.name), folder.name
    assert yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) == [f"paths.curated={tmp_path / 'none'}"]
