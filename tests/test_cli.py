"""The `covidxray` command itself: parameter files with YAML errors."""
from __future__ import annotations

import subprocess

from conftest import BIN, REPO


def test_yaml_error_in_params_is_one_line_with_file_and_line(tmp_path):
    params = (REPO / "params.yaml").read_text().splitlines()
    line = next(i for i, text in enumerate(params) if text.startswith("  curated:"))
    params[line] += " :"  # `curated: data/curated :` (a colon inside a plain value)
    bad = tmp_path / "params.yaml"
    bad.write_text("\n".join(params) + "\n")
    done = subprocess.run([str(BIN / "covidxray"), "split", "--params", str(bad)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"covidxray split: error: {bad}:{line + 1}:")
    assert "not valid YAML" in done.stderr

    (tmp_path / "list.yaml").write_text("- seed\n- data\n")
    done = subprocess.run([str(BIN / "covidxray"), "curate", "--params", str(tmp_path / "list.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "expected a mapping" in done.stderr
