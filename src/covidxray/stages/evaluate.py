"""evaluate stage: the final model on the held-out test partition of its training collections.

Writes into reports/ (paths.reports) only its own outputs: metrics.json (DVC metrics),
plots/*.csv (DVC plots), figures/*.png and report.md; reports/cv/ belongs to the train stage.
Everything is built in a temporary folder and moved into place at the end, so a failure leaves
the previous reports untouched. Measuring, figures, logging and installing are evaluation.publish,
shared with `covidxray validate`, so every set gets exactly the same figures.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.data import images, sources
from covidxray.evaluation import metrics, report
from covidxray.evaluation.publish import LogTo, publish
from covidxray.infra.outputs import read_json
from covidxray.networks.model_file import MODEL_FILE, RUN_KEYS
from covidxray.settings.evaluate import evaluate_settings

# -- data -------------------------------------------------------------------------------------------


def test_partition(pixels: np.ndarray, index: pd.DataFrame, splits: pd.DataFrame, roles: dict):
    """The test partition of the training collections: the stored images and their index rows."""
    joined = images.with_splits(index, splits)
    rows = np.flatnonzero((joined["partition"] == "test").to_numpy() & sources.in_role(joined, roles["train"]))
    if len(rows) == 0:
        raise CovidXrayError("the splits hold no test images of the training collections")
    return np.asarray(pixels[rows]), index.iloc[rows].reset_index(drop=True)


def oof_threshold(oof: pd.DataFrame, classes: list[str], method: str, target_sensitivity: float, test_ids=()) -> float:
    """The decision threshold re-derived from out-of-fold CV predictions (covid vs the rest);
    refuses predictions of test images, which must never inform the threshold."""
    column = f"p_{classes[-1]}"
    if column not in oof.columns or "label" not in oof.columns:
        raise CovidXrayError(f"oof.csv needs columns label and {column}")
    leaked = set(oof.get("image_id", pd.Series(dtype=str)).astype(str)) & {str(i) for i in test_ids}
    if leaked:
        raise CovidXrayError(f"oof.csv holds {len(leaked)} test images: the threshold must come from CV folds only")
    return metrics.choose_threshold(oof["label"].astype(str) == classes[-1], oof[column], method, target_sensitivity)


# -- the stage -------------------------------------------------------------------------------------


def config_yaml(cfg) -> str:
    """The config sections that define the model and this evaluation, as YAML."""
    from omegaconf import OmegaConf

    keys = ("seed", "data", "model", "optimizer", "augment", "train", "cv", "split", "evaluate")
    return OmegaConf.to_yaml(OmegaConf.create({k: cfg[k] for k in keys if k in cfg}))


def main(cfg) -> None:
    """Stage entry: evaluate models/model.keras on the test partition; write reports/."""
    settings = evaluate_settings(cfg)  # checked before TensorFlow loads
    from covidxray.networks.model_file import load_model

    model, meta = load_model(settings.models / MODEL_FILE, engine="keras")  # Grad-CAM and the feature store need Keras
    pixels, index, classes = images.load_curated(settings.curated)
    if list(classes) != meta["classes"]:
        raise CovidXrayError(f"the model's classes {meta['classes']} differ from the curated data's {classes}")
    roles = sources.model_roles(meta.get("sources"), settings.sources)
    splits = images.load_splits(settings.splits)
    stored, frame = test_partition(pixels, index, splits, roles)

    oof_path = settings.out.reports / "cv" / "oof.csv"
    if not oof_path.is_file():
        raise CovidXrayError(f"out-of-fold predictions missing: {oof_path} (run `dvc repro train`)")
    method = meta.get("threshold_method") or settings.threshold
    target = meta.get("target_sensitivity") or settings.target_sensitivity
    oof = pd.read_csv(oof_path, dtype={"image_id": str, "patient_id": str})
    derived = oof_threshold(oof, classes, method, target, test_ids=frame["image_id"])
    if not math.isclose(derived, meta["threshold"], rel_tol=1e-6, abs_tol=1e-6):
        raise CovidXrayError(
            f"model.json's threshold {meta['threshold']:.6f} is not the one oof.csv gives "
            f"({method}: {derived:.6f}): the model and the CV predictions are out of step"
        )
    meta = {**meta, "threshold_method": method}
    context = {
        "title": "Internal test report (held-out patients of the training collections)",
        "set_name": "internal test set",
        "audit": read_json(settings.curated / "audit.json", required=False),
        "data_lines": report.composition(index, sources.role_table(index, splits, roles)),
        "config_yaml": config_yaml(cfg),
        "cv_metrics": read_json(settings.out.reports / "cv" / "metrics.json", required=False),
        "extra_metrics": {"threshold_oof": derived},
    }
    log = LogTo(
        settings.out.tracking_uri, settings.out.experiment, run_id=meta.get("mlflow_run_id"), run_name="evaluate"
    )
    result = publish(
        model,
        {k: v for k, v in meta.items() if k not in RUN_KEYS},  # the reports (DVC outputs) name no run
        images.prepare_for(meta, stored),
        frame,
        settings.out.reports,
        options=settings.out.assess,
        by="evaluate",
        context=context,
        log=log,
    )
    print(
        f"evaluate: {len(frame)} test images: {report.headline(result['test'])} at threshold "
        f"{result['threshold']:.3f}; wrote {settings.out.reports}/{{metrics.json,plots,figures,report.md}}; "
        f"MLflow run {result['mlflow_run_id']}"
    )
