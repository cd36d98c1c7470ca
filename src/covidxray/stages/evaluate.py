"""evaluate stage: the final model on the held-out test partition, and the model card.

Writes into reports/ (cfg.paths.reports) only its own outputs: metrics.json (DVC metrics),
plots/*.csv (DVC plots), figures/*.png and report.md; reports/cv/ belongs to the train stage.
Everything is built in a temporary folder and moved into place at the end, so a failure leaves
the previous reports untouched. The measuring itself is `report.assess`, shared with the external
stage and `covidxray validate`, so every set gets exactly the same figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.data import images as imgs
from covidxray.evaluation import metrics as M
from covidxray.evaluation import report as R
from covidxray.data import sources
from covidxray.modeling.models import MODEL_FILE, load_model
from covidxray.infra.outputs import scratch_dir

# -- data -------------------------------------------------------------------------------------------


def test_partition(images: np.ndarray, index: pd.DataFrame, splits: pd.DataFrame, roles: dict):
    """The test partition of the training collections: the stored images and their index rows."""
    joined = imgs.with_splits(index, splits)
    rows = np.flatnonzero((joined["partition"] == "test").to_numpy() & sources.in_role(joined, roles["train"]))
    if len(rows) == 0:
        raise CovidXrayError("the splits hold no test images of the training collections")
    return np.asarray(images[rows]), index.iloc[rows].reset_index(drop=True)


def oof_threshold(oof: pd.DataFrame, classes: list[str], method: str, target_sensitivity: float, test_ids=()) -> float:
    """The decision threshold re-derived from out-of-fold CV predictions (covid vs the rest);
    refuses predictions of test images, which must never inform the threshold."""
    column = f"p_{classes[-1]}"
    if column not in oof.columns or "label" not in oof.columns:
        raise CovidXrayError(f"oof.csv needs columns label and {column}")
    leaked = set(oof.get("image_id", pd.Series(dtype=str)).astype(str)) & {str(i) for i in test_ids}
    if leaked:
        raise CovidXrayError(f"oof.csv holds {len(leaked)} test images: the threshold must come from CV folds only")
    return M.choose_threshold(oof["label"].astype(str) == classes[-1], oof[column], method, target_sensitivity)


# -- the stage -------------------------------------------------------------------------------------


def config_yaml(cfg) -> str:
    """The config sections that define the model and this evaluation, as YAML."""
    from omegaconf import OmegaConf

    keys = ("seed", "data", "model", "optimizer", "augment", "train", "cv", "split", "evaluate")
    return OmegaConf.to_yaml(OmegaConf.create({k: cfg[k] for k in keys if k in cfg}))


def _read_json(path: Path):
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def main(cfg) -> None:
    """Stage entry: evaluate models/model.keras on the test partition; write reports/."""
    models_dir, reports = Path(cfg.paths.models), Path(cfg.paths.reports)
    model, meta = load_model(models_dir / MODEL_FILE)
    pixels, index, classes = imgs.load_curated(cfg.paths.curated)
    if list(classes) != meta["classes"]:
        raise CovidXrayError(f"the model's classes {meta['classes']} differ from the curated data's {classes}")
    roles = sources.model_roles(meta.get("sources"), cfg.data.get("sources"))
    splits = imgs.load_splits(cfg.paths.splits)
    stored, frame = test_partition(pixels, index, splits, roles)
    test_images = imgs.prepare_for(meta, stored)

    oof_path = reports / "cv" / "oof.csv"
    if not oof_path.is_file():
        raise CovidXrayError(f"out-of-fold predictions missing: {oof_path} (run `dvc repro train`)")
    train_cfg = cfg.get("train") or {}
    method = meta.get("threshold_method") or train_cfg.get("threshold", "youden")
    target = meta.get("target_sensitivity") or train_cfg.get("target_sensitivity", 0.95)
    derived = oof_threshold(
        pd.read_csv(oof_path, dtype={"image_id": str, "patient_id": str}),
        classes,
        method,
        target,
        test_ids=frame["image_id"],
    )
    if not math.isclose(derived, meta["threshold"], rel_tol=1e-6, abs_tol=1e-6):
        raise CovidXrayError(
            f"model.json's threshold {meta['threshold']:.6f} is not the one oof.csv gives "
            f"({method}: {derived:.6f}): the model and the CV predictions are out of step"
        )
    meta = {**meta, "threshold_method": method}

    context = {
        "title": "Internal test report (held-out patients of the training collections)",
        "audit": _read_json(Path(cfg.paths.curated) / "audit.json"),
        "data_lines": R.composition(index, sources.role_table(index, splits, roles)),
        "config_yaml": config_yaml(cfg),
        "cv_metrics": _read_json(reports / "cv" / "metrics.json"),
        "extra_metrics": {"threshold_oof": derived},
    }
    ev = cfg.evaluate
    with scratch_dir(reports, "evaluate") as tmp:
        result = R.assess(
            model,
            meta,
            test_images,
            frame,
            tmp,
            n_resamples=ev.bootstrap,
            ci=ev.ci,
            seed=cfg.seed,
            per_group=ev.gradcam_per_group,
            n_bins=ev.get("calibration_bins", 10),
            context=context,
        )
        run_id = R.log_to_mlflow(
            tmp,
            result,
            cfg.mlflow.tracking_uri,
            cfg.mlflow.experiment,
            run_id=meta.get("mlflow_run_id"),
            run_name="evaluate",
        )
        R.install(tmp, reports)
    t = result["test"]
    print(
        f"evaluate: {len(frame)} test images: AUC {R.fmt(t['auc'])} [{R.fmt(t['auc_ci_low'])}, "
        f"{R.fmt(t['auc_ci_high'])}], sensitivity {R.fmt(t['sensitivity'])}, specificity {R.fmt(t['specificity'])} "
        f"at threshold {result['threshold']:.3f}; wrote {reports}/{{metrics.json,plots,figures,report.md}}; "
        f"MLflow run {run_id}"
    )
