"""The registered model serves: `mlflow models serve` (a real scoring server on 127.0.0.1) and
`mlflow.pyfunc.load_model` in a fresh process answer a real X-ray with p(covid) and the label at
the saved threshold, with the code and metadata that travel inside the logged model."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import BIN, REPO, ServerProcess, clean_env, free_port, post_json
from test_evaluate import trained_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_data) -> dict:
    return trained_model(tmp_path_factory.mktemp("trained"), tiny_data)


@pytest.fixture(scope="module")
def xray(collection_dir):
    """A real chest X-ray of the mirrored collection (JPEG, a few hundred px)."""
    return sorted((collection_dir / "images").glob("*.jpg"))[0]


def expected(tiny, gray: np.ndarray) -> dict:
    """What the model in models/ says about a decoded image, through the training preprocessing."""
    from covidxray.data import images
    from covidxray.networks import model_file
    from covidxray.networks.inference import probabilities

    model, meta = model_file.load_model(tiny["models"])
    pixels = images.prepare_for(meta, images.resize(gray, meta["store_size"], meta["resize"])[None])
    p = float(probabilities(model, pixels, len(meta["classes"]))[0, -1])
    return {
        "p_covid": p,
        "label": "covid" if p >= meta["threshold"] else "normal",
        "threshold": meta["threshold"],
        "model_version": str(meta["registered_version"]),
        "model_run_id": meta["mlflow_run_id"],
    }


def check_answer(row: dict, want: dict) -> None:
    identity = {"model_name", "model_version", "model_run_id"}
    assert set(row) == {"p_covid", "p_normal", "label", "threshold", *identity, "ood_score", "ood"}
    assert row["ood_score"] >= 0 and row["ood"] == (row["label"] == "out-of-distribution")  # its ood.npz served
    assert (row["model_version"], row["model_run_id"]) == (want["model_version"], want["model_run_id"])
    assert 0.0 <= row["p_covid"] <= 1.0 and abs(row["p_covid"] + row["p_normal"] - 1.0) < 1e-5
    called = "covid" if row["p_covid"] >= row["threshold"] else "normal"
    assert row["label"] == ("out-of-distribution" if row["ood"] else called)
    assert row["threshold"] == pytest.approx(want["threshold"], abs=1e-12)
    assert row["p_covid"] == pytest.approx(want["p_covid"], abs=1e-5) and called == want["label"]


def test_scoring_server_answers_an_xray(tiny, xray, tmp_path):
    """`mlflow models serve -m models:/covid-xray-detector/1 --env-manager local`, then POST
    /invocations with the X-ray's file (base64), then with its pixels."""
    from covidxray.data import images

    gray, _ = images.read_grayscale(xray)
    small = images.resize(gray, 64, "stretch")
    port = free_port()
    server = ServerProcess(
        [
            BIN / "mlflow",
            "models",
            "serve",
            "-m",
            tiny["meta"]["model_uri"],
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            port,
        ],
        f"http://127.0.0.1:{port}",
        tmp_path / "serve.log",
        env=clean_env(MLFLOW_TRACKING_URI=tiny["tracking_uri"]),
        cwd=tmp_path,
    )
    try:
        server.wait_ready("/ping")
        status, answer = post_json(
            server.url + "/invocations",
            {"dataframe_records": [{"image": base64.b64encode(xray.read_bytes()).decode()}]},
        )
        assert status == 200, answer
        assert len(answer["predictions"]) == 1
        check_answer(answer["predictions"][0], expected(tiny, gray))
        status, answer = post_json(
            server.url + "/invocations",
            {"dataframe_split": {"columns": ["pixels"], "data": [[small.tolist()], [gray.tolist()]]}},
        )
        assert status == 200, answer
        check_answer(answer["predictions"][0], expected(tiny, small))
        check_answer(answer["predictions"][1], expected(tiny, gray))
        status, answer = post_json(  # pixels pass the same X-ray checks as files
            server.url + "/invocations", {"dataframe_split": {"columns": ["pixels"], "data": [[[[200]]]]}}
        )
        assert status == 400 and "too small for a chest X-ray: row 0" in answer["message"], answer

        status, answer = post_json(
            server.url + "/invocations",
            {"dataframe_records": [{"image": base64.b64encode(b"these bytes are no image").decode()}]},
        )
        assert status == 400 and "row 0" in answer["message"] and "not an image" in answer["message"]
    finally:
        server.stop()


