"""Shared test fixtures: where the repository, the shared data folder and the mirror are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# Under pytest-xdist (make test: a worker per core) each worker's TensorFlow, and the processes its
# tests start, use one thread per op pool: two workers' default pools oversubscribed the cores, and
# their idle threads spin (two tiny trainings side by side: 54.6 s wall, 48.2 s with one thread).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_name, "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MIRROR = SHARED / "datasets"
COMMIT = "0f7245db6f5aa4001ea75cf69fe6cfe091928403"
COLLECTION = MIRROR / "raw.githubusercontent.com" / "ieee8023" / "covid-chestxray-dataset" / COMMIT
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def collection_dir() -> Path:
    """The mirrored COVID-19 image collection at the pinned commit (../shared)."""
    if not COLLECTION.is_dir():
        pytest.fail(f"the shared mirror is missing: {COLLECTION}")
    return COLLECTION


@pytest.fixture(scope="session")
def external_dir() -> Path:
    """data/external (normal and viral-pneumonia X-rays), pulled from the shared DVC remote if needed."""
    target = REPO / "data" / "external"
    if not (target / "chest_xray" / "NORMAL").is_dir():
        subprocess.run([str(BIN / "dvc"), "pull", "-q", "data.dvc"], cwd=REPO, check=True)
    return target


def synthetic_xrays(n: int, size: int, positive: bool, rng: np.random.Generator) -> np.ndarray:
    """Noisy uint8 images; positives carry a bright blob (a learnable signal for smoke training)."""
    images = rng.normal(90, 25, size=(n, size, size))
    if positive:
        yy, xx = np.mgrid[:size, :size]
        for img in images:
            cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
            img += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))
    return np.clip(images, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """A small curated store and splits (synthetic, 32 px, 2 folds): input for train/evaluate tests.
    Training collections as in the default roles (covid: ieee8023, normal: kermany: 30 images
    each) and 10 + 10 `radiography` images, the default external set."""
    from covidxray.data.images import save_curated
    from covidxray.stages.split import make_splits

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    classes = ["normal", "covid"]
    rows, arrays = [], []
    for source, n, names in (("kermany", 30, ("kermany", "ieee8023")), ("radiography", 10, ("radiography",) * 2)):
        for y, label in enumerate(classes):
            imgs = synthetic_xrays(n, 32, positive=bool(y), rng=rng)
            arrays.append(imgs)
            prefix = f"{label}" if source == "kermany" else f"radiography-{label}"
            for i in range(len(imgs)):
                rows.append(
                    {
                        "image_id": f"{prefix}-{i:03d}",
                        "label": label,
                        "y": y,
                        "patient_id": f"{prefix}-p{i // 2:03d}",
                        "source": names[y],
                        "dup_group": f"{prefix}-{i:03d}",
                        "orig_width": 32,
                        "orig_height": 32,
                        "orig_format": "PNG",
                        "orig_mode": "L",
                    }
                )
    index = pd.DataFrame(rows)
    save_curated(root / "curated", np.concatenate(arrays), index, classes)
    make_splits(index, test_fraction=0.25, folds=2, seed=0).to_csv(root / "splits.csv", index=False)
    return {"root": root, "curated": root / "curated", "splits": root / "splits.csv"}


def make_cfg(overrides: list[str] | None = None):
    """The composed conf/ with overrides, as a stage receives it."""
    from covidxray.infra.config import compose

    return compose(overrides)


def frozen_head_settings(tiny_data: dict, *overrides: str):
    """The train settings of the smoke experiment with its CNN frozen (random weights) over tiny_data:
    a head that trains on fixed features (the stacked heads), in seconds."""
    from covidxray.settings.train import train_settings

    base = ["experiment=smoke", "model.freeze_base=true", "train.epochs=2"]
    paths = [f"paths.curated={tiny_data['curated']}", f"paths.splits={tiny_data['splits']}"]
    return train_settings(make_cfg([*base, *paths, *overrides]))


@pytest.fixture
def smoke_cfg(tiny_data, tmp_path):
    """The smoke experiment wired to tiny_data, writing models/reports/MLflow under tmp_path."""
    return make_cfg(
        [
            "experiment=smoke",
            f"paths.curated={tiny_data['curated']}",
            f"paths.splits={tiny_data['splits']}",
            f"paths.models={tmp_path / 'models'}",
            f"paths.reports={tmp_path / 'reports'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        ]
    )


def cli_error_line(argv: list, cwd: Path = REPO) -> str:
    """Run `covidxray ARGV` in a fresh process that must fail in one stderr line without importing
    TensorFlow, Keras or MLflow (the input refused before any model code loads): that line."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('imported:', [m for m in ('tensorflow', 'keras', 'mlflow') "
        "if m in sys.modules], file=sys.stderr))\n"
        "from covidxray.cli import main\n"
        f"main({[str(a) for a in argv]!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 2 and lines[1] == "imported: []", done.stderr
    return lines[0]


def run_until_killed(code: str, cwd: Path) -> None:
    """Run `code` in a fresh Python (this tree's src first) that SIGKILLs itself where the code
    calls `die()`: no finally blocks, no atexit, as when the machine or the OOM killer stops a run."""
    prelude = "import os, signal\ndef die():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


# -- real server processes (mlflow server, mlflow models serve) --------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server started as its own process group; `stop` ends the whole group."""

    def __init__(self, argv: list[str], url: str, log: Path, env: dict | None = None, cwd: Path | None = None):
        self.url, self.log = url, log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(
            [str(a) for a in argv], stdout=self._out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
        )

    def wait_ready(self, path: str, timeout: float = 180.0) -> None:
        """Poll url+path until it answers 200; fail with the server's log if it exits or times out."""
        import time
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        pytest.fail(f"server not ready after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def commands(self) -> list[str]:
        """The command lines of the processes in the server's session (it and what it started)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                session = int(stat.read_text().rsplit(")", 1)[1].split()[3])
                if session == self.proc.pid:
                    found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
            except (OSError, IndexError, ValueError):
                continue  # a process that ended meanwhile
        return found

    def stop(self) -> None:
        import os
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()


def clean_env(**extra: str) -> dict:
    """This environment without PYTHONPATH (a fresh process sees only what is installed), with the
    venv's bin first on PATH (mlflow starts uvicorn, gunicorn by name), plus extra."""
    import os

    # MLflow's set_tracking_uri/set_registry_uri also set MLFLOW_* variables of this process (an
    # earlier test's server would leak into the child): the child gets only what `extra` names.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("MLFLOW_")}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    return {**env, **extra}


def post_json(url: str, payload: dict) -> tuple[int, dict]:
    """POST JSON, return (status, decoded JSON answer), also for 4xx/5xx answers."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
