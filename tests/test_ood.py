"""The out-of-distribution flag (networks/ood.py): the detector's threshold holds its stated
false-alarm rate, its file has deterministic bytes, and with the smoke model trained by the real
train stage, noise and a gradient are flagged while held-out X-ray-like images mostly are not,
from `covidxray predict`, the MLflow pyfunc model and a model folder without the file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidxray.networks import ood
from test_evaluate import trained_model
from test_predict import run_cli


def test_threshold_holds_the_false_alarm_rate_on_fresh_samples():
    """Fitted on 5 folds of Gaussian features, the threshold flags about `rate` of new samples
    from the same distribution, and every far point."""
    rng = np.random.default_rng(0)
    cov = np.diag(np.linspace(0.5, 3.0, 12))
    train = rng.multivariate_normal(np.zeros(12), cov, size=2000)
    detector = ood.fit(train, np.arange(2000) % 5, list(range(5)), rate=0.05)
    fresh = rng.multivariate_normal(np.zeros(12), cov, size=4000)
    share = float((detector.distances(fresh) > detector.threshold).mean())
    assert 0.03 <= share <= 0.075, share
    far = rng.multivariate_normal(np.full(12, 6.0), cov, size=50)
    assert (detector.distances(far) > detector.threshold).all()
    with pytest.raises(ValueError, match="false-alarm rate"):
        ood.fit(train, np.arange(2000) % 5, [0, 1], rate=1.0)


def test_distances_are_sklearns_ledoit_wolf_mahalanobis():
    """The precision from the shrunk covariance's Cholesky factor gives the distances of sklearn's
    LedoitWolf (its pinvh), for more features than images (the frozen backbones' case), and is
    symmetric."""
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(2)
    features = np.abs(rng.normal(size=(60, 300)) @ rng.normal(size=(300, 300)) * 0.1)
    detector = ood.fit_gaussian(features)
    new = np.abs(rng.normal(size=(20, 300)) @ rng.normal(size=(300, 300)) * 0.1)
    reference = np.sqrt(LedoitWolf().fit(features).mahalanobis(new))
    assert np.allclose(detector.distances(new), reference, rtol=1e-9, atol=0)
    assert np.array_equal(detector.precision, detector.precision.T)


def test_file_round_trips_with_the_same_bytes(tmp_path):
    rng = np.random.default_rng(1)
    detector = ood.fit(rng.normal(size=(40, 3)), np.arange(40) % 2, [0, 1], rate=0.1)
    a, b = ood.save(detector, tmp_path / "a.npz"), ood.save(detector, tmp_path / "b.npz")
    assert a.read_bytes() == b.read_bytes()
    back = ood.load(a)
    assert np.array_equal(back.mean, detector.mean) and np.array_equal(back.precision, detector.precision)
    assert (back.threshold, back.rate) == (detector.threshold, 0.1)
    assert ood.load(tmp_path / "absent.npz") is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_data) -> dict:
    return trained_model(tmp_path_factory.mktemp("trained"), tiny_data)


def probe_files(folder) -> dict:
    """Uniform noise and a smooth diagonal gradient, 64 px PNGs (they pass the size/flatness guard)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:64, :64]
    images = {"noise": rng.integers(0, 256, (64, 64)), "gradient": (xx + yy) * 2}
    files = {}
    for name, gray in images.items():
        files[name] = folder / f"{name}.png"
        Image.fromarray(gray.astype(np.uint8)).save(files[name])
    return files


def held_out_files(tiny, folder) -> list:
    """The test partition's images (never trained on) as PNG files."""
    from covidxray.data import images
    from covidxray.stages import evaluate

    pixels, index, _ = images.load_curated(tiny["curated"])
    test, _ = evaluate.test_partition(pixels, index, images.load_splits(tiny["splits"]), tiny["meta"]["sources"])
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"held-{i:03d}.png" for i in range(len(test))]
    for path, gray in zip(paths, test, strict=True):
        Image.fromarray(gray).save(path)
    return paths


