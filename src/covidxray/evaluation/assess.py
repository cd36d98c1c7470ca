"""Measuring a model on a labelled set: its predictions, the figures with patient-bootstrap
intervals, the confusion matrix and what the figures were computed with, as one result dict
(metrics.json). Writes nothing; evaluation.publish turns a result into a report folder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.evaluation import metrics
from covidxray.networks.inference import probabilities


@dataclass(frozen=True)
class AssessOptions:
    """How a set is measured and shown (settings.assess_options builds it from `evaluate`)."""

    n_resamples: int  # patient bootstrap resamples
    ci: float  # interval level, in (0, 1)
    seed: int
    per_group: int  # Grad-CAM examples per group (TP, FP, FN)
    n_bins: int  # calibration bins
    features: str | None = None  # the feature store's folder (paths.features): a frozen backbone's features


@dataclass(frozen=True)
class Assessment:
    """A measured set: the result dict and the per-image class indices, probabilities, decisions."""

    result: dict
    y: np.ndarray
    probs: np.ndarray
    pred: np.ndarray


def check_labels(labels, classes: list[str]) -> None:
    """Labels the model does not know are an error that lists the known ones."""
    unknown = sorted(set(map(str, labels)) - set(classes))
    if unknown:
        raise CovidXrayError(f"labels unknown to the model: {', '.join(unknown)} (known: {', '.join(classes)})")


def assess(
    model, meta: dict, images: np.ndarray, frame: pd.DataFrame, options: AssessOptions, partition: str, predict=None
):
    """Predict `images` (rows of `frame`: label, patient_id, image_id) and measure them at the
    model's saved threshold: the figures of `partition` with intervals, per class for K > 2.
    predict(model, images, n_classes) -> probabilities (default inference.probabilities)."""
    classes, threshold = meta["classes"], meta["threshold"]
    check_labels(frame["label"].astype(str), classes)
    if len(frame) == 0:
        raise CovidXrayError("no images to assess")
    y = frame["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs = (predict or probabilities)(model, images, len(classes))
    pred = metrics.decide(probs, threshold)
    o = options
    figures = metrics.bootstrap_metrics(y, probs, threshold, frame["patient_id"], o.n_resamples, o.ci, o.seed, o.n_bins)
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
        "resamples": int(o.n_resamples),
        "ci": float(o.ci),
        "unit": "patient",
        "seed": int(o.seed),
        "calibration_bins": int(o.n_bins),
    }
    return Assessment(result, y, probs, pred)
