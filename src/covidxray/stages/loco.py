"""loco stage: leave-one-collection-out, the shortcut probes, and the model card.

For each held-out group of `loco.groups` (default: every group that can be held out while each
class keeps a training collection), the recipe of the train stage is trained again on the
remaining collections and measured on the group (evaluation/loco.py): AUC with patient-bootstrap
intervals beside the shortcut baseline of the same images, sensitivity and specificity at the
transferred threshold and at a threshold calibrated on K labelled images of the group, and per
collection. The mean and worst group are the recipe's estimate at a site it never saw.

The final model (models/model.keras, trained on every training collection) gets the shortcut
probes (probes.py), and reports/model_card.md leads with the LOCO figures, then the internal ones.

Outputs (installed together at the end; a reader sees all old files or all new ones):
  reports/loco/headline.json    DVC metrics: n held out, AUC mean (auc) and worst (auc_min), calibrated specificity
  reports/loco/metrics.json     loco_<figure>_mean/_worst, per group (committed, not a DVC metric)
  reports/loco/details.json     every figure: intervals, per collection, calibration draws, probes
  reports/loco/predictions.csv  group, image_id, role (train | held_out), label, source, score
  reports/loco/plots/roc.csv    group, fpr, tpr (one ROC curve per held-out group)
  reports/loco/report.md        and reports/model_card.md
MLflow: the headline as loco_* metrics on the recipe's training run (model.json's mlflow_run_id),
the model card as its model_card.md (stamped with version, run, commit, data version and date), and
the mean and worst figures as tags of the registered version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from covidxray import CovidXrayError
from covidxray.data import images as imgs
from covidxray.data import sources
from covidxray.data.collections import load_facts
from covidxray.evaluation import card, loco, probes
from covidxray.evaluation.metrics import curves, headline
from covidxray.evaluation.publish import LogTo, log_to_mlflow
from covidxray.evaluation.report import fmt
from covidxray.infra.outputs import figures_text, json_safe, read_json, replace_dir
from covidxray.networks.model_file import MODEL_FILE
from covidxray.serving import registry
from covidxray.settings.loco import loco_settings

TIMINGS = ("seconds", "feature_cache_s")  # vary run to run: logged to MLflow, never in a DVC output

OUT_DIR = "loco"
CARD = "model_card.md"
GROUPS_DIR = "groups"  # reports/loco/groups/<group>.json: one row per held-out group in `dvc metrics show`


def internal_reports(reports: Path, index: pd.DataFrame, classes: list[str]) -> tuple[dict | None, dict | None, dict]:
    """(CV metrics with the out-of-fold image count, internal test metrics, internal test figures
    per collection) from what train and evaluate wrote."""
    cv = read_json(reports / "cv" / "metrics.json", required=False)
    test = read_json(reports / "metrics.json", required=False)
    if cv is not None and (reports / "cv" / "oof.csv").is_file():
        cv["n_cv_images"] = int(len(pd.read_csv(reports / "cv" / "oof.csv")))
    per_collection = {}
    confusion = reports / "plots" / "confusion.csv"
    if confusion.is_file():
        rows = pd.read_csv(confusion, dtype={"image_id": str}).merge(
            index[["image_id", "label", "source"]], on="image_id"
        )
        per_collection = probes.per_source(rows, rows["predicted"], classes)
    return cv, test, per_collection


def run_probes(model, meta, stored, index, roles, test_ids, probe, seed: int) -> dict:
    """The shortcut probes of the final model: the same-source probe, the training set's shortcut
    AUCs, and whether its features tell the collections apart within a class (internal test)."""
    train = sources.in_role(index, roles["train"])
    probe_pixels, probe_frame = probe
    inputs = imgs.prepare_for(meta, probe_pixels) if len(probe_frame) else probe_pixels
    same = probes.same_source_probe(model, meta, inputs, probe_frame)
    aucs = {"training set": probes.shortcut_aucs(index[train], stored[train], seed)}
    unseen = index["image_id"].isin(set(test_ids)).to_numpy()
    features = {}  # without evaluate's internal test there are no unseen images to probe
    if unseen.any():
        features = probes.feature_collection_aucs(model, imgs.prepare_for(meta, stored[unseen]), index[unseen], seed)
    return {"same_source_other_finding": same, "shortcut_auc": aucs, "feature_collection_auc": features}


def roc_table(predictions: pd.DataFrame, positive: str) -> pd.DataFrame:
    """group, fpr, tpr: the ROC curve of each held-out group that has both classes."""
    parts = []
    for name, rows in predictions[predictions["role"] == "held_out"].groupby("group", sort=False):
        y = (rows["label"] == positive).to_numpy()
        if 0 < y.sum() < len(y):
            roc = curves(y, rows["score"].to_numpy())["roc"]
            parts.append(roc[["fpr", "tpr"]].assign(group=name))
    return pd.concat(parts, ignore_index=True)[["group", "fpr", "tpr"]] if parts else pd.DataFrame()


def write_outputs(out: Path, result: dict, extra: dict, report_md: str, positive: str) -> dict:
    """headline.json (DVC metrics: the columns every stage shares), metrics.json (mean, worst and
    per group), groups/<group>.json (one row per group for `dvc metrics show reports/loco/groups`),
    details.json, predictions.csv, plots/roc.csv, report.md."""
    (out / "plots").mkdir(parents=True)
    found = json_safe(loco.headline(result))
    (out / "metrics.json").write_text(figures_text(found, sort_keys=True))  # found: full precision, for MLflow
    summary, n = result["summary"], sum(g["n_images"] for g in result["groups"].values() if g["counted"])
    shown = headline(  # over the groups the objective counts (conf/loco/default.yaml: objective)
        n,
        summary["loco_auc_mixed_mean"],
        auc_min=summary["loco_auc_mixed_worst"],  # the worst counted group (auc is their mean)
        spec_cal=summary["loco_calibrated_specificity_mean"],
    )
    (out / "headline.json").write_text(figures_text(shown))
    (out / GROUPS_DIR).mkdir()
    for stem, row in loco.group_metrics(result).items():
        (out / GROUPS_DIR / f"{stem}.json").write_text(figures_text(row))
    details = {k: v for k, v in result.items() if k not in ("predictions", *TIMINGS)}  # timings: MLflow only
    details["groups"] = {name: {k: v for k, v in g.items() if k not in TIMINGS} for name, g in result["groups"].items()}
    (out / "details.json").write_text(figures_text({**details, **extra}))
    result["predictions"].to_csv(out / "predictions.csv", index=False)
    roc_table(result["predictions"], positive).to_csv(out / "plots" / "roc.csv", index=False)
    (out / "report.md").write_text(report_md)
    return found


def log_card(run_id: str, card_md: str, meta: dict) -> None:
    """The model card as model_card.md of the training run (the version's description points to
    it), stamped with what reports/model_card.md cannot carry and stay a reproducible DVC output:
    the model version, run, git commit, data version and date."""
    import datetime

    from mlflow.tracking import MlflowClient

    from covidxray.infra import tracking

    data = ", ".join(f"{k.removeprefix('data_version.')} {v}" for k, v in tracking.data_version_tags().items())
    version = meta.get("registered_version")
    lines = card.provenance_lines(
        model=f"{meta.get('registered_model')} version {version}" if version else "not registered",
        run_id=run_id,
        commit=tracking.git_tags().get("git_commit", "unknown"),
        data=data or "unknown",
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    MlflowClient().log_text(run_id, card.stamped(card_md, lines), CARD)


def read_study(reports: Path) -> dict | None:
    """The study stage's study.json (reports/study), which the model card leads with; None without one."""
    path = reports / "study" / "study.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main(cfg) -> dict:
    """Stage entry: LOCO of the configured recipe, the final model's probes, the model card."""
    s = loco_settings(cfg)  # every key checked before anything is read or trained
    from covidxray.networks.model_file import load_model

    t, out = s.train, s.out
    model, meta = load_model(t.models / MODEL_FILE, engine="keras")  # the probes read its layers
    stored, index, classes = imgs.load_curated(t.curated)
    if list(classes) != meta["classes"]:
        raise CovidXrayError(f"the model's classes {meta['classes']} differ from the curated data's {classes}")
    roles = sources.model_roles(meta.get("sources"), t.roles)
    result = loco.run(t.curated, t.splits, s.recipe, s.spec, s.seed, classes)
    cv, test, internal = internal_reports(t.reports, index, classes)
    confusion = t.reports / "plots" / "confusion.csv"
    test_ids = pd.read_csv(confusion, dtype={"image_id": str})["image_id"] if confusion.is_file() else []
    found_probes = run_probes(model, meta, stored, index, roles, set(test_ids), imgs.load_probe(t.curated), s.seed)
    k, ci = s.spec.calibration_k, s.spec.ci
    study = read_study(t.reports)
    log = LogTo(out.tracking_uri, out.experiment, meta.get("mlflow_run_id"), "loco", artifact_path="loco")

    def write(work: Path) -> tuple[dict, str]:
        named = sources.describe({role: per_class for role, per_class in roles.items() if any(per_class.values())})
        names = sorted({n for per_class in roles.values() for some in per_class.values() for n in some})
        data = card.data_lines(load_facts(t.curated), names)  # citation and license of each collection
        card_md = card.model_card(meta, named, result, cv, test, internal, found_probes, k, ci, data, study)
        extra = {"internal_test_per_collection": internal, "probes": found_probes}
        found = write_outputs(work / OUT_DIR, result, extra, card.loco_report(result, k, ci), classes[-1])
        (work / CARD).write_text(card_md)
        timings = {f"loco_{k}": result[k] for k in TIMINGS if k in result}
        return found, log_to_mlflow(work / OUT_DIR, {**found, **timings}, log)

    found, run_id = replace_dir(t.reports, write, by="loco", names=(OUT_DIR, CARD))
    summary = result["summary"]
    registry.add_figures(  # the registered version's description carries its generalization estimate
        meta.get("registered_model"),
        meta.get("registered_version"),
        {
            "LOCO AUC (mean, worst)": f"{fmt(summary['loco_auc_mean'])}, {fmt(summary['loco_auc_worst'])}",
            "LOCO AUC where class is not collection (mean, worst)": (
                f"{fmt(summary['loco_auc_mixed_mean'])}, {fmt(summary['loco_auc_mixed_worst'])}"
            ),
        },
    )
    version = (meta.get("registered_model"), meta.get("registered_version"))
    registry.tag_figures(*version, {k: v for k, v in summary.items() if v is not None})  # comparable columns
    log_card(run_id, (t.reports / CARD).read_text(), meta)
    print(
        f"loco: {len(result['groups'])} held-out group(s): AUC mean {fmt(summary['loco_auc_mean'])}, worst "
        f"{fmt(summary['loco_auc_worst'])}; over the {summary['loco_groups_counted']} group(s) where class is not "
        f"collection (the objective) {fmt(summary['loco_auc_mixed_mean'])}; margin over the shortcut baseline: worst "
        f"{fmt(summary['loco_margin_worst'])}; {result['seconds']:.0f}s; wrote {t.reports}/{OUT_DIR} and "
        f"{t.reports}/{CARD}; MLflow run {run_id}"
    )
    return found