def test_predict_flags_noise_and_gradients_not_held_out_xrays(tiny, tmp_path):
    from covidxray.tools.predict import predict_cli

    assert (tiny["models"] / ood.OOD_FILE).is_file()  # installed with model.keras by the train stage
    assert ood.load(tiny["models"] / ood.OOD_FILE).rate == 0.01
    probes, held = probe_files(tmp_path / "probes"), held_out_files(tiny, tmp_path / "held")
    code, out, err = run_cli(predict_cli, [*probes.values(), *held, "--model", tiny["models"], "--json"])
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["ood"] for r in rows[:2]] == [True, True], rows[:2]
    assert all(r["label"] == ood.OOD_LABEL and 0 <= r["p_covid"] <= 1 for r in rows[:2])
    flagged = [r["ood"] for r in rows[2:]]
    assert len(flagged) >= 10 and np.mean(flagged) <= 0.2, flagged  # 1% stated; a tiny fit is rough
    assert all(r["label"] in ("normal", "covid") for r in rows[2:] if not r["ood"])
    code, out, _ = run_cli(predict_cli, [probes["noise"], "--model", tiny["models"]])
    assert code == 0 and ood.OOD_LABEL in out and "ood_score" in out


def test_pyfunc_model_returns_the_ood_columns(tiny, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(tiny["tracking_uri"])
    mlflow.set_registry_uri(tiny["tracking_uri"])  # an earlier test in this process may have set another
    served = mlflow.pyfunc.load_model(tiny["meta"]["model_uri"])
    probes = probe_files(tmp_path)
    answer = served.predict(pd.DataFrame({"image": [p.read_bytes() for p in probes.values()]}))
    assert answer["ood"].tolist() == [True, True]
    assert (answer["ood_score"] > 0).all() and answer["label"].eq(ood.OOD_LABEL).all()
    assert answer["p_covid"].between(0, 1).all()


def test_a_model_folder_without_the_file_predicts_as_before(tiny, tmp_path):
    from covidxray.tools.predict import predict_cli

    old = tmp_path / "old"
    shutil.copytree(tiny["models"], old, ignore=shutil.ignore_patterns(ood.OOD_FILE, "pretrained"))
    probes = probe_files(tmp_path / "probes")
    code, out, err = run_cli(predict_cli, [probes["noise"], "--model", old, "--json"])
    assert code == 0, err
    row = json.loads(out)
    assert row["ood"] is None and row["ood_score"] is None and row["label"] in ("normal", "covid")


def test_litert_and_keras_give_the_same_ood_score(tiny):
    """model.tflite's features output scores like the Keras sub-model (serving without TensorFlow),
    whatever the model predicted before; a detector of an older model (its LiteRT feature model
    in ood.npz, model.tflite a classifier only) still scores the same."""
    from covidxray.networks import litert, model_file

    detector = ood.load(tiny["models"] / ood.OOD_FILE)
    lite, _ = model_file.load_model(tiny["models"], "auto")
    keras_model, _ = model_file.load_model(tiny["models"], "keras")
    assert detector.lite is None and type(lite).__name__ == "LiteModel" and lite.has_features
    x = np.random.default_rng(5).integers(0, 256, (3, 32, 32)).astype(np.uint8)
    expected = detector.distances(ood.lite_features(detector, keras_model, x))
    lite.predict(x[..., None].astype(np.float32))
    remembered = ood.lite_features(detector, lite, x)  # after predicting these images
    lite.predict(x[::-1, ..., None].astype(np.float32))
    computed = ood.lite_features(detector, lite, x)  # after predicting others
    np.testing.assert_array_equal(remembered, computed)
    assert np.allclose(detector.distances(computed), expected, rtol=1e-3), (computed, expected)

    older = litert.LiteModel(litert.convert(keras_model), "older model.tflite")
    detector.lite = litert.convert(ood.feature_model(keras_model))
    assert not older.has_features
    assert np.allclose(detector.distances(ood.lite_features(detector, older, x)), expected, rtol=1e-3)
