"""evaluate stage end to end on a tiny model: figures, plots as dvc.yaml declares them, the
threshold from out-of-fold predictions only, the model card, MLflow, and no partial reports."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, make_cfg
from covidxray import CovidXrayError

OOF_THRESHOLD = 0.3  # what the synthetic oof.csv below gives (Youden): not what test rows would give
_BUILT: dict = {}


def tiny_model(root: Path, tiny_data: dict) -> dict:
    """A small_cnn (smoke sizes) fitted briefly on the CV partition of tiny_data, saved as train
    does: models/model.keras, models/model.json, reports/cv/oof.csv, reports/cv/metrics.json,
    plus an MLflow "training" run whose id model.json names. Built once per test session."""
    if "dirs" in _BUILT:
        return _BUILT["dirs"]
    import keras
    import mlflow

    from covidxray import images as imgs
    from covidxray import metrics as M
    from covidxray import tracking
    from covidxray.models import build_model
    from covidxray.split import load_splits

    keras.utils.set_random_seed(0)
    curated = root / "curated"
    shutil.copytree(tiny_data["curated"], curated)
    audit = {"shortcuts": [{"features": "geometry_format", "auc": 0.97,
                            "warning": "original width alone predict the label (TEST-SHORTCUT)"}],
             "notes": ["each class comes from a single source"]}
    (curated / "audit.json").write_text(json.dumps(audit))
    pixels, index, classes = imgs.load_curated(curated)
    splits = load_splits(tiny_data["splits"])
    part = index["image_id"].map(splits.set_index("image_id")["partition"])
    cv = (part == "cv").to_numpy()

    cfg = make_cfg(["experiment=smoke"])
    model = build_model(cfg.model, 32, len(classes))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(pixels[cv][..., None].astype("float32"), index["y"].to_numpy()[cv], epochs=4,
              batch_size=8, verbose=0)
    models_dir, reports = root / "models", root / "reports"
    models_dir.mkdir()
    model.save(models_dir / "model.keras")

    # Synthetic out-of-fold predictions, perfectly separable: Youden gives the lowest covid score.
    oof = index.loc[cv, ["image_id", "patient_id", "label", "y"]].reset_index(drop=True)
    oof["fold"] = oof["image_id"].map(splits.set_index("image_id")["fold"]).to_numpy()
    pos = oof["y"] == 1
    p = np.empty(len(oof))
    p[pos.to_numpy()] = np.linspace(OOF_THRESHOLD, 1.0, pos.sum())
    p[~pos.to_numpy()] = np.linspace(0.0, 0.25, (~pos).sum())
    oof["p_normal"], oof["p_covid"] = 1 - p, p
    (reports / "cv").mkdir(parents=True)
    oof.to_csv(reports / "cv" / "oof.csv", index=False)
    (reports / "cv" / "metrics.json").write_text(json.dumps({"auc_mean": 0.91, "auc_std": 0.04}))
    threshold = M.choose_threshold(pos, p, "youden")

    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    tracking.configure(uri, "covid-xray")
    with mlflow.start_run(run_name="train") as run:
        mlflow.log_param("model.name", "small_cnn")
    meta = {"classes": classes, "image_size": 32, "resize": "stretch", "threshold": threshold,
            "threshold_method": "youden", "model": "small_cnn", "mlflow_run_id": run.info.run_id}
    (models_dir / "model.json").write_text(json.dumps(meta))
    _BUILT["dirs"] = {"root": root, "curated": curated, "splits": tiny_data["splits"], "models": models_dir,
                      "reports": reports, "tracking_uri": uri, "run_id": run.info.run_id, "classes": classes}
    return _BUILT["dirs"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tiny_data) -> dict:
    return tiny_model(tmp_path_factory.mktemp("tiny_model"), tiny_data)


def _cfg(tiny: dict, reports: Path, extra=()):
    return make_cfg([
        "experiment=smoke",
        f"paths.curated={tiny['curated']}", f"paths.splits={tiny['splits']}",
        f"paths.models={tiny['models']}", f"paths.reports={reports}",
        f"mlflow.tracking_uri={tiny['tracking_uri']}", "evaluate.bootstrap=200", *extra,
    ])


@pytest.fixture(scope="module")
def evaluated(tiny, tmp_path_factory) -> dict:
    """evaluate.main run once into a copy of the reports folder (with reports/cv in it)."""
    from covidxray import evaluate

    reports = tmp_path_factory.mktemp("eval") / "reports"
    shutil.copytree(tiny["reports"], reports)
    (reports / "cv" / "keep.txt").write_text("train's")
    cfg = _cfg(tiny, reports)
    evaluate.main(cfg)
    return {"reports": reports, "cfg": cfg, "metrics": json.loads((reports / "metrics.json").read_text())}


def test_metrics_json(evaluated, tiny):
    m = evaluated["metrics"]
    splits = pd.read_csv(tiny["splits"])
    test = splits[splits.partition == "test"]
    assert m["n_test_images"] == len(test)
    assert m["n_test_patients"] == test.patient_id.nunique()
    for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auc", "pr_auc", "brier", "ece"):
        assert key in m["test"] and f"{key}_ci_low" in m["test"] and f"{key}_ci_high" in m["test"], key
        value, lo, hi = m["test"][key], m["test"][f"{key}_ci_low"], m["test"][f"{key}_ci_high"]
        if value is not None:
            assert lo <= value + 1e-9 and value <= hi + 1e-9, key
    assert m["bootstrap"] == {"resamples": 200, "ci": 0.95, "unit": "patient", "seed": 42, "calibration_bins": 10}
    assert sum(sum(row.values()) for row in m["confusion"].values()) == len(test)


def test_threshold_comes_from_oof_not_test(evaluated, tiny):
    """The reported threshold is oof.csv's, although the test rows would choose another."""
    from covidxray import evaluate
    from covidxray import metrics as M

    m = evaluated["metrics"]
    assert m["threshold"] == pytest.approx(OOF_THRESHOLD)
    assert m["threshold_oof"] == pytest.approx(OOF_THRESHOLD)
    model, meta = evaluate.load_model(tiny["models"])
    from covidxray import images as imgs
    from covidxray.split import load_splits

    pixels, index, _ = imgs.load_curated(tiny["curated"])
    test_images, frame = evaluate.test_partition(pixels, index, load_splits(tiny["splits"]))
    probs = evaluate.predict_probs(model, test_images, 2)
    on_test = M.choose_threshold(frame["y"] == 1, probs[:, 1])
    assert on_test != pytest.approx(OOF_THRESHOLD, abs=1e-4)
    # calls in plots/confusion.csv follow the OOF threshold
    confusion = pd.read_csv(evaluated["reports"] / "plots" / "confusion.csv")
    expected = np.where(probs[:, 1] >= OOF_THRESHOLD, "covid", "normal")
    assert confusion["predicted"].tolist() == expected.tolist()


