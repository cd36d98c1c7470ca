"""Interrupted work: Ctrl-C on a training ends in one line, exit 130 and its MLflow runs KILLED;
runs a SIGKILL left RUNNING are recognised (host/pid tags) and ended by the next run.

The children get SIGINT's default disposition themselves (a shell's background job, such as
`make test &`, starts its children with SIGINT ignored, and Python keeps an ignored SIGINT
ignored), and every child's process group is killed when its test ends, passed or failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO, clean_env

EXPERIMENT = "covid-xray"


def default_sigint() -> None:
    """preexec_fn: SIGINT back to its default in the child, whatever the test runner inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def children():
    """Popen objects a test starts (each in its own session); their process groups are killed at
    the end of the test, so a failed assertion never leaves an endless training running."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=60)


def start_training(tiny_data, tmp_path: Path, children: list) -> tuple[subprocess.Popen, str]:
    """`covidxray train` (smoke, endless epochs) in its own process group, logging to a new store."""
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    argv = [
        BIN / "covidxray",
        "train",
        "experiment=smoke",
        "train.epochs=100000",
        f"paths.curated={tiny_data['curated']}",
        f"paths.splits={tiny_data['splits']}",
        f"mlflow.tracking_uri={store}",
        f"paths.models={tmp_path / 'models'}",
        f"paths.reports={tmp_path / 'reports'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.Popen(
        [str(a) for a in argv],
        cwd=REPO,
        env=clean_env(),
        stdout=open(tmp_path / "stdout", "wb"),
        stderr=open(tmp_path / "stderr", "wb"),
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    children.append(proc)
    return proc, store


def runs(store: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def running_runs(db: Path) -> int:
    """How many runs the SQLite store holds as RUNNING, read-only (the store may be half created:
    an MLflow client here would race the trainer to create its tables)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]
    except sqlite3.Error:
        return 0


def wait_for_fold_run(proc: subprocess.Popen, tmp_path: Path, timeout: float = 180) -> None:
    """Until the parent run and its first fold run are RUNNING (training is in its epochs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        if running_runs(tmp_path / "mlruns" / "mlflow.db") == 2:
            time.sleep(1.0)
            return
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("training did not reach its first fold in time")


def test_ctrl_c_ends_in_one_line_exit_130_and_killed_runs(tiny_data, tmp_path, children):
    proc, store = start_training(tiny_data, tmp_path, children)
    wait_for_fold_run(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert proc.wait(timeout=120) == 130, (tmp_path / "stderr").read_text()[-2000:]
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr
    ours = [line for line in stderr.splitlines() if line.startswith("covidxray")]
    assert ours == ["covidxray train: interrupted; MLflow runs ended as KILLED: 2"], stderr[-2000:]
    found = runs(store)
    assert len(found) == 2 and {r.info.status for r in found} == {"KILLED"}
    assert all(r.data.tags["covidxray.killed"].startswith("interrupted") for r in found)


def test_runs_left_running_by_sigkill_are_ended_by_the_next_run(tiny_data, tmp_path, children):
    import mlflow

    from covidxray.infra import tracking

    proc, store = start_training(tiny_data, tmp_path, children)
    wait_for_fold_run(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    left = runs(store)
    assert len(left) == 2 and {r.info.status for r in left} == {"RUNNING"}  # nobody could end them
    parent = next(r for r in left if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["covidxray.pid"] == str(proc.pid)

    mlflow.set_tracking_uri(store)
    experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    alive = mlflow.MlflowClient().create_run(experiment_id, tags=tracking.process_tags())  # this process: alive
    tracking.configure(store, EXPERIMENT)  # what the next train (or evaluate) does first
    after = {r.info.run_id: r for r in runs(store)}
    assert after.pop(alive.info.run_id).info.status == "RUNNING"
    assert len(after) == 2 and {r.info.status for r in after.values()} == {"KILLED"}
    assert all("process was gone" in r.data.tags["covidxray.killed"] for r in after.values())
    mlflow.MlflowClient().set_terminated(alive.info.run_id)


def test_process_alive_tells_a_reused_pid_apart():
    from covidxray.infra import tracking
    from covidxray.infra.outputs import process_alive

    me = tracking.process_tags()
    assert process_alive(os.getpid(), me["covidxray.pid_start"])
    assert not process_alive(os.getpid(), "1")  # same pid, another start time: not this process
    done = subprocess.run(["true"])
    assert done.returncode == 0
    child = subprocess.Popen(["true"])
    child.wait()
    assert not process_alive(child.pid)


def test_ctrl_c_on_a_tool_command(tiny_data, collection_dir, tmp_path_factory, tmp_path, children):
    """Any covidxray command: predict over the mirror's X-rays, interrupted while it works."""
    from test_evaluate import trained_model

    model = trained_model(tmp_path_factory.mktemp("trained"), tiny_data)["models"]
    # the mirror's X-rays twenty times: LiteRT predicts them all in a few seconds, the interrupt must find it working
    files = sorted((collection_dir / "images").glob("*.jpg")) * 20
    proc = subprocess.Popen(
        [str(BIN / "covidxray"), "predict", *map(str, files), "--model", str(model)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    children.append(proc)
    time.sleep(4.0)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("covidxray")] == ["covidxray predict: interrupted"]


def test_an_exception_ends_the_fold_runs_failed_with_the_parent(smoke_cfg, tmp_path, monkeypatch):
    """A training that fails while a fold run is open (here: recording the fold, as a full disk
    would) ends its parent and its fold runs FAILED together; every run carries host/pid tags, so
    a later run could end it had the process died instead."""
    from covidxray.evaluation import cv_tracking
    from covidxray.infra import tracking
    from covidxray.stages import train

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cv_tracking, "record_fold", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train.main(smoke_cfg)
    found = runs(smoke_cfg.mlflow.tracking_uri)
    folds = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(found) - len(folds) == 1 and folds  # the parent and the folds it opened (trained together)
    assert {r.info.status for r in found} == {"FAILED"}
    mine = tracking.process_tags()
    assert all(r.data.tags[tracking.PID_TAG] == mine[tracking.PID_TAG] for r in found)
    assert all(r.data.tags[tracking.HOST_TAG] == mine[tracking.HOST_TAG] for r in found)
