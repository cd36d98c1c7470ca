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
from PIL import Image

from conftest import REPO, make_cfg
from covidxray import CovidXrayError
from covidxray.networks.model_file import read_meta

OOF_THRESHOLD = 0.3  # what the synthetic oof.csv below gives (Youden): not what test rows would give
_BUILT: dict = {}


def overrides(dirs: dict, reports: Path | None = None, extra=()) -> list[str]:
    """Config overrides wiring a stage to the trained smoke model's folders."""
    return [
        "experiment=smoke",
        f"paths.curated={dirs['curated']}",
        f"paths.splits={dirs['splits']}",
        f"paths.models={dirs['models']}",
        f"paths.reports={reports or dirs['reports']}",
        f"mlflow.tracking_uri={dirs['tracking_uri']}",
        "evaluate.bootstrap=200",
        *extra,
    ]


def trained_model(root: Path, tiny_data: dict) -> dict:
    """The smoke experiment trained by the real train stage on tiny_data (with an audit.json
    carrying a shortcut warning): models/, reports/cv/, an MLflow store with the parent run and
    the registered model. Built once per test session (~20 s)."""
    if "dirs" in _BUILT:
        return _BUILT["dirs"]
    from covidxray.stages import train

    curated = root / "curated"
    shutil.copytree(tiny_data["curated"], curated)
    audit = {
        "shortcuts": [
            {
                "features": "geometry_format",
                "auc": 0.97,
                "warning": "original width alone predict the label (TEST-SHORTCUT)",
            }
        ],
        "notes": ["each class comes from a single source"],
    }
    (curated / "audit.json").write_text(json.dumps(audit))
    dirs = {
        "root": root,
        "curated": curated,
        "splits": tiny_data["splits"],
        "models": root / "models",
        "reports": root / "reports",
        "tracking_uri": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
    }
    train.main(make_cfg(overrides(dirs)))
    meta = read_meta(dirs["models"] / "model.keras")
    dirs.update(run_id=meta["mlflow_run_id"], classes=meta["classes"], meta=meta)
    _BUILT["dirs"] = dirs
    return dirs


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tiny_data) -> dict:
    return trained_model(tmp_path_factory.mktemp("trained"), tiny_data)


def _cfg(tiny: dict, reports: Path, extra=()):
    return make_cfg(overrides(tiny, reports, extra))


@pytest.fixture(scope="module")
def evaluated(tiny, tmp_path_factory) -> dict:
    """evaluate.main run once into a copy of the reports folder (with reports/cv in it)."""
    from covidxray.stages import evaluate

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
    assert m["n_test_images"] == len(test)  # the test partition of the training collections (all of them)
    assert m["n_test_patients"] == test.patient_id.nunique()
    for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auc", "pr_auc", "brier", "ece"):
        assert key in m["test"] and f"{key}_ci_low" in m["test"] and f"{key}_ci_high" in m["test"], key
        value, lo, hi = m["test"][key], m["test"][f"{key}_ci_low"], m["test"][f"{key}_ci_high"]
        if value is not None:
            assert lo <= value + 1e-9 and value <= hi + 1e-9, key
    assert m["bootstrap"] == {"resamples": 200, "ci": 0.95, "unit": "patient", "seed": 42, "calibration_bins": 10}
    assert sum(sum(row.values()) for row in m["confusion"].values()) == len(test)


def test_threshold_is_the_oof_one(evaluated, tiny):
    from covidxray.evaluation import metrics

    oof = pd.read_csv(tiny["reports"] / "cv" / "oof.csv")
    chosen = metrics.choose_threshold(oof["label"] == "covid", oof["p_covid"], tiny["meta"]["threshold_method"])
    assert evaluated["metrics"]["threshold"] == pytest.approx(
        tiny["meta"]["threshold"], rel=1e-3
    )  # 4 significant digits
    assert evaluated["metrics"]["threshold_oof"] == pytest.approx(chosen, rel=1e-3)


