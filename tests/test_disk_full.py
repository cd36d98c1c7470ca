"""A full disk under the MLflow store and its artifacts: one line naming the store or the files and
what was being written, exit 1, instead of MLflow's tracebacks (real SQLite, real MLflow; the full
disk is a file size limit, RLIMIT_FSIZE, which fails the write as a full disk does)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


# Runs `covidxray ARGV...` with files limited to LIMIT bytes: from the start (LIMIT given), or from
# the first file opened for writing under FULL (the disk holding that folder fills mid-command).
FULL_DISK = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit, full = int(sys.argv[1]), sys.argv[2]
def fill(event, args):
    if event == "open" and full and str(args[0]).startswith(full):
        mode, flags = args[1] or "", args[2] or 0
        if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR):
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
if full:
    sys.addaudithook(fill)
else:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
from covidxray.cli import main
main(sys.argv[3:])
"""


def run_with_full_disk(argv: list, cwd, limit: int, full: str = "") -> subprocess.CompletedProcess:
    code = [sys.executable, "-c", FULL_DISK, str(limit), full, *map(str, argv)]
    return subprocess.run(code, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_full_disk_under_the_mlflow_store_is_one_line_naming_it(tmp_path):
    """`promote` moves an alias in a store on a full disk: SQLite's "disk I/O error" / "database
    or disk is full" named with the store's path and the MLflow write (not MLflow's logged
    traceback plus the raised one), exit 1, the store as it was."""
    from mlflow.tracking import MlflowClient

    from covidxray.serving.registry import CHAMPION, INSTALLED_TAG

    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    version = client.create_model_version("m", source=(tmp_path / "model").as_uri()).version
    client.set_model_version_tag("m", version, INSTALLED_TAG, "true")

    done = run_with_full_disk(["promote", version, "--model", "m", "--tracking-uri", uri], tmp_path, 1500)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"covidxray promote: error: cannot write to the MLflow store {db} ("), lines[0]
    assert "(set_registered_model_alias)" in lines[0] and lines[0].endswith("disk I/O error"), lines[0]
    assert CHAMPION not in client.get_registered_model("m").aliases


# TMPDIR fills while pyfunc.log_model stages the model's code (every file opened for writing
# under PATTERN fails with ENOSPC, as on a full disk), then runs argv[2] in one_line_errors.
STAGING_FULL = """
import errno, fnmatch, os, sys
pattern = sys.argv[1]
def full(event, args):
    if event == "open" and fnmatch.fnmatch(str(args[0]), pattern):
        mode, flags = args[1] or "", args[2] or 0
        if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))
sys.addaudithook(full)
import mlflow
from covidxray.cli import one_line_errors
from covidxray.infra import tracking
from covidxray.infra.config import compose
from covidxray.networks.builders import build_model
from covidxray.serving import pyfunc
tracking.configure(sys.argv[2], "covid-xray")
model = build_model(compose(["experiment=smoke"]).model, 32, 2)
meta = {"classes": ["normal", "covid"], "image_size": 32, "resize": "stretch", "threshold": 0.5}
with mlflow.start_run(), one_line_errors("train"):
    pyfunc.log_model(model, meta)
"""


def test_a_full_disk_while_logging_the_pyfunc_model_is_one_line(tmp_path):
    """The train stage's pyfunc.log_model on a full TMPDIR: the staged copy of the model's code
    fails file by file (shutil.Error lists every one, ~15 KB): one line naming the first file, how
    many more, and what was being written; exit 1; the run ends FAILED."""
    from mlflow.tracking import MlflowClient

    staging = tmp_path / "tmp"
    staging.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(tracking_uri=uri)
    client.search_experiments()  # the store made here (MLflow's notices of it not in the command's stderr)
    code = [sys.executable, "-c", STAGING_FULL, str(staging / "covidxray-pyfunc-*" / "covidxray" / "*"), uri]
    done = subprocess.run(code, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(staging)})
    lines = [line for line in done.stderr.strip().splitlines() if "Warning" not in line]
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    prefix = f"covidxray train: error: cannot write the servable model (MLflow pyfunc) to {staging}/covidxray-pyfunc-"
    assert lines[0].startswith(prefix), lines[0]
    assert re.search(r": No space left on device \(and \d+ more files\)$", lines[0]), lines[0]
    runs = client.search_runs([client.get_experiment_by_name("covid-xray").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]
    assert not any(staging.iterdir())  # the staging folder removed


def test_sqlite_database_or_disk_is_full_is_a_store_write_error(tmp_path):
    """SQLite's own "database or disk is full" (SQLITE_FULL: here a page limit, as a full disk
    gives) is a store write failure; another SQLite error (bad SQL) is not."""
    import sqlite3

    from covidxray.cli import write_error

    conn = sqlite3.connect(tmp_path / "x.db")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("PRAGMA max_page_count = 2")
    with pytest.raises(sqlite3.OperationalError) as full:
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 1000,)] * 50)
    with pytest.raises(sqlite3.OperationalError) as bad:
        conn.execute("SELECT nothing FROM nowhere")
    line = write_error(full.value)
    assert line.startswith("cannot write to the MLflow store ") and line.endswith(": database or disk is full"), line
    assert write_error(bad.value) is None
