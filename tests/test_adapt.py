"""`covidxray adapt`: a model aligned to a site's unlabeled X-rays (training/site_adaptation.py), on
the smoke model trained by the real train stage and site images written here; predict, the served
model and calibrate apply what it wrote; bad input is one line and writes nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import cli_error_line, synthetic_xrays
from covidxray import CovidXrayError
from covidxray.networks import builders
from covidxray.training import site_adaptation as sa
from test_evaluate import trained_model
from test_predict import run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_data) -> dict:
    return trained_model(tmp_path_factory.mktemp("trained"), tiny_data)


def write_images(folder, images, prefix: str) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{prefix}-{i}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    """A site whose scanner is brighter and flatter than the training images: 24 unlabeled images in
    two sub-folders (any layout), and a labelled set (6 + 6) of the same site."""
    root = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(7)

    def scanner(images):
        return np.clip(images.astype(float) * 0.6 + 80, 0, 255).astype(np.uint8)

    paths = []
    for sub, positive in (("ward-a", True), ("ward-b", False)):
        paths += write_images(root / "unlabeled" / sub, scanner(synthetic_xrays(12, 32, positive, rng)), sub)
    for label, positive in (("covid", True), ("normal", False)):
        write_images(root / "labelled" / label, scanner(synthetic_xrays(6, 32, positive, rng)), label)
    (root / "unlabeled" / "notes.txt").write_text("not an image")
    return {"unlabeled": root / "unlabeled", "paths": sorted(paths), "labelled": root / "labelled"}


def p_covid(model_dir, paths) -> np.ndarray:
    from covidxray.tools.predict import predict_cli

    code, out, err = run_cli(predict_cli, [*paths, "--model", model_dir, "--json"])
    assert code == 0, err
    return np.array([json.loads(line)["p_covid"] for line in out.splitlines()])


def test_train_writes_the_training_images_feature_statistics(tiny):
    """feature_stats.npy: mean and std per pooled feature of the final model's training images (CV rows)."""
    from covidxray.data import images
    from covidxray.networks.model_file import load_model

    model, meta = load_model(tiny["models"], engine="keras")
    stored, index, _ = images.load_curated(tiny["curated"])
    cv = index["image_id"].isin(pd.read_csv(tiny["splits"]).query("partition == 'cv'")["image_id"]).to_numpy()
    pooled = builders.pooled_features(model, images.prepare_for(meta, stored[cv]))
    stats = sa.read_stats(tiny["models"] / sa.STATS_FILE, "training feature statistics")
    assert stats.shape == (2, pooled.shape[1]) and stats.dtype == np.float32
    assert np.allclose(stats, sa.feature_stats(pooled), atol=1e-4)


def test_adapt_aligns_the_site_features_and_predict_applies_it(tiny, site, tmp_path):
    from covidxray.networks.model_file import load_model
    from covidxray.serving.loading import load_images
    from covidxray.tools.adapt import adapt_cli
    from covidxray.tools.predict import predict_cli
    from covidxray.training.stacked_heads import head_probs, head_weights

    out = tmp_path / "adapted"
    code, stdout, err = run_cli(adapt_cli, [site["unlabeled"], "--model", tiny["models"], "--out", out])
    assert code == 0, err
    assert "adapt: 24 unlabeled images (0 skipped)" in stdout
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # and replace_dir's owner mark
    assert names == ["feature_stats.npy", "model.json", "model.keras", "site_feature_stats.npy"]
    meta = json.loads((out / "model.json").read_text())
    assert meta["site_adaptation"]["images"] == 24 and meta["threshold"] == tiny["meta"]["threshold"]
    assert meta["registered_version"] == tiny["meta"]["registered_version"]  # its identity, marked site-adapted
    train = np.load(tiny["models"] / sa.STATS_FILE)
    assert np.array_equal(np.load(out / sa.STATS_FILE), train)

    # by hand: the original model's pooled features of the site, standardized per feature to the
    # training images' mean and std, through the original head
    model, original = load_model(tiny["models"], engine="keras")
    pixels, _ = load_images(site["paths"], original, None)
    pooled = builders.pooled_features(model, pixels)
    site_stats = np.load(out / sa.SITE_STATS_FILE)
    assert np.allclose(site_stats, sa.feature_stats(pooled), atol=1e-5)
    std = np.where(site_stats[1] < sa.MIN_STD, 1.0, site_stats[1])
    aligned = (pooled - site_stats[0]) / std * np.where(site_stats[1] < sa.MIN_STD, 1.0, train[1]) + train[0]
    assert np.allclose(sa.feature_stats(aligned)[0], train[0], atol=1e-4)  # the site now looks like training
    expected = head_probs(head_weights(model), aligned)[:, -1]
    adapted = p_covid(out, site["paths"])
    code, said, _ = run_cli(predict_cli, [site["paths"][0], "--model", out, "--json"])
    assert json.loads(said)["model_version"] == f"{meta['registered_version']} site-adapted"
    assert np.allclose(adapted, expected, atol=1e-4)
    assert not np.allclose(adapted, p_covid(tiny["models"], site["paths"]), atol=1e-3)  # it changed something


