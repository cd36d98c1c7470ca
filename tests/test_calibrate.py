"""`covidxray calibrate`: a site threshold on a constructed set whose right threshold is known, and
predict, validate's reader and the served (pyfunc) model applying it; bad sets write nothing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidxray import CovidXrayError
from covidxray.evaluation import calibration
from test_loco import brightness_model

SIZE = 16
COVID_LEVELS = [140, 150, 160, 170, 180, 190]  # p(covid) rises with the mean intensity (center 100)
NORMAL_LEVELS = [40, 50, 60, 70, 80, 90]


def textured(level: int, rng) -> np.ndarray:
    """A 64 px image of mean `level` with enough texture to pass the X-ray plausibility check."""
    return np.clip(level + rng.integers(-40, 41, (64, 64)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A model folder (brightness model, transferred threshold 0.999: nothing is called covid) and a
    labelled site set, one sub-folder per class."""
    root = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(0)
    model_dir = root / "model"
    model_dir.mkdir()
    brightness_model(SIZE, slope=0.02).save(model_dir / "model.keras")
    meta = {
        "classes": ["normal", "covid"],
        "image_size": SIZE,
        "store_size": SIZE,
        "resize": "stretch",
        "threshold": 0.999,
        "threshold_method": "youden",
    }
    (model_dir / "model.json").write_text(json.dumps(meta))
    for label, levels in (("covid", COVID_LEVELS), ("normal", NORMAL_LEVELS)):
        (root / "set" / label).mkdir(parents=True)
        for i, level in enumerate(levels):
            Image.fromarray(textured(level, rng)).save(root / "set" / label / f"{label}-{i}.png")
    return {"root": root, "model": model_dir, "set": root / "set", "meta": meta}


def scores_of(site, folder) -> dict[str, float]:
    """p(covid) per file, as predict computes it with the original model."""
    from covidxray.networks.inference import predictions
    from covidxray.networks.model_file import load_model
    from covidxray.serving.loading import load_images

    model, meta = load_model(site["model"])
    paths = sorted(folder.rglob("*.png"))
    pixels, _ = load_images(paths, meta, None)
    return dict(zip([p.name for p in paths], predictions(model, meta, pixels)["p_covid"]))


def test_calibrate_picks_the_known_threshold_and_predict_applies_it(site, tmp_path, capsys):
    from covidxray.tools.calibrate import calibrate_cli
    from covidxray.tools.predict import predict_cli

    scores = scores_of(site, site["set"])
    lowest_covid = min(v for k, v in scores.items() if k.startswith("covid"))
    assert max(v for k, v in scores.items() if k.startswith("normal")) < lowest_covid < site["meta"]["threshold"]
    out = tmp_path / "calibrated"
    assert calibrate_cli([str(site["set"]), "--model", str(site["model"]), "--out", str(out)]) == 0
    meta = json.loads((out / "model.json").read_text())
    # Youden's first maximum on separable scores: the lowest covid score (all covid, no normal called covid)
    assert meta["threshold"] == pytest.approx(lowest_covid, abs=1e-6) and meta["threshold_method"] == "youden"
    cal = meta["site_calibration"]
    assert cal["replaces_threshold"] == 0.999 and cal["per_class"] == {"normal": 6, "covid": 6}
    assert cal["on_the_set"] == {"sensitivity": 1.0, "specificity": 1.0}
    assert cal["at_the_replaced_threshold"]["sensitivity"] == 0.0
    # predict reads model.json's threshold: the covid images are covid with the site model only
    image = str(site["set"] / "covid" / "covid-3.png")
    capsys.readouterr()
    predict_cli([image, "--model", str(site["model"]), "--json"])
    before = json.loads(capsys.readouterr().out)
    predict_cli([image, "--model", str(out), "--json"])
    after = json.loads(capsys.readouterr().out)
    assert (before["label"], after["label"]) == ("normal", "covid") and after["threshold"] == meta["threshold"]

    # a target sensitivity at 95% confidence: the highest threshold whose Clopper-Pearson lower bound
    # reaches it; 0.6 needs 6 positives (0.05 ** (1/6) = 0.607), so all 6 covid: the lowest covid score
    target = tmp_path / "by_sensitivity"
    calibrate_cli(
        [
            str(site["set"]),
            "--model",
            str(site["model"]),
            "--out",
            str(target),
            "--method",
            "sensitivity",
            "--target-sensitivity",
            "0.6",
        ]
    )
    covid = sorted((v for k, v in scores.items() if k.startswith("covid")), reverse=True)
    meta = json.loads((target / "model.json").read_text())
    assert meta["threshold"] == pytest.approx(covid[5], abs=1e-6)
    cal = meta["site_calibration"]
    assert (cal["confidence"], cal["positives"], cal["positives_needed"]) == (0.95, 6, 6)
    assert cal["sensitivity_lower_bound"] == pytest.approx(0.05 ** (1 / 6))
    printed = capsys.readouterr().out
    assert "sensitivity 0.6 at 0.95 confidence needs at least 6 positive images; the set has 6" in printed
    # the rule before the bound (the target on the positives as found: 4 of 6) promised 0.6 on 4 images
    assert calibration.site_threshold([True] * 6 + [False] * 6, covid + [0.0] * 6, "sensitivity", 0.6) == covid[3]


