"""Errors that need no model come before the model loads: a too-small image, a bad threshold in
model.json, an unknown label, a CSV whose images are missing. Each command runs in a fresh
Python that must end with TensorFlow and Keras never imported (not a timing: a model load is
what cost 11-23 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

RUN = textwrap.dedent(
    """
    import json, sys
    from covidxray.cli import main
    try:
        main(json.loads(sys.argv[1]))
        code = 0
    except SystemExit as stop:
        code = stop.code
    print("LOADED", "tensorflow" in sys.modules or "keras" in sys.modules)
    sys.exit(code)
    """
)


@pytest.fixture
def inputs(tmp_path):
    """A model folder whose model.keras is no model (loading it would fail otherwise), a good
    and a bad model.json, a 16 px image, a folder set with an unknown class, a CSV of missing files."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.keras").write_bytes(b"not a model: never to be loaded")
    meta = {"classes": ["normal", "covid"], "image_size": 32, "threshold": 0.5}
    (model / "model.json").write_text(json.dumps(meta))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.keras").write_bytes(b"not a model")
    (bad / "model.json").write_text(json.dumps({**meta, "threshold": 1.5}))
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(tmp_path / "small.png")
    rng = np.random.default_rng(0)
    for label in ("normal", "cat"):
        (tmp_path / "set" / label).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(tmp_path / "set" / label / f"{i}.png")
    (tmp_path / "labels.csv").write_text("path,label\nnone1.png,normal\nnone2.png,covid\n")
    return tmp_path


CASES = [
    (["predict", "{t}/small.png", "--model", "{t}/model"], "too small"),
    (["predict", "{t}/set/normal/0.png", "--model", "{t}/bad"], "threshold must be a finite number in [0, 1]"),
    (["validate", "{t}/set", "--model", "{t}/model", "--out", "{t}/out"], "cat"),
    (["validate", "{t}/labels.csv", "--model", "{t}/model", "--out", "{t}/out"], "none of the images could be read"),
    (["calibrate", "{t}/set", "--model", "{t}/model", "--out", "{t}/out"], "cat"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=["small-image", "bad-threshold", "label", "csv", "calibrate"])
def test_errors_that_need_no_model_come_before_it_loads(inputs, argv, message):
    argv = [a.format(t=inputs) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{inputs}/mlflow.db"}
    done = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(argv)], capture_output=True, text=True, env=env, cwd=inputs, timeout=120
    )
    assert done.returncode != 0, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert errors and message in errors[0], done.stderr[-2000:]
    assert "LOADED False" in done.stdout, done.stdout + done.stderr[-2000:]
    assert not (inputs / "out").exists()
