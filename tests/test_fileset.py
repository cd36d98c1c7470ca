"""Outputs that belong together change together or not at all, also under SIGKILL: the fileset
install on its own, with a writer process killed at each step of its install."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from covidxray import fileset

POINTS = [("staged", "old"), ("committed", "new"), ("installing", "new")]


def _kill_at(point: str, args: list[str], pause: Path, cwd: Path = REPO, timeout: float = 600) -> None:
    """Run args with the install paused at `point`, wait until it gets there, SIGKILL it."""
    env = {**os.environ, fileset.PAUSE_AT: point, fileset.PAUSE_FILE: str(pause)}
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not pause.exists():
        if proc.poll() is not None:
            pytest.fail(f"{args[:3]} ended (exit {proc.returncode}) before {point}:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"never reached {point}"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


# -- the install on its own ----------------------------------------------------------------------------

def test_install_replaces_files_of_two_folders_together(tmp_path):
    a, b = tmp_path / "models", tmp_path / "reports" / "cv"
    a.mkdir(parents=True)
    (a / "keep.txt").write_text("not ours")
    (a / "old.txt").write_text("old")
    with fileset.install_together([a, b], remove=[a / "old.txt"]) as (sa, sb):
        (sa / "model.txt").write_text("1")
        (sb / "oof.csv").write_text("2")
        assert not (a / "model.txt").exists()  # nothing visible before the block ends
    assert (a / "model.txt").read_text() == "1" and (b / "oof.csv").read_text() == "2"
    assert not (a / "old.txt").exists() and (a / "keep.txt").read_text() == "not ours"
    assert sorted(p.name for p in a.iterdir()) == ["keep.txt", "model.txt"]
    assert [p.name for p in b.iterdir()] == ["oof.csv"]


def test_an_error_in_the_block_changes_nothing(tmp_path):
    a = tmp_path / "models"
    a.mkdir()
    (a / "model.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with fileset.install_together([a]) as (sa,):
            (sa / "model.txt").write_text("new")
            raise RuntimeError("training failed")
    assert (a / "model.txt").read_text() == "old" and [p.name for p in a.iterdir()] == ["model.txt"]


WRITER = """
import sys
from pathlib import Path
from covidxray import fileset
a, b = Path(sys.argv[1]), Path(sys.argv[2])
with fileset.install_together([a, b], remove=[a / "gone.txt"]) as (sa, sb):
    for name in ("x.txt", "y.txt"):
        (sa / name).write_text("new")
    (sb / "z.txt").write_text("new")
"""


@pytest.mark.parametrize("point, outcome", POINTS)
def test_killed_writer_leaves_old_or_new_set(point, outcome, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for path in (a / "x.txt", a / "y.txt", b / "z.txt", a / "gone.txt"):
        path.write_text("old")
    _kill_at(point, [sys.executable, "-c", WRITER, str(a), str(b)], tmp_path / "paused", cwd=tmp_path)
    fileset.finish_pending(a)  # what every reader does first
    expected = "old" if outcome == "old" else "new"
    assert {p.read_text() for p in (a / "x.txt", a / "y.txt", b / "z.txt")} == {expected}
    assert (a / "gone.txt").exists() == (outcome == "old")
    fileset.recover([a, b])  # what the next writer does first: no staging folder survives
    assert sorted(p.name for p in [*a.iterdir(), *b.iterdir()]) == \
        (["gone.txt", "x.txt", "y.txt", "z.txt"] if outcome == "old" else ["x.txt", "y.txt", "z.txt"])
