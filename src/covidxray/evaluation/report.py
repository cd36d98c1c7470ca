"""The markdown report of an assessed set (report.md): shortcut warnings first, then the results
(the set's figures with patient-bootstrap intervals and the figures' files), then what produced
them (model, data, cross-validation, the configuration collapsed in a <details> section) and the
limits. One per set (internal test, a hospital's set); the project's model card, which leads with
the leave-one-collection-out figures, is card.py's.
"""

from __future__ import annotations

import json
import math
import re

import pandas as pd

METRIC_NAMES = {
    "accuracy": "accuracy",
    "sensitivity": "sensitivity (recall)",
    "specificity": "specificity",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "f1": "F1",
    "auc": "ROC AUC",
    "pr_auc": "PR AUC",
    "brier": "Brier score",
    "ece": "expected calibration error",
}


def fmt(value) -> str:
    """A figure as the reports print it: three decimals, n/a where undefined."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def headline(figures: dict) -> str:
    """One line of a set's headline figures: AUC with its interval, sensitivity, specificity."""
    f = figures
    return (
        f"AUC {fmt(f['auc'])} [{fmt(f['auc_ci_low'])}, {fmt(f['auc_ci_high'])}], "
        f"sensitivity {fmt(f['sensitivity'])}, specificity {fmt(f['specificity'])}"
    )


def metrics_table(figures: dict, ci: float) -> list[str]:
    """Markdown rows: metric | value | CI (and how many resamples defined it, if not all)."""
    lines = [f"| metric | value | {ci:.0%} CI (patient bootstrap) |", "|---|---|---|"]
    for key, name in METRIC_NAMES.items():
        if key not in figures:
            continue
        n_ok = figures.get(key + "_n_resamples")
        note = f" (defined in {n_ok} resamples; the others lacked a class it needs)" if n_ok is not None else ""
        lines.append(
            f"| {name} | {fmt(figures[key])} | "
            f"{fmt(figures.get(key + '_ci_low'))} - {fmt(figures.get(key + '_ci_high'))}{note} |"
        )
    return lines


def cv_summary(cv_metrics: dict | None) -> list[str]:
    """Markdown lines for the cross-validation metrics (reports/cv/metrics.json): mean ± std where
    the file gives them (X_mean/X_std or {X: {mean, std}}), else its values as they are."""
    if not cv_metrics:
        return ["(no cross-validation metrics found)"]
    flat = pd.json_normalize(cv_metrics, sep=".").iloc[0].to_dict()
    rows, seen = [], set()
    for key, value in flat.items():
        if re.search(r"seconds|wall_s|images_per_s|epoch", key):
            continue
        for suffix, sep in (("mean", "_"), ("mean", ".")):
            if key.endswith(sep + suffix):
                base = key[: -len(sep + suffix)]
                std = flat.get(f"{base}{sep}std")
                rows.append(f"| {base} | {fmt(value)} ± {fmt(std)} |")
                seen.update({key, f"{base}{sep}std"})
    for key, value in flat.items():
        if key in seen or re.search(r"seconds|wall_s|images_per_s|epoch", key):
            continue  # timings and epochs: in MLflow, not the model card
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append(f"| {key} | {fmt(float(value)) if isinstance(value, float) else value} |")
    if not rows:
        return ["```", json.dumps(cv_metrics, indent=2)[:3000], "```"]
    return ["| metric | mean ± std over folds (or value) |", "|---|---|", *rows]


def composition(index: pd.DataFrame, splits: pd.DataFrame | None) -> list[str]:
    """Markdown tables: images (patients) per class and partition, images per class and source,
    and age/sex where the index records them."""
    df = index.copy()
    df["partition"] = df["image_id"].map(splits.set_index("image_id")["partition"]) if splits is not None else "all"
    lines = ["| class | " + " | ".join(sorted(df["partition"].astype(str).unique())) + " | total |", ""]
    parts = sorted(df["partition"].astype(str).unique())
    lines[1] = "|---" * (len(parts) + 2) + "|"
    for label, rows in df.groupby("label", sort=False):
        cells = [
            f"{(rows.partition == p).sum()} ({rows.loc[rows.partition == p, 'patient_id'].nunique()})" for p in parts
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(rows)} ({rows.patient_id.nunique()}) |")
    lines += ["", "Images (patients) per class and partition.", ""]
    for col in ("source", "sex", "view"):
        if col in df.columns:
            table = pd.crosstab(df[col].fillna("unknown"), df["label"])
            lines += [
                f"| {col} | " + " | ".join(map(str, table.columns)) + " |",
                "|---" * (len(table.columns) + 1) + "|",
            ]
            lines += [f"| {i} | " + " | ".join(str(v) for v in row) + " |" for i, row in table.iterrows()]
            lines.append("")
    if "age" in df.columns:
        ages = pd.to_numeric(df["age"], errors="coerce")
        cells = []
        for label, a in ages.groupby(df["label"], sort=False):
            known = a.dropna()
            cells.append(
                f"{label}: "
                + (
                    f"median {known.median():.0f} (IQR {known.quantile(0.25):.0f}-"
                    f"{known.quantile(0.75):.0f}), {len(known)}/{len(a)} known"
                    if len(known)
                    else f"unknown for all {len(a)}"
                )
            )
        lines += ["Age per class: " + "; ".join(cells) + ".", ""]
    return lines


