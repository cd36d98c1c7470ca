"""external stage: the final model on collections it never saw, the shortcut probes, the model card.

The external set is every image of the (class, collection) pairs in `data.sources.external`, less
those that near-duplicate a training image. It gets exactly what the internal test gets
(evaluation.publish: metrics with patient-bootstrap intervals, ROC, PR, calibration, confusion,
Grad-CAM), plus figures per source and the shortcut probes (evaluation/probes.py). Writes reports/external/
(metrics.json, plots/, figures/, report.md) and reports/model_card.md, which leads with internal
CV, internal test and external side by side; logs them on the training run with an `external_`
prefix. Everything is built in a temporary folder and moved into place at the end.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd

from covidxray import CovidXrayError
from covidxray.data import images, sources
from covidxray.data.collections import load_facts
from covidxray.evaluation import card, probes, report
from covidxray.evaluation.publish import LogTo, publish
from covidxray.infra.outputs import read_json
from covidxray.modeling.features import open_store
from covidxray.modeling.specs import MODEL_FILE, RUN_KEYS
from covidxray.serving import registry
from covidxray.settings import evaluate_settings

OUT_DIR = "external"
CARD = "model_card.md"


def run_probes(model, meta, stored, index, roles, test_ids, probe, seed: int, store=None) -> dict:
    """The three shortcut probes for this model (see probes.py); a frozen backbone's features from `store`."""
    external, _ = sources.external_set(index, roles)
    train = sources.in_role(index, roles["train"])
    probe_pixels, probe_frame = probe
    inputs = images.prepare_for(meta, probe_pixels) if len(probe_frame) else probe_pixels
    same = probes.same_source_probe(model, meta, inputs, probe_frame, store=store)
    aucs = {
        "training set": probes.shortcut_aucs(index[train], stored[train], seed),
        "external set": probes.shortcut_aucs(index[external], stored[external], seed),
    }
    unseen = external | index["image_id"].isin(set(test_ids)).to_numpy()
    unseen_inputs = images.prepare_for(meta, stored[unseen])
    features = probes.feature_collection_aucs(model, unseen_inputs, index[unseen], seed, store=store)
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
    cv = read_json(reports / "cv" / "metrics.json", required=False)
    test = read_json(reports / "metrics.json", required=False)
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
    st = evaluate_settings(cfg)  # checked before TensorFlow loads
    from covidxray.modeling.models import load_model

    reports, curated = st.out.reports, st.curated
    model, meta = load_model(st.models / MODEL_FILE)
    stored, index, classes = images.load_curated(curated)
    if list(classes) != meta["classes"]:
        raise CovidXrayError(f"the model's classes {meta['classes']} differ from the curated data's {classes}")
    roles = external_roles(meta, st.sources, index, curated)
    mask, dropped = sources.external_set(index, roles)
    frame, held_out = index[mask].reset_index(drop=True), sources.describe({"external": roles["external"]})
    cv, test, test_ids = internal_reports(reports)
    context = {
        "title": f"External set: {held_out}",
        "set_name": f"external set ({held_out})",
        "data_lines": report.composition(frame, None),
        "extra_metrics": {"external_near_duplicates_dropped": dropped},
    }

    started = time.perf_counter()
    print(f"external: measuring the model on {len(frame)} images ({held_out})")

    def probes_and_card(work: Path, result: dict) -> None:
        print(f"external: measured ({time.perf_counter() - started:.0f} s); running the shortcut probes")
        result["per_source"] = per_source_figures(index, reports, work / OUT_DIR, classes)
        probe = images.load_probe(curated)
        store = open_store(st.out.assess.features)
        result["probes"] = run_probes(model, meta, stored, index, roles, test_ids, probe, st.out.assess.seed, store)
        print(f"external: probes done ({time.perf_counter() - started:.0f} s)")
        roles_text, ci = sources.describe(roles), st.out.assess.ci
        names = sorted({n for per_class in roles.values() for some in per_class.values() for n in some})
        data = card.data_lines(load_facts(curated), names)  # citation and license of each collection
        text = card.model_card(
            meta, roles_text, cv, test, result, result["per_source"], result["probes"], dropped, ci, data
        )
        (work / CARD).write_text(text)
        shutil.copy(work / CARD, work / OUT_DIR / CARD)

    log = LogTo(
        st.out.tracking_uri,
        st.out.experiment,
        run_id=meta.get("mlflow_run_id"),
        run_name="external",
        artifact_path="external",
        metric_prefix="external_",
    )
    result = publish(
        model,
        {k: v for k, v in meta.items() if k not in RUN_KEYS},  # the reports (DVC outputs) name no run
        images.prepare_for(meta, stored[mask]),
        frame,
        reports,
        options=st.out.assess,
        by="external",
        partition="external",
        context=context,
        log=log,
        names=(OUT_DIR, CARD),
        subfolder=OUT_DIR,
        extend=probes_and_card,
    )
    e = result["external"]
    registry.add_figures(  # the registered version's description carries its external figure
        meta.get("registered_model"),
        meta.get("registered_version"),
        {f"external AUC ({held_out})": f"{e['auc']:.3f} [{e['auc_ci_low']:.3f}, {e['auc_ci_high']:.3f}]"},
    )
    print(
        f"external: {len(frame)} images ({held_out}): {report.headline(result['external'])} at threshold "
        f"{result['threshold']:.3f}; wrote {reports}/{OUT_DIR} and {reports}/{CARD}; "
        f"MLflow run {result['mlflow_run_id']}"
    )
