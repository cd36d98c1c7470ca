"""outputs.py: folders replaced whole, leftovers of killed runs removed (real SIGKILLed processes),
folders a tool did not write never replaced, and JSON-safe values."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from conftest import run_until_killed
from covidxray import CovidXrayError
from covidxray.infra import outputs as O


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_replace_dir_swaps_whole_and_keeps_the_previous_on_error(tmp_path):
    target = tmp_path / "out"
    assert O.replace_dir(target, lambda d: (d / "a.txt").write_text("1"), by="tool") == 1
    assert _tree(target) == {"a.txt": "1"}

    def fail(d):
        (d / "b.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        O.replace_dir(target, fail, by="tool")
    assert _tree(target) == {"a.txt": "1"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    O.replace_dir(target, lambda d: (d / "c.txt").write_text("3"), by="tool")
    assert _tree(target) == {"c.txt": "3"} and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_killed_runs_scratch_is_removed_by_the_next_run_and_nothing_else(tmp_path):
    run_until_killed(
        """
        from covidxray.infra.outputs import replace_dir
        def write(d):
            (d / "big.bin").write_bytes(b"x" * 1000)
            die()
        replace_dir("data/raw", write, by="fetch")
    """,
        tmp_path,
    )
    left = [p.name for p in (tmp_path / "data").iterdir()]
    assert len(left) == 1 and left[0].startswith(".raw.fetch-"), left
    # not ours: a folder with the same kind of name but no marker, and one of a live process
    foreign = tmp_path / "data" / ".raw.fetch-123-abcdef"
    (foreign / "keep").mkdir(parents=True)
    alive = tmp_path / "data" / ".raw.fetch-live"
    alive.mkdir()
    (alive / O.SCRATCH_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    other = tmp_path / "data" / ".curated.curate-1-x"
    other.mkdir()

    O.replace_dir(tmp_path / "data" / "raw", lambda d: (d / "f").write_text("new"), by="fetch")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        [".curated.curate-1-x", ".raw.fetch-123-abcdef", ".raw.fetch-live", "raw"]
    )
    assert _tree(tmp_path / "data" / "raw") == {"f": "new"}


def test_a_run_killed_between_the_renames_gets_the_previous_output_back(tmp_path):
    (tmp_path / "curated").mkdir()
    (tmp_path / "curated" / "index.csv").write_text("previous")
    run_until_killed(
        """
        import os
        from covidxray.infra import outputs
        rename, calls = os.rename, []
        def rename_then_die(a, b):
            calls.append(a)
            if len(calls) == 2:
                die()          # the previous output is set aside, the new one not yet in place
            rename(a, b)
        outputs.os.rename = rename_then_die
        outputs.replace_dir("curated", lambda d: (d / "index.csv").write_text("new"), by="curate")
    """,
        tmp_path,
    )
    assert not (tmp_path / "curated").exists()
    removed = O.clean_leftovers(tmp_path, "curated.curate")
    assert len(removed) == 1
    assert _tree(tmp_path / "curated") == {"index.csv": "previous"}
    assert [p.name for p in tmp_path.iterdir()] == ["curated"]


def test_scratch_dir_is_marked_and_removed(tmp_path):
    with O.scratch_dir(tmp_path / "reports", "evaluate") as work:
        assert work.is_dir() and not any(work.iterdir())
        assert (work.parent / O.SCRATCH_MARKER).is_file() and work.parent.name.startswith(".evaluate-")
    assert list((tmp_path / "reports").iterdir()) == []


def test_owned_output_replaces_only_its_own_folder(tmp_path):
    reports = tmp_path / "reports"
    (reports / "cv").mkdir(parents=True)
    (reports / "cv" / "metrics.json").write_text("{}")
    with pytest.raises(CovidXrayError, match=f"refusing to replace {reports}: a non-empty folder"):
        O.replace_dir(reports, lambda d: (d / "metrics.json").write_text("{}"), by="validate", owned=True)
    assert _tree(reports) == {"cv/metrics.json": "{}"}
    assert [p.name for p in tmp_path.iterdir()] == ["reports"]

    empty = tmp_path / "empty"
    empty.mkdir()
    O.replace_dir(empty, lambda d: (d / "r.md").write_text("1"), by="validate", owned=True)
    O.replace_dir(empty, lambda d: (d / "r.md").write_text("2"), by="validate", owned=True)  # its own: replaced
    assert _tree(empty) == {"r.md": "2", O.OWNER_FILE: '{"written_by": "validate"}\n'}
    with pytest.raises(CovidXrayError, match="not a folder"):
        O.check_replaceable(empty / "r.md", "validate")
    with pytest.raises(CovidXrayError, match="that other did not write"):  # written by validate, not by other
        O.check_replaceable(empty, "other")


def test_json_safe():
    value = {
        1: np.int64(3),
        "f": np.float32(0.123456),
        "nan": float("nan"),
        "inf": np.float64(math.inf),
        "t": (1, 2.5),
        "s": "x",
        "b": True,
    }
    assert O.json_safe(value) == {
        "1": 3,
        "f": pytest.approx(0.123456),
        "nan": None,
        "inf": None,
        "t": [1, 2.5],
        "s": "x",
        "b": True,
    }
    assert O.json_safe(value, digits=4)["f"] == 0.1235
    json.dumps(O.json_safe(value), allow_nan=False)


def test_figures_text_rounds_what_differs_between_cpus():
    """Issue 23: a threshold that differs in its last bits on another CPU writes the same file;
    figures keep 4 significant digits (small ones too), counts stay whole, NaN is null."""
    one = {"threshold": 0.459753155708313, "auc": np.float32(0.961890243902439), "n": np.int64(608)}
    other = {"threshold": 0.4597533643245697, "auc": 0.9618902439024, "n": 608}
    assert O.figures_text(one) == O.figures_text(other)
    assert json.loads(
        O.figures_text({**one, "small": 0.000123456, "big": 1234.5678, "nan": math.nan, "px": 12345.0})
    ) == {
        "threshold": 0.4598,
        "auc": 0.9619,
        "n": 608,
        "small": 0.0001235,
        "big": 1235.0,
        "nan": None,
        "px": 12345.0,  # a whole number (a width's median, a count): not rounded to 12340
    }
    assert O.figures_text({"b": 1, "a": 2}, sort_keys=True).index('"a"') < O.figures_text({"b": 1, "a": 2}).index('"a"')


def test_replace_dir_with_names_replaces_only_those_and_undoes_a_failed_swap(tmp_path, monkeypatch):
    """names=: the entries written replace their namesakes, everything else in the folder stays;
    when a rename fails midway, the entries already swapped are put back."""
    reports = tmp_path / "reports"
    (reports / "cv").mkdir(parents=True)
    (reports / "cv" / "oof.csv").write_text("train's")
    (reports / "metrics.json").write_text("old")

    def write(d):
        (d / "metrics.json").write_text("new")
        (d / "figures").mkdir()
        (d / "figures" / "roc.png").write_text("png")

    O.replace_dir(reports, write, by="evaluate", names=["metrics.json", "figures"])
    assert _tree(reports) == {"cv/oof.csv": "train's", "metrics.json": "new", "figures/roc.png": "png"}

    rename, calls = os.rename, []

    def rename_failing_on_the_third(a, b):
        calls.append(a)
        if len(calls) == 3:
            raise OSError("disk trouble")
        rename(a, b)

    monkeypatch.setattr(os, "rename", rename_failing_on_the_third)
    with pytest.raises(OSError, match="disk trouble"):
        O.replace_dir(reports, lambda d: write(d) or (d / "metrics.json").write_text("newer"), by="evaluate",
                      names=["metrics.json", "figures"])  # fmt: skip
    monkeypatch.undo()
    assert _tree(reports) == {"cv/oof.csv": "train's", "metrics.json": "new", "figures/roc.png": "png"}
    assert sorted(p.name for p in reports.iterdir()) == ["cv", "figures", "metrics.json"]
    with pytest.raises(CovidXrayError, match="did not write figures"):
        O.replace_dir(
            reports, lambda d: (d / "metrics.json").write_text("x"), by="evaluate", names=["metrics.json", "figures"]
        )


def test_a_full_disk_is_one_line_naming_what_was_written_and_leaves_nothing(tiny_data, tmp_path):
    """A write that fails for want of room (a file size limit, as a full disk does) while a
    stage writes its output: one line naming the file and what was written, exit 1, nothing
    partial (no splits.csv, no scratch folder)."""
    import subprocess
    import sys

    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))\n"
        "from covidxray.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    out = tmp_path / "out"
    argv = ["split", "split.folds=2", "split.test_fraction=0.25", f"paths.curated={tiny_data['curated']}"]
    argv += [f"paths.splits={out / 'splits.csv'}"]
    argv += [f"hydra.run.dir={tmp_path / 'run'}", "hydra.output_subdir=null"]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("covidxray split: error: cannot write split's output to ") and str(out) in lines[0]
    assert lines[0].endswith("File too large")
    assert not out.exists() or not any(out.iterdir())