LIMITS = [
    "## Limits",
    "",
    "- A research tool, not a diagnostic device: not validated prospectively, not cleared by any regulator.",
    "- Shortcut risk: the classes come from different sources, so hospital, scanner, file format, image "
    "geometry, patient age (Kermany's normal and pneumonia images are of children) and text markers differ "
    "between classes; a model can separate the sources without seeing disease. Check the audit warnings "
    "above and the Grad-CAM maps (attention outside the lungs is a red flag).",
    "- The held-out set comes from the same sources as the training data: its figures overstate "
    "performance elsewhere. See the leave-one-collection-out figures (reports/model_card.md, "
    "reports/loco/report.md) and use `covidxray validate` on a hospital's own, independently labelled set.",
    "- Small sample: the intervals are wide; the bootstrap resamples patients, not images.",
    "- Calibration was not adjusted: probabilities are scores, not risks.",
    "",
]
FIGURES = (
    ("roc", "ROC curve"),
    ("precision_recall", "precision-recall curve"),
    ("calibration", "calibration"),
    ("confusion", "confusion matrix"),
    ("gradcam", "Grad-CAM: true positives, false positives, false negatives"),
)


def _warning_lines(audit: dict) -> list[str]:
    """The curation audit's shortcut warnings, first in the card."""
    warnings = [s.get("warning", str(s)) if isinstance(s, dict) else str(s) for s in audit.get("shortcuts", [])]
    if not warnings:
        return []
    lines = ["## ⚠ Shortcut warnings (from the curation audit)", ""]
    for w in warnings:
        lines += [f"> **WARNING**: {w}", ""]
    return lines + ["High test figures may measure these shortcuts rather than disease.", ""]


def _model_lines(result: dict, meta: dict) -> list[str]:
    """The model, its input, its threshold and where it is tracked."""
    classes = meta["classes"]
    lines = [
        "## Model",
        "",
        f"- model: {meta.get('model', meta.get('model_name', 'n/a'))}; classes: {', '.join(classes)} "
        f"(positive: {classes[-1]})",
        f"- input: {meta['image_size']} px grayscale, resize policy `{meta['resize']}`",
        f"- decision threshold: **{result['threshold']:.4f}** on p({classes[-1]}) "
        f"({result.get('threshold_method') or 'method n/a'}), chosen on the out-of-fold CV predictions, "
        "never on the held-out data",
    ]
    if "threshold_oof" in result:
        lines.append(f"- re-derived from reports/cv/oof.csv: {result['threshold_oof']:.4f}")
    names = (
        ("mlflow_run_id", "MLflow run"),
        ("registered_model", "registered model"),
        ("registered_version", "version"),
        ("model_uri", "model URI"),
    )
    lines += [f"- {name}: `{meta[key]}`" for key, name in names if meta.get(key) is not None]
    return lines + [""]


def _figures_lines(result: dict, classes: list[str], partition: str, report_text: str) -> list[str]:
    """The held-out figures: metrics with intervals, per class, classification report, confusion."""
    ci = result["bootstrap"]["ci"]
    n_img, n_pat = result[f"n_{partition}_images"], result[f"n_{partition}_patients"]
    lines = [
        f"## {partition.capitalize()} set: {n_img} images, {n_pat} patients",
        "",
        f"Covid vs the rest at the saved threshold; intervals from {result['bootstrap']['resamples']} "
        "bootstrap resamples of patients (all images of a drawn patient together).",
        "",
        *metrics_table(result[partition], ci),
        "",
    ]
    if f"{partition}_macro" in result:
        lines += ["### Per class (one-vs-rest) and macro average", ""]
        for name, figs in [*result[f"{partition}_per_class"].items(), ("macro", result[f"{partition}_macro"])]:
            lines += [f"**{name}**", "", *metrics_table(figs, ci), ""]
    lines += ["### Classification report", "", "```", report_text.rstrip(), "```", ""]
    lines += ["### Confusion matrix (rows: actual, columns: predicted)", ""]
    lines += ["| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    return lines + [f"| {a} | " + " | ".join(str(result["confusion"][a][p]) for p in classes) + " |" for a in classes]


def set_report(result: dict, meta: dict, report_text: str, partition: str, context: dict) -> str:
    """report.md of one assessed set: warnings first, then the results (the set's figures and
    their files), then the model, data, CV and the configuration (collapsed), limits.
    `report_text`: sklearn's classification report of the set."""
    audit = context.get("audit") or {}
    lines = [
        f"# {context.get('title', 'COVID-19 chest X-ray classifier: assessment report')}",
        "",
        *_warning_lines(audit),
    ]
    lines += ["**A research tool, not a diagnostic device.** Do not use it for clinical decisions.", ""]
    if "auc" in result[partition]:
        lines += [f"**{partition.capitalize()} set:** {headline(result[partition])}.", ""]
    lines += _figures_lines(result, meta["classes"], partition, report_text)
    lines += [
        "",
        "## Figures",
        "",
        *[line for name, caption in FIGURES for line in (f"![{caption}](figures/{name}.png)", "")],
    ]
    lines += _model_lines(result, meta)
    if context.get("data_lines"):
        lines += ["## Data", "", *context["data_lines"], ""]
    if audit.get("notes"):
        lines += ["Audit notes:", "", *[f"- {n}" for n in audit["notes"]], ""]
    if "cv_metrics" in context:
        lines += ["## Cross-validation (patient-grouped folds)", "", *cv_summary(context["cv_metrics"]), ""]
    if context.get("config_yaml"):
        lines += ["## Configuration", "", "<details><summary>The composed configuration (YAML)</summary>", ""]
        lines += ["```yaml", context["config_yaml"].rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines + LIMITS)
