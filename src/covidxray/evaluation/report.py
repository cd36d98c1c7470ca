"""Measuring a model on a labelled set, and its report: metrics with patient-bootstrap intervals,
DVC plot tables, figures (ROC, PR, calibration, confusion, Grad-CAM) and a markdown model card.

Shared by the evaluate stage (the test partition), the external stage (a collection never seen in
training) and `covidxray validate` (a hospital's own set), so all of them report the same figures.
"""

from __future__ import annotations

import json
import math
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.evaluation import metrics as M
from covidxray.modeling.models import predict_probs

OUTPUTS = ("metrics.json", "plots", "figures", "report.md")
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


# -- measuring -------------------------------------------------------------------------------------


def assess(
    model,
    meta: dict,
    images: np.ndarray,
    frame: pd.DataFrame,
    out_dir: Path,
    *,
    n_resamples: int,
    ci: float,
    seed: int,
    per_group: int,
    n_bins: int = 10,
    partition: str = "test",
    context: dict | None = None,
) -> dict:
    """Predict `images` (rows of `frame`: label, patient_id, image_id), then write metrics.json,
    plots/, figures/ (incl. Grad-CAM) and report.md into out_dir. Returns the metrics dict."""
    classes, threshold = meta["classes"], meta["threshold"]
    unknown = sorted(set(frame["label"].astype(str)) - set(classes))
    if unknown:
        raise CovidXrayError(f"labels unknown to the model: {', '.join(unknown)} (known: {', '.join(classes)})")
    if len(frame) == 0:
        raise CovidXrayError("no images to assess")
    y = frame["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs = predict_probs(model, images, len(classes))
    pred = M.decide(probs, threshold)
    figures = M.bootstrap_metrics(y, probs, threshold, frame["patient_id"], n_resamples, ci, seed, n_bins)
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)

    k = len(classes)
    result = {
        "threshold": threshold,
        "threshold_method": meta.get("threshold_method"),
        f"n_{partition}_images": int(len(frame)),
        f"n_{partition}_patients": int(frame["patient_id"].nunique()),
        f"n_{partition}_{classes[-1]}": int((y == k - 1).sum()),
        partition: {key: v for key, v in figures.items() if not isinstance(v, dict)},
    }
    if k > 2:
        result[f"{partition}_per_class"] = {classes[c]: v for c, v in figures["per_class"].items()}
        result[f"{partition}_macro"] = figures["macro"]
    result["confusion"] = {
        a: {p: int(((y == i) & (pred == j)).sum()) for j, p in enumerate(classes)} for i, a in enumerate(classes)
    }
    result["bootstrap"] = {
        "resamples": int(n_resamples),
        "ci": float(ci),
        "unit": "patient",
        "seed": int(seed),
        "calibration_bins": int(n_bins),
    }
    if context and context.get("extra_metrics"):
        result.update(context["extra_metrics"])

    tables = write_plots(out_dir / "plots", frame, y, probs, pred, classes, n_bins)
    write_figures(out_dir / "figures", y, probs, pred, classes, threshold, tables, n_bins)
    gradcam_figure(model, images, frame, y, probs, pred, classes, per_group, seed, out_dir / "figures" / "gradcam.png")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    from sklearn.metrics import classification_report

    text = classification_report(y, pred, labels=list(range(k)), target_names=classes, digits=3, zero_division=0)
    (out_dir / "report.md").write_text(model_card(result, meta, text, partition, context or {}))
    return result


def write_plots(plots_dir: Path, frame, y, probs, pred, classes, n_bins: int) -> dict:
    """The DVC plot tables (covid vs the rest): roc.csv, precision_recall.csv, calibration.csv,
    and confusion.csv (one row per image: actual, predicted)."""
    tables = M.curves(y == len(classes) - 1, probs[:, -1], n_bins)
    for name, table in tables.items():
        table.to_csv(plots_dir / f"{name}.csv", index=False)
    pd.DataFrame(
        {
            "image_id": frame["image_id"].astype(str).to_numpy(),
            "actual": np.asarray(classes)[y],
            "predicted": np.asarray(classes)[pred],
        }
    ).to_csv(plots_dir / "confusion.csv", index=False)
    return tables