def test_the_served_model_and_calibrate_apply_the_adaptation(tiny, site, tmp_path):
    import mlflow

    from covidxray.networks.inference import png_bytes
    from covidxray.tools.adapt import adapt, adapt_cli
    from covidxray.tools.calibrate import calibrate

    out, store = tmp_path / "adapted", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [site["unlabeled"], "--model", tiny["models"], "--out", out, "--register", "site-a"]
    code, stdout, err = run_cli(adapt_cli, [*argv, "--tracking-uri", store])
    assert code == 0 and "adapt: registered models:/site-a/1" in stdout, err
    mlflow.set_tracking_uri(store)
    served = mlflow.pyfunc.load_model("models:/site-a/1")
    gray = [np.asarray(Image.open(p)) for p in site["paths"][:3]]
    answer = served.predict(pd.DataFrame({"image": [png_bytes(g) for g in gray]}))
    assert np.allclose(answer["p_covid"], p_covid(out, site["paths"][:3]), atol=1e-5)

    calibrated = tmp_path / "calibrated"
    meta = calibrate(site["labelled"], str(out), calibrated)
    assert meta["site_adaptation"] and meta["site_calibration"]["method"] == "youden"
    assert {p.name for p in calibrated.iterdir()} >= {sa.STATS_FILE, sa.SITE_STATS_FILE}
    assert np.allclose(p_covid(calibrated, site["paths"][:3]), p_covid(out, site["paths"][:3]), atol=1e-6)
    plain = tmp_path / "calibrated-only"
    calibrate(site["labelled"], str(tiny["models"]), plain)
    for model, message in ((out, "already adapted"), (plain, "site-calibrated: adapt first, then calibrate")):
        with pytest.raises(CovidXrayError, match=message):
            adapt(site["unlabeled"], str(model), tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_model_without_training_statistics_cannot_adapt(tiny, site, tmp_path):
    from covidxray.tools.adapt import adapt

    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.keras", "model.json"):
        shutil.copy(tiny["models"] / name, old / name)
    with pytest.raises(CovidXrayError, match=r"no training feature statistics .*feature_stats.npy.*dvc repro train"):
        adapt(site["unlabeled"], str(old), tmp_path / "out")
    with pytest.raises(CovidXrayError, match="adapt needs a model folder"):
        adapt(site["unlabeled"], "models:/covid-xray-detector/1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_line_before_the_model_loads_and_writes_nothing(tiny, site, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    out = tmp_path / "out"
    line = cli_error_line(["adapt", tmp_path / "empty", "--model", tiny["models"], "--out", out])
    assert line == (
        f"covidxray adapt: error: {tmp_path / 'empty'}: 0 image file(s) (.bmp, .gif, .jpeg, .jpg, .png, .tif, "
        ".tiff, .webp); at least 10 unlabeled images of the site are needed to adapt"
    )
    line = cli_error_line(["adapt", tmp_path / "nowhere", "--model", tiny["models"], "--out", out])
    assert line == f"covidxray adapt: error: unlabeled site folder not found: {tmp_path / 'nowhere'}"
    # a target sensitivity the set's positives cannot show at the confidence: the number needed
    argv = ["calibrate", site["labelled"], "--model", tiny["models"], "--out", out, "--method", "sensitivity"]
    line = cli_error_line(argv)
    assert line.startswith(f"covidxray calibrate: error: {site['labelled']}: --target-sensitivity at --confidence: ")
    assert "6 positive image(s); sensitivity 0.9 at 0.95 confidence needs at least 29" in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))
