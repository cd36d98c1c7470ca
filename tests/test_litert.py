"""model.tflite: the train stage writes the whole classifier for LiteRT beside model.keras, and
predict runs it without TensorFlow, with Keras' probabilities; a folder without one still works
(Keras), a corrupt one is one line. The smoke model is trained by the real train stage
(test_evaluate.trained_model)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidxray import CovidXrayError
from test_evaluate import trained_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_data) -> dict:
    return trained_model(tmp_path_factory.mktemp("trained"), tiny_data)


@pytest.fixture(scope="module")
def xrays(tiny, collection_dir, tmp_path_factory) -> list[Path]:
    """Two real chest X-rays of the mirrored collection and a test image of the tiny set, as files."""
    from covidxray.data import images

    pixels, _, _ = images.load_curated(tiny["curated"])
    written = tmp_path_factory.mktemp("xrays") / "tiny.png"
    Image.fromarray(pixels[0]).save(written)
    return sorted((collection_dir / "images").glob("*.jpg"))[:2] + [written]


def scores(model_dir: Path, files, engine: str) -> np.ndarray:
    from covidxray.networks.inference import probabilities
    from covidxray.networks.model_file import load_model
    from covidxray.serving.loading import load_images

    model, meta = load_model(model_dir, engine)
    pixels, ok = load_images(files, meta, lambda path, message: pytest.fail(message))
    return model, probabilities(model, pixels, len(meta["classes"]))


def test_litert_gives_the_probabilities_of_keras(tiny, xrays):
    from covidxray.networks.litert import LiteModel

    assert (tiny["models"] / "model.tflite").is_file()
    lite, p_lite = scores(tiny["models"], xrays, "auto")
    keras, p_keras = scores(tiny["models"], xrays, "keras")
    assert isinstance(lite, LiteModel) and not isinstance(keras, LiteModel)
    assert p_lite.shape == p_keras.shape == (len(xrays), 2)
    np.testing.assert_allclose(p_lite, p_keras, atol=1e-4, rtol=0)


def test_conversion_gives_the_same_bytes_as_the_installed_file(tiny):
    """Two conversions of model.keras give the bytes train installed: model.tflite is a
    deterministic DVC output (the same weights, the same md5)."""
    from covidxray.networks import litert, model_file, ood

    model = ood.with_features(model_file.load(tiny["models"] / "model.keras"))
    installed = (tiny["models"] / "model.tflite").read_bytes()
    assert litert.convert(model) == litert.convert(model) == installed


def predict_in_a_process(argv: list[str]) -> subprocess.CompletedProcess:
    """`covidxray predict ...` in a fresh interpreter; its last stderr line lists which of
    tensorflow, keras and mlflow it imported."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('imported:', [m for m in ('tensorflow', 'keras', 'mlflow') "
        "if m in sys.modules], file=sys.stderr))\n"
        "from covidxray.cli import main\n"
        f"main({['predict', *argv]!r})\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_predict_with_a_tflite_never_imports_tensorflow(tiny, xrays):
    done = predict_in_a_process([str(xrays[0]), "--model", str(tiny["models"]), "--json"])
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == ["imported: []"], done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    _, p_keras = scores(tiny["models"], xrays[:1], "keras")
    assert row["p_covid"] == pytest.approx(p_keras[0, -1], abs=1e-4)


def test_a_folder_without_tflite_runs_keras_and_a_corrupt_one_is_one_line(tiny, xrays, tmp_path):
    """No model.tflite (folders made before it existed): Keras, the same answer. A corrupt one
    is a one-line error naming it (not a silent fallback: the set installed together is broken)."""
    from covidxray.networks.litert import LiteModel
    from covidxray.tools.predict import predict_cli

    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.keras", "model.json"):
        shutil.copy(tiny["models"] / name, old / name)
    model, p_old = scores(old, xrays, "auto")
    assert not isinstance(model, LiteModel)
    np.testing.assert_allclose(p_old, scores(tiny["models"], xrays, "auto")[1], atol=1e-4, rtol=0)

    broken = tmp_path / "broken"
    shutil.copytree(old, broken)
    (broken / "model.tflite").write_bytes((tiny["models"] / "model.tflite").read_bytes()[:5000])
    with pytest.raises(CovidXrayError) as err:
        predict_cli([str(xrays[0]), "--model", str(broken)])
    message = str(err.value)
    assert "\n" not in message and str(broken / "model.tflite") in message and "delete it" in message


def test_calibrate_scores_with_litert_and_keeps_both_model_files(tiny, tmp_path):
    """calibrate on a model folder with model.tflite: the calibrated folder holds the same
    model.keras and model.tflite bytes, and predict there runs LiteRT at the site threshold."""
    from covidxray.data import images
    from covidxray.networks.litert import LiteModel
    from covidxray.networks.model_file import load_model
    from covidxray.tools.calibrate import calibrate_cli

    pixels, index, _ = images.load_curated(tiny["curated"])
    for label in ("covid", "normal"):
        (tmp_path / "set" / label).mkdir(parents=True)
        for i in np.flatnonzero(index["label"].astype(str).to_numpy() == label)[:5]:
            Image.fromarray(pixels[i]).save(tmp_path / "set" / label / f"{i}.png")
    out = tmp_path / "calibrated"
    assert calibrate_cli([str(tmp_path / "set"), "--model", str(tiny["models"]), "--out", str(out)]) == 0
    for name in ("model.keras", "model.tflite"):
        assert (out / name).read_bytes() == (tiny["models"] / name).read_bytes(), name
    model, meta = load_model(out)
    assert (
        isinstance(model, LiteModel) and meta["threshold"] == json.loads((out / "model.json").read_text())["threshold"]
    )