def write_figures(fig_dir: Path, y, probs, pred, classes, threshold: float, tables: dict, n_bins: int) -> None:
    """roc.png, precision_recall.png (one-vs-rest per class, covid's operating point marked),
    calibration.png (covid's reliability diagram) and confusion.png."""
    plt = M.pyplot()
    k = len(classes)
    shown = [k - 1] if k == 2 else list(range(k))
    covid = y == k - 1
    tp, fp = int(np.sum(covid & (pred == k - 1))), int(np.sum(~covid & (pred == k - 1)))
    n_pos, n_neg = int(covid.sum()), int((~covid).sum())
    point = (fp / n_neg if n_neg else np.nan, tp / n_pos if n_pos else np.nan, tp / (tp + fp) if tp + fp else np.nan)

    for name, xlab, ylab in (
        ("roc", "false positive rate", "true positive rate"),
        ("precision_recall", "recall", "precision"),
    ):
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for c in shown:
            curve = M.curves(y == c, probs[:, c], n_bins)[name]
            if len(curve):
                xs, ys = (curve["fpr"], curve["tpr"]) if name == "roc" else (curve["recall"], curve["precision"])
                ax.plot(xs, ys, label=f"{classes[c]} vs rest", drawstyle="default" if name == "roc" else "steps-post")
        if name == "roc":
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
            ax.plot(point[0], point[1], "ko", label=f"threshold {threshold:.3f}")
        else:
            ax.plot(point[1], point[2], "ko", label=f"threshold {threshold:.3f}")
        ax.set(xlabel=xlab, ylabel=ylab, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        ax.legend(loc="lower right" if name == "roc" else "lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(fig_dir / f"{name}.png", dpi=110)
        plt.close(fig)

    cal = tables["calibration"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    ax.plot(cal["mean_predicted"], cal["fraction_positive"], "o-", label=classes[-1])
    ax.set(
        xlabel=f"mean predicted p({classes[-1]})",
        ylabel="fraction positive",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"calibration ({n_bins} bins)",
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "calibration.png", dpi=110)
    plt.close(fig)

    matrix = np.array([[np.sum((y == i) & (pred == j)) for j in range(k)] for i in range(k)])
    fig = M.confusion_figure(matrix, classes, f"threshold {threshold:.3f}")
    fig.savefig(fig_dir / "confusion.png", dpi=110)
    plt.close(fig)


def gradcam_sample(y, pred, positive: int, per_group: int, seed: int) -> dict[str, np.ndarray]:
    """Row numbers of up to per_group true positives, false positives and false negatives
    (for the positive class), drawn at random by seed, each sorted."""
    rng = np.random.default_rng(seed)
    masks = {
        "true positives": (y == positive) & (pred == positive),
        "false positives": (y != positive) & (pred == positive),
        "false negatives": (y == positive) & (pred != positive),
    }
    out = {}
    for name, mask in masks.items():
        rows = np.flatnonzero(mask)
        out[name] = np.sort(rng.choice(rows, size=min(per_group, len(rows)), replace=False)) if len(rows) else rows
    return out


def gradcam_figure(model, images, frame, y, probs, pred, classes, per_group: int, seed: int, path: Path) -> Path:
    """figures/gradcam.png: Grad-CAM of the covid score for sampled TP, FP and FN images."""
    from covidxray.evaluation import gradcam

    sample = gradcam_sample(y, pred, len(classes) - 1, int(per_group), seed)
    rows = np.concatenate(list(sample.values())).astype(int)
    cams = gradcam.gradcam(model, np.asarray(images)[rows], class_index=-1) if len(rows) else []
    by_row = dict(zip(rows.tolist(), cams))
    ids = frame["image_id"].astype(str).to_numpy()
    groups = {
        name: [(images[r], by_row[r], f"{ids[r][:28]}\np({classes[-1]})={probs[r, -1]:.2f}") for r in chosen]
        for name, chosen in sample.items()
    }
    return gradcam.figure(groups, path, per_row=max(1, int(per_group)))


# -- the model card ---------------------------------------------------------------------------------


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


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
    "performance elsewhere. See the external set's figures (reports/model_card.md) and use "
    "`covidxray validate` on a hospital's own, independently labelled set.",
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


def model_card(result: dict, meta: dict, report_text: str, partition: str, context: dict) -> str:
    """report.md: warnings first, then data, config, CV and held-out figures, figures, limits."""
    audit = context.get("audit") or {}
    lines = [f"# {context.get('title', 'COVID-19 chest X-ray classifier: model card')}", "", *_warning_lines(audit)]
    lines += ["**A research tool, not a diagnostic device.** Do not use it for clinical decisions.", ""]
    lines += _model_lines(result, meta)
    if context.get("data_lines"):
        lines += ["## Data", "", *context["data_lines"], ""]
    if audit.get("notes"):
        lines += ["Audit notes:", "", *[f"- {n}" for n in audit["notes"]], ""]
    if context.get("config_yaml"):
        lines += ["## Configuration", "", "```yaml", context["config_yaml"].rstrip(), "```", ""]
    if "cv_metrics" in context:
        lines += ["## Cross-validation (patient-grouped folds)", "", *cv_summary(context["cv_metrics"]), ""]
    lines += _figures_lines(result, meta["classes"], partition, report_text)
    lines += [
        "",
        "## Figures",
        "",
        *[line for name, caption in FIGURES for line in (f"![{caption}](figures/{name}.png)", "")],
    ]
    return "\n".join(lines + LIMITS)


# -- MLflow ----------------------------------------------------------------------------------------


def log_to_mlflow(
    out_dir: Path,
    result: dict,
    tracking_uri: str | None,
    experiment: str,
    run_id: str | None = None,
    tags: dict | None = None,
    run_name: str | None = None,
    artifact_path: str = "evaluation",
    metric_prefix: str = "",
) -> str:
    """Log the metrics (names prefixed with `metric_prefix` where they do not start with it) and
    every file of out_dir to run_id (resumed), or to a new run when run_id is None or not in this
    store. Returns the run id used."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from covidxray.infra import tracking

    tracking.configure(tracking_uri, experiment)
    if run_id:
        try:
            mlflow.get_run(run_id)
        except MlflowException:
            print(f"warning: MLflow run {run_id} (model.json) not in this store; logging to a new run", file=sys.stderr)
            tags = {**(tags or {}), "model_run_id": run_id}
            run_id = None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        if tags:
            mlflow.set_tags(tags)
        mlflow.log_metrics(
            {
                (k if k.startswith(metric_prefix) else metric_prefix + k): v
                for k, v in M.finite_metrics(result).items()
                if not k.startswith("bootstrap_")
            }
        )
        mlflow.log_artifacts(str(out_dir), artifact_path=artifact_path)
        return run.info.run_id


# -- installing finished outputs ------------------------------------------------------------------


def install(tmp_dir: Path, dest: Path, names=OUTPUTS) -> None:
    """Move the finished outputs from tmp_dir into dest, replacing only those names (the old
    ones are set aside first and put back if a move fails)."""
    dest.mkdir(parents=True, exist_ok=True)
    old = Path(tempfile.mkdtemp(prefix=".old-", dir=tmp_dir))
    moved: list[str] = []
    try:
        for name in names:
            if (dest / name).exists():
                (dest / name).rename(old / name)
        for name in names:
            (tmp_dir / name).rename(dest / name)
            moved.append(name)
    except OSError:
        for name in moved:
            (dest / name).rename(tmp_dir / name)
        for name in names:
            if (old / name).exists():
                (old / name).rename(dest / name)
        raise