def test_threshold_comes_from_oof_not_test(tiny, tmp_path):
    """With out-of-fold predictions that give 0.3, the report uses 0.3, although the test rows
    would choose another threshold."""
    from covidxray.data import images
    from covidxray.evaluation import metrics
    from covidxray.networks.inference import probabilities
    from covidxray.networks.model_file import load_model
    from covidxray.stages import evaluate

    models, reports = tmp_path / "models", tmp_path / "reports"
    shutil.copytree(tiny["models"], models)
    shutil.copytree(tiny["reports"] / "cv", reports / "cv")
    oof = pd.read_csv(reports / "cv" / "oof.csv")
    pos = (oof["label"] == "covid").to_numpy()
    p = np.empty(len(oof))
    p[pos] = np.linspace(OOF_THRESHOLD, 1.0, pos.sum())  # separable: Youden picks the lowest covid score
    p[~pos] = np.linspace(0.0, 0.25, (~pos).sum())
    oof["p_normal"], oof["p_covid"] = 1 - p, p
    oof.to_csv(reports / "cv" / "oof.csv", index=False)
    meta = json.loads((models / "model.json").read_text())
    (models / "model.json").write_text(json.dumps({**meta, "threshold": OOF_THRESHOLD}))
    # a separate MLflow store: the model's run is not in it, so evaluate logs to a new run
    store = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    evaluate.main(_cfg(tiny, reports, [f"paths.models={models}", f"mlflow.tracking_uri={store}"]))
    written = json.loads((reports / "metrics.json").read_text())
    assert written["threshold"] == pytest.approx(OOF_THRESHOLD, rel=1e-3)  # files: 4 significant digits

    model, meta = load_model(models)
    pixels, index, _ = images.load_curated(tiny["curated"])
    splits = images.load_splits(tiny["splits"])
    test_images, frame = evaluate.test_partition(pixels, index, splits, tiny["meta"]["sources"])
    probs = probabilities(model, test_images, 2)
    assert metrics.choose_threshold(frame["y"] == 1, probs[:, 1]) != pytest.approx(OOF_THRESHOLD, abs=1e-4)
    confusion = pd.read_csv(reports / "plots" / "confusion.csv")
    assert confusion["predicted"].tolist() == np.where(probs[:, 1] >= OOF_THRESHOLD, "covid", "normal").tolist()

    import mlflow

    from covidxray.infra import tracking

    tracking.configure(store, "covid-xray")
    runs = mlflow.search_runs(experiment_names=["covid-xray"])
    assert len(runs) == 1 and runs["tags.model_run_id"].iloc[0] == meta["mlflow_run_id"]


def test_oof_with_test_rows_is_refused(tiny):
    from covidxray.stages import evaluate

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
        # nothing runs off the canvas: a clipped title ("...570 patier") leaves ink on its edge
        pixels = np.asarray(Image.open(reports / "figures" / f"{name}.png").convert("L"))
        edges = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert edges.min() > 200, f"{name}.png: something touches the edge of the image"


def test_train_outputs_left_alone(evaluated, tiny):
    cv = evaluated["reports"] / "cv"
    assert (cv / "keep.txt").read_text() == "train's"
    assert (cv / "oof.csv").read_bytes() == (tiny["reports"] / "cv" / "oof.csv").read_bytes()
    assert not list(evaluated["reports"].glob(".evaluate-*"))


def test_model_card(evaluated):
    text = (evaluated["reports"] / "report.md").read_text()
    warning_at = text.index("TEST-SHORTCUT")
    assert warning_at < text.index("## Model")  # warnings come first
    # then the results; what produced them after, the configuration collapsed (issue 23)
    assert warning_at < text.index("## Test set: ") < text.index("## Figures") < text.index("## Model")
    assert text.index("## Model") < text.index("## Configuration") < text.index("<details>") < text.index("```yaml")
    assert "external set's figures" not in text and "leave-one-collection-out figures" in text
    threshold = f"{evaluated['metrics']['threshold']:.4f}"
    for needle in (
        "not a diagnostic device",
        threshold,
        "| cv_auc |",
        "oof_auc",
        "Classification report",
        "figures/gradcam.png",
        "figures/roc.png",
        "| kermany |",  # the composition per collection
        "| radiography |",  # the default trains on every collection
        "Shortcut risk",
        "95% CI",
    ):
        assert needle in text, needle