def test_pyfunc_loads_in_a_fresh_process(tiny, xray, tmp_path):
    """mlflow.pyfunc.load_model in a new interpreter without this checkout on its path: the
    covidxray code it runs is the copy inside the logged model."""
    from covidxray.data import images

    script = (
        "import json, sys\n"
        "import mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "import covidxray\n"
        "out = model.predict(pd.DataFrame({'image': [open(sys.argv[2], 'rb').read()]}))\n"
        "engine = type(model.unwrap_python_model().model).__name__\n"
        "print(json.dumps({'code': covidxray.__file__, 'rows': out.to_dict(orient='records'), 'engine': engine,\n"
        "                  'tensorflow': 'tensorflow' in sys.modules}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, tiny["meta"]["model_uri"], str(xray)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(MLFLOW_TRACKING_URI=tiny["tracking_uri"]),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/code/covidxray/" in result["code"] and not result["code"].startswith(str(REPO))
    check_answer(result["rows"][0], expected(tiny, images.read_grayscale(xray)[0]))
    assert (result["engine"], result["tensorflow"]) == ("LiteModel", False)  # model.tflite, no TensorFlow


def test_a_model_logged_before_the_move_loads_where_covidxray_is_imported(tmp_path, monkeypatch):
    """Models logged before the sub-packages carry an entry file that imports
    `covidxray.serving.CovidXrayModel`. A fresh process resolves it in the model's own code; one
    that has already imported this covidxray (a notebook, a service) resolves it here."""
    import mlflow
    import pandas as pd

    from conftest import make_cfg
    from covidxray.infra import tracking
    from covidxray.networks.builders import build_model
    from covidxray.serving import pyfunc

    old_entry = pyfunc.ENTRY.replace("from covidxray.serving.pyfunc import", "from covidxray.serving import")
    assert old_entry != pyfunc.ENTRY
    monkeypatch.setattr(pyfunc, "ENTRY", old_entry)
    tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}", "covid-xray")  # store and experiment of this test
    model = build_model(make_cfg(["experiment=smoke"]).model, 32, 2)
    meta = {"classes": ["normal", "covid"], "image_size": 32, "resize": "stretch", "threshold": 0.5}
    with mlflow.start_run():
        info = pyfunc.log_model(model, meta)
    answer = mlflow.pyfunc.load_model(info.model_uri).predict(
        pd.DataFrame({"pixels": [np.random.default_rng(0).integers(0, 256, (40, 40)).tolist()]})  # an X-ray's spread
    )
    assert 0.0 <= answer["p_covid"].iloc[0] <= 1.0 and answer["label"].iloc[0] in ("normal", "covid")


def test_decode_rows_takes_files_base64_or_pixels_and_names_bad_rows(xray):
    """The served model's input rows decode like training's files; a bad row is named."""
    import pandas as pd

    from covidxray import CovidXrayError
    from covidxray.data import images
    from covidxray.networks.inference import decode_rows, png_bytes

    gray, _ = images.read_grayscale(xray)
    meta = images.input_spec(32, "pad", 64, "clahe", 0.1)  # every input step of training
    want = images.load_image(xray, 32, "pad", 64, "clahe", 0.1)
    frame = pd.DataFrame({"image": [xray.read_bytes(), base64.b64encode(xray.read_bytes()).decode()]})
    assert np.array_equal(decode_rows(frame, meta), np.stack([want, want]))
    pixels = decode_rows(pd.DataFrame({"pixels": [gray, gray.tolist()]}), meta)
    assert np.array_equal(pixels, np.stack([want, want]))
    assert np.array_equal(decode_rows(pd.DataFrame({"image": [png_bytes(gray)]}), meta)[0], want)
    for bad, message in [
        (pd.DataFrame({"image": [xray.read_bytes(), b"GIF89a broken"]}), r"not an image file .*: row 1$"),
        (pd.DataFrame({"image": ["no base64 here!"]}), "row 0: image is text but not base64"),
        (pd.DataFrame({"pixels": [[[0, 300], [0, 0]]]}), "row 0: pixels must lie in 0..255"),
        (pd.DataFrame({"pixels": [[1, 2, 3]]}), "row 0: pixels must be a non-empty 2-D"),
        (pd.DataFrame({"pixels": [[[1, 2], [3]]]}), "row 0: pixels must be a 2-D array of numbers"),
        (pd.DataFrame({"image": [None], "pixels": [None]}), "row 0: give exactly one of"),
        (pd.DataFrame({"path": ["x.png"]}), "a column image"),
    ]:
        with pytest.raises(CovidXrayError, match=message):
            decode_rows(bad, meta)