def test_a_calibrated_model_keeps_the_identity_it_calibrates(site, tmp_path, capsys):
    """A registered model's calibrated copy: predict and validate name its registered name,
    version and run, the version marked site-calibrated (the same network, another threshold)."""
    import shutil

    from covidxray.tools.calibrate import calibrate_cli
    from covidxray.tools.predict import predict_cli

    registered = tmp_path / "registered"
    shutil.copytree(site["model"], registered)
    who = {"registered_model": "covid-xray-detector", "registered_version": 3, "mlflow_run_id": "0abc"}
    (registered / "model.json").write_text(json.dumps({**site["meta"], **who, "model_uri": "models:/x/3"}))
    out = tmp_path / "calibrated"
    assert calibrate_cli([str(site["set"]), "--model", str(registered), "--out", str(out)]) == 0
    capsys.readouterr()
    predict_cli([str(site["set"] / "covid" / "covid-3.png"), "--model", str(out), "--json"])
    answer = json.loads(capsys.readouterr().out)
    assert (answer["model_name"], answer["model_version"], answer["model_run_id"]) == (
        "covid-xray-detector",
        "3 site-calibrated",
        "0abc",
    )
    predict_cli([str(site["set"] / "covid" / "covid-3.png"), "--model", str(out)])  # validate says it alike
    said = capsys.readouterr().out
    assert "; model covid-xray-detector version 3 site-calibrated, run 0abc)" in said, said


def test_the_served_model_applies_the_site_threshold(site, tmp_path):
    import mlflow

    from covidxray.networks.inference import png_bytes
    from covidxray.tools.calibrate import calibrate_cli

    out, store = tmp_path / "calibrated", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [str(site["set"]), "--model", str(site["model"]), "--out", str(out), "--register", "site-model"]
    assert calibrate_cli([*argv, "--tracking-uri", store]) == 0
    threshold = json.loads((out / "model.json").read_text())["threshold"]
    mlflow.set_tracking_uri(store)
    served = mlflow.pyfunc.load_model("models:/site-model/1")
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"image": [png_bytes(textured(level, rng)) for level in (60, 185)]})
    answer = served.predict(frame)
    assert np.allclose(answer["threshold"], threshold)
    assert answer["label"].tolist() == ["normal", "covid"]  # at the transferred 0.999 both would be normal


@pytest.mark.parametrize(
    "drop, relabel, method, message",
    [
        (
            ["covid-0.png", "covid-1.png"],
            None,
            "youden",
            r"too few labelled images to calibrate \(covid: 4\); at least 5",
        ),
        (
            ["covid-0.png"],
            None,
            "sensitivity",
            r"5 positive image\(s\); sensitivity 0.6 at 0.95 confidence needs at least 6",
        ),
        ([], "pneumonia", "youden", r"labels unknown to the model: pneumonia \(known: normal, covid\)"),
    ],
)
def test_a_set_that_cannot_calibrate_writes_nothing(site, tmp_path, drop, relabel, method, message):
    import shutil

    from covidxray.tools.calibrate import calibrate

    bad = tmp_path / "set"
    shutil.copytree(site["set"], bad)
    for name in drop:
        (bad / "covid" / name).unlink()
    if relabel:
        (bad / "covid").rename(bad / relabel)
    with pytest.raises(CovidXrayError, match=message):
        calibrate(bad, str(site["model"]), tmp_path / "out", method=method, target_sensitivity=0.6)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