def test_oof_with_test_rows_is_refused(tiny):
    from covidxray import evaluate

    oof = pd.read_csv(tiny["reports"] / "cv" / "oof.csv", dtype={"image_id": str})
    with pytest.raises(CovidXrayError, match="test images"):
        evaluate.oof_threshold(oof, tiny["classes"], "youden", 0.95, test_ids=[oof.image_id.iloc[0]])


def test_outputs_match_dvc_yaml(evaluated):
    """Every metrics, plots and outs path of the evaluate stage exists, with the declared columns."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]
    reports = evaluated["reports"]

    def local(path: str) -> Path:
        assert path.startswith("reports/")
        return reports / path.removeprefix("reports/")

    for entry in stage["metrics"]:
        assert local(next(iter(entry)) if isinstance(entry, dict) else entry).is_file()
    for entry in stage["outs"]:
        assert local(next(iter(entry)) if isinstance(entry, dict) else entry).exists()
    for entry in stage["plots"]:
        path, spec = next(iter(entry.items()))
        table = pd.read_csv(local(path))
        assert len(table) > 0, path
        for axis in ("x", "y"):
            cols = spec[axis] if isinstance(spec[axis], list) else [spec[axis]]
            assert set(cols) <= set(table.columns), (path, cols)
    for name in ("roc", "precision_recall", "calibration", "confusion", "gradcam"):
        assert (reports / "figures" / f"{name}.png").stat().st_size > 1000


def test_train_outputs_left_alone(evaluated, tiny):
    cv = evaluated["reports"] / "cv"
    assert (cv / "keep.txt").read_text() == "train's"
    assert (cv / "oof.csv").read_bytes() == (tiny["reports"] / "cv" / "oof.csv").read_bytes()
    assert not list(evaluated["reports"].glob(".evaluate-*"))


def test_model_card(evaluated):
    text = (evaluated["reports"] / "report.md").read_text()
    warning_at = text.index("TEST-SHORTCUT")
    assert warning_at < text.index("## Model")  # warnings come first
    for needle in ("not a diagnostic device", "0.3000", "0.910 ± 0.040", "Classification report",
                   "figures/gradcam.png", "figures/roc.png", "synthetic", "Shortcut risk", "95% CI"):
        assert needle in text, needle


def test_logged_to_the_training_run(evaluated, tiny):
    import mlflow

    from covidxray import tracking

    tracking.configure(tiny["tracking_uri"], "covid-xray")
    run = mlflow.get_run(tiny["run_id"])
    assert run.data.metrics["test_auc"] == pytest.approx(evaluated["metrics"]["test"]["auc"])
    assert "test_sensitivity_ci_low" in run.data.metrics
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(tiny["run_id"], "evaluation")}
    assert {"evaluation/report.md", "evaluation/metrics.json", "evaluation/figures"} <= names
    assert len(mlflow.search_runs(experiment_names=["covid-xray"])) == 1  # no extra run


def test_failure_leaves_previous_reports(evaluated, tiny, monkeypatch):
    from covidxray import evaluate

    reports = evaluated["reports"]
    before = (reports / "metrics.json").read_text()
    cfg = _cfg(tiny, reports, ["evaluate.bootstrap=50"])

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(evaluate, "gradcam_figure", broken)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate.main(cfg)
    assert (reports / "metrics.json").read_text() == before
    assert not list(reports.glob(".evaluate-*"))


def test_threshold_out_of_step_is_an_error(tiny, tmp_path):
    from covidxray import evaluate

    models = tmp_path / "models"
    shutil.copytree(tiny["models"], models)
    meta = json.loads((models / "model.json").read_text())
    (models / "model.json").write_text(json.dumps({**meta, "threshold": 0.77}))
    reports = tmp_path / "reports"
    shutil.copytree(tiny["reports"], reports)
    cfg = _cfg(tiny, reports, [f"paths.models={models}"])
    with pytest.raises(CovidXrayError, match="threshold"):
        evaluate.main(cfg)
    assert not (reports / "metrics.json").exists()


def test_missing_model_is_a_clear_error(tiny, tmp_path):
    from covidxray import evaluate

    cfg = _cfg(tiny, tmp_path / "reports", [f"paths.models={tmp_path / 'nothing'}"])
    with pytest.raises(CovidXrayError, match="model not found"):
        evaluate.main(cfg)