def test_logged_to_the_training_run(evaluated, tiny):
    import mlflow

    from covidxray.infra import tracking

    tracking.configure(tiny["tracking_uri"], "covid-xray")
    run = mlflow.get_run(tiny["run_id"])
    assert run.data.metrics["test_auc"] == pytest.approx(
        evaluated["metrics"]["test"]["auc"], rel=1e-3
    )  # files: 4 significant digits
    assert "test_sensitivity_ci_low" in run.data.metrics
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(tiny["run_id"], "evaluation")}
    assert {"evaluation/report.md", "evaluation/metrics.json", "evaluation/figures"} <= names
    runs = mlflow.search_runs(experiment_names=["covid-xray"])
    assert not (runs["tags.mlflow.runName"] == "evaluate").any()  # no extra run


def test_failure_leaves_previous_reports(evaluated, tiny, monkeypatch):
    from covidxray.evaluation import figures
    from covidxray.stages import evaluate

    reports = evaluated["reports"]
    before = (reports / "metrics.json").read_text()
    cfg = _cfg(tiny, reports, ["evaluate.bootstrap=50"])

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(figures, "gradcam_figure", broken)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate.main(cfg)
    assert (reports / "metrics.json").read_text() == before
    assert not list(reports.glob(".evaluate-*"))


def test_a_killed_evaluates_scratch_is_removed_by_the_next_run(evaluated, tiny, monkeypatch):
    from conftest import run_until_killed
    from covidxray.evaluation import figures
    from covidxray.stages import evaluate

    reports = evaluated["reports"]
    run_until_killed(
        f"""
        from covidxray.infra.outputs import scratch_dir
        with scratch_dir({str(reports)!r}, "evaluate") as tmp:
            (tmp / "metrics.json").write_text("{{}}")
            die()
    """,
        reports,
    )
    assert len(list(reports.glob(".evaluate-*"))) == 1

    def stop(*args, **kwargs):
        raise RuntimeError("stop")

    monkeypatch.setattr(figures, "gradcam_figure", stop)
    with pytest.raises(RuntimeError, match="stop"):  # a short rerun: it gets as far as the figures
        evaluate.main(_cfg(tiny, reports, ["evaluate.bootstrap=20"]))
    assert not list(reports.glob(".evaluate-*"))


def test_threshold_out_of_step_is_an_error(tiny, tmp_path):
    from covidxray.stages import evaluate

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
    from covidxray.stages import evaluate

    cfg = _cfg(tiny, tmp_path / "reports", [f"paths.models={tmp_path / 'nothing'}"])
    with pytest.raises(CovidXrayError, match="model not found"):
        evaluate.main(cfg)


def test_three_class_assess(tmp_path):
    """Three classes: covid-vs-rest headline figures plus per-class one-vs-rest and macro."""
    from covidxray.networks.builders import build_model
    from covidxray.evaluation.assess import AssessOptions
    from covidxray.evaluation.publish import write_assessment

    classes = ["normal", "pneumonia", "covid"]
    model = build_model(make_cfg(["experiment=smoke"]).model, 32, 3)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (18, 32, 32)).astype(np.uint8)
    frame = pd.DataFrame(
        {
            "image_id": [f"i{i}" for i in range(18)],
            "label": np.repeat(classes, 6),
            "patient_id": [f"p{i // 2}" for i in range(18)],
        }
    )
    meta = {"classes": classes, "image_size": 32, "resize": "stretch", "threshold": 0.34, "threshold_method": "youden"}
    result = write_assessment(model, meta, pixels, frame, tmp_path, AssessOptions(100, 0.9, 0, 2, 10))
    assert set(result["test_per_class"]) == set(classes)
    for figures in (*result["test_per_class"].values(), result["test_macro"]):
        assert {"auc", "auc_ci_low", "sensitivity", "f1", "ece"} <= set(figures)
    assert set(result["confusion"]) == set(classes)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test_macro"]["auc"] == pytest.approx(
        np.mean([saved["test_per_class"][c]["auc"] for c in classes]), rel=1e-3
    )
    report = (tmp_path / "report.md").read_text()
    assert "Per class (one-vs-rest) and macro average" in report and "**pneumonia**" in report
    assert "90% CI" in report
    assert (tmp_path / "figures" / "roc.png").is_file() and (tmp_path / "figures" / "gradcam.png").is_file()
