"""external stage: the final model on collections it never saw, the shortcut probes, the model card.

The external set is every image of the (class, collection) pairs in `data.sources.external`, less
those that near-duplicate a training image. It gets exactly what the internal test gets
(report.assess: metrics with patient-bootstrap intervals, ROC, PR, calibration, confusion,
Grad-CAM), plus figures per source and the shortcut probes (probes.py). Writes reports/external/
(metrics.json, plots/, figures/, report.md) and reports/model_card.md, which leads with internal
CV, internal test and external side by side; logs them on the training run with an `external_`
prefix. Everything is built in a temporary folder and moved into place at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from covidxray import CovidXrayError
from covidxray.evaluation import card, probes
from covidxray.data import sources
from covidxray.data import images as imgs
from covidxray.evaluation import report as R
from covidxray.modeling.models import MODEL_FILE, load_model
from covidxray.infra.outputs import scratch_dir

OUT_DIR = "external"
CARD = "model_card.md"


def read_json(path: Path) -> dict | None:
    """A JSON file of an earlier stage, or None when it is absent."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def run_probes(model, meta, stored, index, roles, test_ids, probe, seed: int) -> dict:
    """The three shortcut probes for this model (see probes.py)."""
    external, _ = sources.external_set(index, roles)
    train = sources.in_role(index, roles["train"])
    probe_pixels, probe_frame = probe
    inputs = imgs.prepare_for(meta, probe_pixels) if len(probe_frame) else probe_pixels
    same = probes.same_source_probe(model, meta, inputs, probe_frame)
    aucs = {
        "training set": probes.shortcut_aucs(index[train], stored[train], seed),
        "external set": probes.shortcut_aucs(index[external], stored[external], seed),
    }
    unseen = external | index["image_id"].isin(set(test_ids)).to_numpy()
    features = probes.feature_collection_aucs(model, imgs.prepare_for(meta, stored[unseen]), index[unseen], seed)
    return {"same_source_other_finding": same, "shortcut_auc": aucs, "feature_collection_auc": features}


def per_source_figures(index: pd.DataFrame, reports: Path, ext_dir: Path, classes: list[str]) -> dict:
    """Sensitivity per covid collection and specificity per other collection, for the internal
    test (evaluate's plots/confusion.csv) and the external set."""
    out = {}
    for part, table in (
        ("internal test", reports / "plots" / "confusion.csv"),
        ("external", ext_dir / "plots" / "confusion.csv"),
    ):
        if not table.is_file():
            continue
        rows = pd.read_csv(table, dtype={"image_id": str}).merge(index[["image_id", "label", "source"]], on="image_id")
        out[part] = probes.per_source(rows, rows["predicted"], classes)
    return out


def internal_reports(reports: Path) -> tuple[dict | None, dict | None, list[str]]:
    """(CV metrics with the out-of-fold image count, internal test metrics, internal test image ids)
    from what train and evaluate wrote."""
    cv, test = read_json(reports / "cv" / "metrics.json"), read_json(reports / "metrics.json")
    if cv is not None and (reports / "cv" / "oof.csv").is_file():
        cv["n_cv_images"] = int(len(pd.read_csv(reports / "cv" / "oof.csv")))
    confusion = reports / "plots" / "confusion.csv"
    test_ids = pd.read_csv(confusion, dtype={"image_id": str})["image_id"].tolist() if confusion.is_file() else []
    return cv, test, test_ids


def external_roles(meta: dict, configured, index: pd.DataFrame, curated: Path) -> dict:
    """The model's roles, with an external set whose collections the curated store holds."""
    roles = sources.model_roles(meta.get("sources"), configured)
    if not any(roles.get("external", {}).values()):
        raise CovidXrayError("data.sources.external names no collection: there is no external set to evaluate")
    sources.check_present({"external": roles["external"]}, index, curated)
    return roles


def main(cfg) -> None:
    """Stage entry: measure models/model.keras on its external set; write reports/external and the card."""
    models_dir, reports, curated = Path(cfg.paths.models), Path(cfg.paths.reports), Path(cfg.paths.curated)
    model, meta = load_model(models_dir / MODEL_FILE)
    stored, index, classes = imgs.load_curated(curated)
    if list(classes) != meta["classes"]:
        raise CovidXrayError(f"the model's classes {meta['classes']} differ from the curated data's {classes}")
    roles = external_roles(meta, cfg.data.get("sources"), index, curated)
    mask, dropped = sources.external_set(index, roles)
    frame, held_out = index[mask].reset_index(drop=True), sources.describe({"external": roles["external"]})
    cv, test, test_ids = internal_reports(reports)
    ev, seed = cfg.evaluate, int(cfg.seed)
    with scratch_dir(reports, "external") as tmp:
        context = {
            "title": f"External set: {held_out}",
            "data_lines": R.composition(frame, None),
            "extra_metrics": {"external_near_duplicates_dropped": dropped},
        }
        result = R.assess(
            model,
            meta,
            imgs.prepare_for(meta, stored[mask]),
            frame,
            tmp / OUT_DIR,
            n_resamples=ev.bootstrap,
            ci=ev.ci,
            seed=seed,
            per_group=ev.gradcam_per_group,
            n_bins=ev.get("calibration_bins", 10),
            partition="external",
            context=context,
        )
        result["per_source"] = per_source_figures(index, reports, tmp / OUT_DIR, classes)
        result["probes"] = run_probes(model, meta, stored, index, roles, test_ids, imgs.load_probe(curated), seed)
        (tmp / OUT_DIR / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / CARD).write_text(
            card.model_card(
                meta,
                sources.describe(roles),
                cv,
                test,
                result,
                result["per_source"],
                result["probes"],
                dropped,
                float(ev.ci),
            )
        )
        shutil.copy(tmp / CARD, tmp / OUT_DIR / CARD)
        run_id = R.log_to_mlflow(
            tmp / OUT_DIR,
            result,
            cfg.mlflow.tracking_uri,
            cfg.mlflow.experiment,
            run_id=meta.get("mlflow_run_id"),
            run_name="external",
            artifact_path="external",
            metric_prefix="external_",
        )
        R.install(tmp, reports, names=(OUT_DIR, CARD))
    e = result["external"]
    print(
        f"external: {len(frame)} images ({held_out}): AUC {R.fmt(e['auc'])} [{R.fmt(e['auc_ci_low'])}, "
        f"{R.fmt(e['auc_ci_high'])}], sensitivity {R.fmt(e['sensitivity'])}, specificity {R.fmt(e['specificity'])} "
        f"at threshold {result['threshold']:.3f}; wrote {reports}/{OUT_DIR} and {reports}/{CARD}; MLflow run {run_id}"
    )
