"""Figures of an assessed set (matplotlib, headless): the DVC plot tables, ROC, precision-recall,
calibration and confusion figures, the Grad-CAM panel, and train's per-fold confusion matrix and
training curves. Each figure says which set it shows, how many images, and its headline figure
with the interval, so a PNG read on its own is not misread.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray.evaluation import metrics


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(matrix: np.ndarray, classes: list[str], title: str, xlabel: str = "predicted"):
    """A labelled confusion-matrix heat map (rows actual, columns predicted) as a matplotlib figure."""
    plt = pyplot()
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * k, 1.4 + 1.1 * k))
    ax.imshow(matrix, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                color="white" if matrix[i, j] > matrix.max() / 2 else "black",
            )
    ax.set(
        xticks=range(k),
        yticks=range(k),
        xticklabels=classes,
        yticklabels=classes,
        xlabel=xlabel,
        ylabel="actual",
    )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def training_curves_figure(history: pd.DataFrame, title: str):
    """Loss, accuracy and AUC per epoch side by side: train (solid) and validation (dashed, where
    there is one), a colour per fold when the history holds several."""
    fig, axes = pyplot().subplots(1, 3, figsize=(12, 3.5))
    groups = list(history.groupby("fold", sort=False)) if "fold" in history else [("", history)]
    for ax, metric in zip(axes, ("loss", "accuracy", "auc")):
        for i, (fold, part) in enumerate(groups):
            name = f"fold {fold} " if len(groups) > 1 else ""
            ax.plot(part["epoch"], part[metric], "-", color=f"C{i}", label=f"{name}train")
            if part[f"val_{metric}"].notna().any():
                ax.plot(part["epoch"], part[f"val_{metric}"], "--", color=f"C{i}", label=f"{name}validation")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
    axes[-1].legend(fontsize="small")
    fig.suptitle(f"{title}: training curves")
    fig.tight_layout()
    return fig


# -- an assessed set --------------------------------------------------------------------------


def write_plots(plots_dir: Path, frame, y, probs, pred, classes, n_bins: int) -> dict:
    """The DVC plot tables (covid vs the rest): roc.csv, precision_recall.csv, calibration.csv,
    and confusion.csv (one row per image: actual, predicted)."""
    tables = metrics.curves(y == len(classes) - 1, probs[:, -1], n_bins)
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


def _interval(figures: dict, key: str, label: str) -> str:
    """'ROC AUC 0.761 [0.741, 0.780]' from an assessed set's figures (n/a where undefined)."""
    value, lo, hi = (figures.get(k) for k in (key, f"{key}_ci_low", f"{key}_ci_high"))
    if value is None:
        return f"{label} n/a"
    return f"{label} {value:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def _save(plt, fig, path: Path) -> None:
    """tight_layout, then a canvas grown to every artist (bbox_inches="tight"): a title wider than
    its small figure is saved whole, never clipped at the edge."""
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def write_figures(
    fig_dir: Path, y, probs, pred, classes, threshold: float, tables: dict, n_bins: int, figures: dict, about: str
) -> None:
    """roc.png, precision_recall.png (one-vs-rest per class, covid's operating point marked),
    calibration.png (covid's reliability diagram, images per bin) and confusion.png. `figures`: the
    set's headline figures with intervals (titles quote AUC and PR AUC); `about`: the set and its
    size, e.g. "external set, 2400 images"."""
    plt = pyplot()
    k = len(classes)
    shown = [k - 1] if k == 2 else list(range(k))
    covid = y == k - 1
    tp, fp = int(np.sum(covid & (pred == k - 1))), int(np.sum(~covid & (pred == k - 1)))
    n_pos, n_neg = int(covid.sum()), int((~covid).sum())
    point = (fp / n_neg if n_neg else np.nan, tp / n_pos if n_pos else np.nan, tp / (tp + fp) if tp + fp else np.nan)

    for name, xlab, ylab, key, label in (
        ("roc", "false positive rate", "true positive rate", "auc", "ROC AUC"),
        ("precision_recall", "recall", "precision", "pr_auc", "PR AUC"),
    ):
        fig, ax = plt.subplots(figsize=(4.8, 5.0))
        for c in shown:
            curve = metrics.curves(y == c, probs[:, c])[name]
            if len(curve):
                xs, ys = (curve["fpr"], curve["tpr"]) if name == "roc" else (curve["recall"], curve["precision"])
                ax.plot(xs, ys, label=f"{classes[c]} vs rest", drawstyle="default" if name == "roc" else "steps-post")
        if name == "roc":
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
            ax.plot(point[0], point[1], "ko", label=f"threshold {threshold:.3f}")
        else:
            ax.plot(point[1], point[2], "ko", label=f"threshold {threshold:.3f}")
        ax.set(xlabel=xlab, ylabel=ylab, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        ax.set_title(f"{about}\n{_interval(figures, key, label)} ({classes[-1]} vs rest)", fontsize=9)
        ax.legend(loc="lower right" if name == "roc" else "lower left", fontsize=8)
        _save(plt, fig, fig_dir / f"{name}.png")

    cal = tables["calibration"]
    fig, ax = plt.subplots(figsize=(4.8, 5.0))
    counts = ax.twinx()
    counts.bar(cal["mean_predicted"], cal["count"], width=0.6 / max(1, n_bins), color="grey", alpha=0.3)
    counts.set_ylabel("images per bin (bars)", fontsize=8)
    ax.set_zorder(counts.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    ax.plot(cal["mean_predicted"], cal["fraction_positive"], "o-", label=classes[-1])
    for x, f, n in zip(cal["mean_predicted"], cal["fraction_positive"], cal["count"]):
        ax.annotate(str(int(n)), (x, f), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    ax.set(xlabel=f"mean predicted p({classes[-1]})", ylabel="fraction positive", xlim=(0, 1), ylim=(0, 1.05))
    ax.set_title(f"{about}\ncalibration, {n_bins} bins; {_interval(figures, 'ece', 'ECE')}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    _save(plt, fig, fig_dir / "calibration.png")

    matrix = np.array([[np.sum((y == i) & (pred == j)) for j in range(k)] for i in range(k)])
    fig = confusion_figure(matrix, classes, f"{textwrap.fill(about, 32)}\nthreshold {threshold:.3f}")
    _save(plt, fig, fig_dir / "confusion.png")


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
    return gradcam_panel(groups, path, per_row=max(1, int(per_group)), score=f"p({classes[-1]})")


def gradcam_single(image: np.ndarray, cam: np.ndarray, title: str, score: str, path: Path) -> Path:
    """One image's Grad-CAM overlay as a PNG with its `title` (the file, its score and the label
    called) and a colour bar saying what the heat map's colours mean (`covidxray predict --gradcam`)."""
    from covidxray.evaluation.gradcam import overlay

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.imshow(overlay(image, cam))
    ax.axis("off")
    ax.set_title(title, fontsize=8)
    bar = fig.colorbar(plt.cm.ScalarMappable(cmap="jet", norm=plt.Normalize(0, 1)), ax=ax, fraction=0.046, pad=0.03)
    bar.set_label(f"Grad-CAM of {score} (share of its maximum)", fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def gradcam_panel(groups: dict[str, list[tuple[np.ndarray, np.ndarray, str]]], path: Path, per_row: int, score: str):
    """One PNG with a row per group (e.g. true positives, false positives, false negatives) of
    (image, cam, caption) overlays, the caption giving the image's `score`, and a colour bar for
    the heat map; an empty group says so."""
    from covidxray.evaluation.gradcam import overlay

    plt = pyplot()
    rows, cols = max(1, len(groups)), max(1, int(per_row))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.8, 2.8 * rows), squeeze=False)
    for r, (name, items) in enumerate(groups.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(items):
                image, cam, caption = items[c]
                ax.imshow(overlay(image, cam))
                ax.set_title(caption, fontsize=7)
            elif c == 0:
                ax.text(0.5, 0.5, "none in this set", ha="center", va="center", fontsize=8)
        axes[r][0].text(
            -0.08, 0.5, name, transform=axes[r][0].transAxes, rotation=90, ha="right", va="center", fontsize=9
        )
    scale = plt.cm.ScalarMappable(cmap="jet", norm=plt.Normalize(0, 1))
    bar = fig.colorbar(scale, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
    bar.set_label(f"Grad-CAM of {score} (share of the image's maximum)", fontsize=8)
    fig.suptitle(f"Grad-CAM for {score} (red: regions that raise it; score under each image)", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path
