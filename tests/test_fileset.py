"""Outputs that belong together change together or not at all, also under SIGKILL: the fileset
install on its own, then a real `covidxray train` killed at each step of installing its outputs
(models/model.keras, models/model.json, reports/cv/*) while an older set is in place."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import BIN, REPO, make_cfg
from covidxray.infra import fileset

CV_FILES = ("oof.csv", "folds.csv", "metrics.json", "history.csv")
POINTS = [("staged", "old"), ("committed", "new"), ("installing", "new")]


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _names(folder: Path) -> list[str]:
    """The files of a folder, without the writer lock file installs leave there."""
    return sorted(p.name for p in folder.iterdir() if p.name != fileset.WRITER_LOCK)


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
    assert _names(a) == ["keep.txt", "model.txt"] and _names(b) == ["oof.csv"]


def test_an_error_in_the_block_changes_nothing(tmp_path):
    a = tmp_path / "models"
    a.mkdir()
    (a / "model.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with fileset.install_together([a]) as (sa,):
            (sa / "model.txt").write_text("new")
            raise RuntimeError("training failed")
    assert (a / "model.txt").read_text() == "old" and _names(a) == ["model.txt"]


WRITER = """
import sys
from pathlib import Path
from covidxray.infra import fileset
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
    assert sorted(_names(a) + _names(b)) == (
        ["gone.txt", "x.txt", "y.txt", "z.txt"] if outcome == "old" else ["x.txt", "y.txt", "z.txt"]
    )


def test_a_stale_journal_is_discarded_not_applied_over_a_restore(tmp_path, capsys):
    """Killed after its first move; then the destination is restored (as `dvc checkout` does):
    the journal's files no longer match it, so a reader discards it instead of pairing the new
    x.txt's neighbours with the restored one."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for path in (a / "x.txt", a / "y.txt", b / "z.txt", a / "gone.txt"):
        path.write_text("old")
    _kill_at("installing", [sys.executable, "-c", WRITER, str(a), str(b)], tmp_path / "paused", cwd=tmp_path)
    assert (a / "x.txt").read_text() == "new" and (a / "y.txt").read_text() == "old"  # one move done
    (a / "x.txt").write_text("restored")
    fileset.finish_pending(a)
    assert [(a / n).read_text() for n in ("x.txt", "y.txt")] == ["restored", "old"]
    assert (b / "z.txt").read_text() == "old" and (a / "gone.txt").exists()
    assert "discarded a stale install journal" in capsys.readouterr().err
    assert not list(a.glob(".install-*")) and not list(b.glob(".install-*"))


# -- the train stage, killed while installing its outputs -------------------------------------------------


def _overrides(root: Path, tiny_data: dict) -> list[str]:
    return [
        "experiment=smoke",
        f"paths.curated={tiny_data['curated']}",
        f"paths.splits={tiny_data['splits']}",
        f"paths.models={root / 'models'}",
        f"paths.reports={root / 'reports'}",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlruns' / 'mlflow.db'}",
    ]


def _outputs(root: Path) -> dict[str, Path]:
    files = {name: root / "models" / name for name in ("model.keras", "model.json")}
    return {**files, **{name: root / "reports" / "cv" / name for name in CV_FILES}}


@pytest.fixture(scope="module")
def old_root(tiny_data, tmp_path_factory) -> Path:
    """A complete set of train outputs (and its MLflow store) from an earlier run: the session's
    trained smoke model (8 head units), copied by each test before it is overwritten."""
    from test_evaluate import trained_model

    return trained_model(tmp_path_factory.mktemp("trained"), tiny_data)["root"]


@pytest.mark.parametrize("point, outcome", [POINTS[0], POINTS[2]])  # before the journal; mid-switch
def test_train_killed_while_installing_leaves_a_whole_set(point, outcome, old_root, tiny_data, tmp_path, capsys):
    """SIGKILL before the journal: the old set, untouched. After it (also with model.json already
    replaced and model.keras not yet): the first reader finishes the install. predict then uses
    the threshold of the model it loads, the one that set's oof.csv gives."""
    import shutil

    from omegaconf import OmegaConf

    from covidxray.evaluation.metrics import choose_threshold
    from covidxray.tools.predict import predict_cli

    root = tmp_path / "run"
    shutil.copytree(old_root, root)
    old = {name: _digest(path) for name, path in _outputs(root).items()}
    params = tmp_path / "params.yaml"
    OmegaConf.save(make_cfg([*_overrides(root, tiny_data), "model.head.dense_units=4"]), params)
    _kill_at(point, [str(BIN / "covidxray"), "train", "--params", str(params)], tmp_path / "paused")
    staged = {name: next(path.parent.glob(f"{fileset.PREFIX}*/{name}"), path) for name, path in _outputs(root).items()}
    new = {name: _digest(path) for name, path in staged.items()}
    assert all(new[name] != old[name] for name in new), "the second run must differ in every file"
    if outcome == "old":
        assert {name: _digest(path) for name, path in _outputs(root).items()} == old

    image = tmp_path / "xray.png"
    from PIL import Image

    Image.fromarray(np.load(tiny_data["curated"] / "images.npy")[0]).save(image)
    assert predict_cli([str(image), "--model", str(root / "models"), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {name: _digest(path) for name, path in _outputs(root).items()} == (old if outcome == "old" else new)
    meta = json.loads((root / "models" / "model.json").read_text())
    oof = pd.read_csv(root / "reports" / "cv" / "oof.csv")
    assert answer["threshold"] == meta["threshold"] == choose_threshold(oof["label"] == "covid", oof["p_covid"])
    fileset.recover([root / "models", root / "reports" / "cv"])
    assert not list(root.rglob(f"*{fileset.PREFIX}*"))


# -- writers racing -------------------------------------------------------------------------------------

RACER = """
import sys, time
from pathlib import Path
from covidxray.infra import fileset

me, root, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
a, b = root / "models", root / "reports" / "cv"
for r in range(rounds):
    while int((root / "go").read_text() or -1) < r:
        time.sleep(0.0005)
    with fileset.install_together([a, b]) as (sa, sb):
        for name in ("model.keras", "model.json", "model.run.json"):
            (sa / name).write_text(f"{me}-{r}")
        for name in ("oof.csv", "folds.csv", "metrics.json"):
            (sb / name).write_text(f"{me}-{r}")
    (root / f"done-{me}").write_text(str(r))
"""


def test_racing_installers_never_mix_and_never_delete_a_draft(tmp_path):
    """Three writers install together into the same two folders, 60 times each released at
    once: after every round all six files come from one writer, and no writer fails (one's
    `recover` once removed another's fresh draft: FileNotFoundError)."""
    writers, rounds = ("w0", "w1", "w2"), 60
    (tmp_path / "go").write_text("-1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, w, str(tmp_path), str(rounds)], env=env, stderr=subprocess.PIPE)
        for w in writers
    ]
    mixed = []
    try:
        for r in range(rounds):
            (tmp_path / "go.new").write_text(str(r))
            os.replace(tmp_path / "go.new", tmp_path / "go")
            deadline = time.monotonic() + 60
            while not all(
                (tmp_path / f"done-{w}").is_file() and (tmp_path / f"done-{w}").read_text() == str(r) for w in writers
            ):
                failed = [p for p in procs if p.poll() not in (None, 0)]
                assert not failed, failed[0].stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, f"round {r} did not finish"
                time.sleep(0.001)
            files = [*(tmp_path / "models").iterdir(), *(tmp_path / "reports" / "cv").iterdir()]
            found = {p.read_text() for p in files if not p.name.startswith(".")}  # not the lock, not staging
            if len(found) != 1 or not next(iter(found)).endswith(f"-{r}"):
                mixed.append((r, sorted(found)))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stderr.close()
    assert not mixed, f"{len(mixed)} of {rounds} rounds left a mixture, e.g. {mixed[:3]}"
    assert not list(tmp_path.rglob(f"*{fileset.PREFIX}*"))


def test_start_up_clean_up_of_run_folders_nobody_revisits(tmp_path):
    """A Hydra run killed while writing leaves outputs/<day>/<run>/models/.install-*; no later
    writer installs into that run's folder, so train's start-up clean-up (recover_under the
    outputs/ folder) removes it; a live writer's staging folder elsewhere in the tree stays."""
    dead = tmp_path / "outputs" / "2026-01-01" / "10-00-00-1" / "models"
    live = tmp_path / "outputs" / "2026-01-02" / "11-00-00-2" / "models"
    dead.mkdir(parents=True)
    _kill_at("staged", [sys.executable, "-c", WRITER, str(dead), str(dead.parent / "cv")], tmp_path / "p", tmp_path)
    assert list(dead.glob(f"{fileset.PREFIX}*"))
    with fileset.install_together([live]) as (staged,):
        (staged / "model.keras").write_text("in the works")
        assert fileset.recover_under(tmp_path / "outputs") == sorted([dead, dead.parent / "cv", live])
        assert staged.is_dir()
    assert not list((tmp_path / "outputs").rglob(f"*{fileset.PREFIX}*"))
    assert (live / "model.keras").read_text() == "in the works"
