"""Metrics: decision threshold, classification figures and patient-level bootstrap intervals.

Every figure is computed as a weighted statistic over images, so one code path gives the point
estimate (all weights 1) and the bootstrap (weights = how often each image's patient was drawn,
B resamples at once, vectorized). Resampling patients, not images, keeps a patient's correlated
images together, as the split does. The positive class (covid) is the last class; an image is
called positive iff its score >= threshold.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.infra.outputs import significant
from covidxray.networks.inference import decide  # noqa: F401 - the decision rule, measured here

THRESHOLD_METHODS = ("youden", "sensitivity")
# Figures of a binary (or one-vs-rest) decision; "accuracy" is added by classification_metrics.
BINARY_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "auc", "pr_auc", "brier", "ece")
# What a training run reports per CV fold (as cv_<m>_mean/_std) and on its out-of-fold predictions.
FOLD_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "loss", "best_epoch", "wall_s", "images_per_s")
OOF_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "pr_auc", "brier", "ece")


def headline(n_images: int, auc, *, auc_low=None, auc_high=None, sensitivity=None, specificity=None, **extra) -> dict:
    """The figures a metrics file for `dvc metrics show` holds, under keys shared by every stage's
    headline.json so that the table is one row per stage and at most 120 columns wide: n, auc (with
    auc_lo/auc_hi, its interval, or auc_sd, the spread over CV folds), sens and spec at the model's
    threshold; `extra` adds a stage's own (short keys). Missing values are left out. The threshold
    itself is in models/model.json and the metrics.json files (the table has no column left for it
    beside the study's row)."""
    found = {
        "n": n_images,
        "auc": auc,
        "auc_lo": auc_low,
        "auc_hi": auc_high,
        **{k: v for k, v in extra.items() if k == "auc_sd"},
        "sens": sensitivity,
        "spec": specificity,
        **{k: v for k, v in extra.items() if k != "auc_sd"},
    }
    return {k: (significant(float(v)) if k != "n" else int(v)) for k, v in found.items() if v is not None}


def training_metric_names() -> tuple[str, ...]:
    """The metrics a training run reports (metrics.json, the parent MLflow run, sweep objectives)."""
    names = [f"cv_{m}_{s}" for m in FOLD_METRICS for s in ("mean", "std")]
    return tuple(names + [f"oof_{m}" for m in OOF_METRICS] + ["threshold"])


# -- threshold ---------------------------------------------------------------------------------


def choose_threshold(
    y_true, scores, method: str = "youden", target_sensitivity: float = 0.95, prefer: float | None = None
) -> float:
    """The decision threshold on scores (call positive iff score >= threshold), chosen on
    out-of-fold predictions: max Youden's J (TPR - FPR), or the highest threshold reaching
    target_sensitivity in (0, 1] (screening). Never call it on test rows. The method and target
    are checked by settings (train.threshold, train.target_sensitivity).

    Youden's J often ties on few images (a site's calibration set): without `prefer` the highest
    tied threshold wins; with `prefer` (the threshold in use, e.g. the transferred one) it is kept
    where it reaches the maximum too, else the tied threshold nearest to it wins."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if len(y) != len(s):
        raise CovidXrayError(f"threshold: {len(y)} labels but {len(s)} scores")
    if not np.isfinite(s).all():
        raise CovidXrayError("threshold: scores contain NaN or infinity")
    if set(np.unique(y)) != {0, 1}:
        raise CovidXrayError("threshold: the predictions need both positive and negative cases")
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # drop sklearn's +inf start
    if method == "youden":
        j = tpr - fpr
        tied = np.flatnonzero(j >= j.max() - 1e-12)  # first: the highest threshold (fewest false alarms)
        if prefer is None:
            k = int(tied[0])
        else:
            called = s >= prefer
            if called[y == 1].mean() - called[y == 0].mean() >= j.max() - 1e-12:
                return float(prefer)
            k = int(tied[np.argmin(np.abs(thresholds[tied] - prefer))])
    elif method == "sensitivity":
        k = int(np.argmax(tpr >= float(target_sensitivity) - 1e-12))  # tpr is non-decreasing as the threshold falls
    else:
        raise ValueError(f"unknown threshold method {method!r} (one of {', '.join(THRESHOLD_METHODS)})")
    return float(thresholds[k])


def threshold_rule(method: str, target_sensitivity: float):
    """choose_threshold with a configured method, as the recipe takes it: rule(positive, scores)."""
    return lambda positive, scores: choose_threshold(positive, scores, method, target_sensitivity)


# -- weighted statistics, vectorized over resamples ----------------------------------------------


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den == 0 (a figure undefined on that resample)."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=float), np.asarray(den, dtype=float))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _ranking_metrics(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted ROC AUC (ties count half) and average precision (sklearn's step-wise PR AUC),
    one per row of w (B, N); NaN on a row lacking either class."""
    order = np.argsort(-s, kind="mergesort")  # descending score
    s_sorted, y_sorted, w_sorted = s[order], y[order].astype(float), w[:, order]
    # the last position of each run of equal scores: thresholds sit between distinct values
    ends = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s_sorted) - 1]
    tp = np.cumsum(w_sorted * y_sorted, axis=1)[:, ends]
    fp = np.cumsum(w_sorted * (1.0 - y_sorted), axis=1)[:, ends]
    pos, neg = tp[:, -1:], fp[:, -1:]
    d_tp = np.diff(tp, axis=1, prepend=0.0)
    d_fp = np.diff(fp, axis=1, prepend=0.0)
    # AUC: each positive beats the negatives ranked below it, and half of those tied with it
    neg_below = neg - fp
    auc = _div(np.sum(d_tp * (neg_below + 0.5 * d_fp), axis=1), (pos * neg)[:, 0])
    precision = np.nan_to_num(_div(tp, tp + fp))
    ap = _div(np.sum(d_tp * precision, axis=1), pos[:, 0])
    return auc, ap


def calibration_bins(scores: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """The equal-width probability bin (0..n_bins-1) of each score; 1.0 falls in the last bin."""
    return np.clip((np.asarray(scores, dtype=float) * n_bins).astype(int), 0, n_bins - 1)


def weighted_binary_metrics(y, scores, pred, weights, n_bins: int = 10) -> dict[str, np.ndarray]:
    """The BINARY_METRICS of one positive class for each row of weights (B, N): y and pred are
    0/1 per image, scores the positive-class probability. ECE uses n_bins equal-width bins."""
    y = np.asarray(y).astype(float).ravel()
    pred = np.asarray(pred).astype(float).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    total = w.sum(axis=1)
    tp = w @ (y * pred)
    fn = w @ (y * (1 - pred))
    fp = w @ ((1 - y) * pred)
    tn = w @ ((1 - y) * (1 - pred))
    auc, ap = _ranking_metrics(y, s, w)
    onehot = np.eye(n_bins)[calibration_bins(s, n_bins)]  # (N, n_bins)
    gap = (w * (y - s)) @ onehot  # per bin: sum of w * (outcome - predicted)
    return {
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "auc": auc,
        "pr_auc": ap,
        "brier": _div(w @ (s - y) ** 2, total),
        "ece": _div(np.abs(gap).sum(axis=1), total),
    }


def classification_metrics(y_true, probs, threshold: float, weights=None, n_bins: int = 10) -> dict:
    """All figures for class indices y_true (N,) and softmax outputs probs (N, K), covid last.

    Returns {"accuracy", covid's BINARY_METRICS..., and for K > 2 "per_class": {k: {...}},
    "macro": {...}}, each value an array over the rows of weights (default: one row of ones).
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    probs = np.asarray(probs, dtype=float)
    n, k = probs.shape
    w = np.ones((1, n)) if weights is None else np.atleast_2d(np.asarray(weights, dtype=float))
    pred = decide(probs, threshold)
    out = {"accuracy": _div(w @ (pred == y_true).astype(float), w.sum(axis=1))}
    out.update(weighted_binary_metrics(y_true == k - 1, probs[:, -1], pred == k - 1, w, n_bins))
    if k > 2:
        per_class = {c: weighted_binary_metrics(y_true == c, probs[:, c], pred == c, w, n_bins) for c in range(k)}
        out["per_class"] = per_class
        out["macro"] = {m: np.mean([per_class[c][m] for c in range(k)], axis=0) for m in BINARY_METRICS}
    return out


# -- patient-level bootstrap ----------------------------------------------------------------------


def patient_bootstrap_weights(patient_ids, n_resamples: int, seed: int = 0) -> np.ndarray:
    """(B, N) weights: in each resample, patients are drawn with replacement and every image of
    a drawn patient counts once per draw, so a patient's images move as one unit."""
    codes, uniques = pd.factorize(pd.Series(patient_ids).astype(str))
    n_patients = len(uniques)
    if n_patients == 0:
        raise CovidXrayError("bootstrap: no patients")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_patients, size=(int(n_resamples), n_patients))
    flat = (np.arange(int(n_resamples))[:, None] * n_patients + draws).ravel()
    counts = np.bincount(flat, minlength=int(n_resamples) * n_patients).reshape(-1, n_patients)
    return counts[:, codes].astype(float)


def _interval(values: np.ndarray, ci: float) -> tuple[float, float, int]:
    """Percentile interval of the defined (non-NaN) resample values, and how many there were."""
    values = np.asarray(values, dtype=float)
    ok = values[np.isfinite(values)]
    if len(ok) == 0:
        return float("nan"), float("nan"), 0
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(ok, [alpha, 1.0 - alpha])
    return float(lo), float(hi), int(len(ok))


def _flatten(point: dict, boot: dict, ci: float) -> dict:
    """{m: value, m_ci_low, m_ci_high} from matching point and bootstrap dicts (nested kept)."""
    out: dict = {}
    for name, value in point.items():
        if isinstance(value, dict):
            out[name] = _flatten(value, boot[name], ci)
            continue
        lo, hi, n_ok = _interval(boot[name], ci)
        out[name] = number_or_none(value[0])
        out[f"{name}_ci_low"] = number_or_none(lo)
        out[f"{name}_ci_high"] = number_or_none(hi)
        if n_ok < len(boot[name]):
            out[f"{name}_n_resamples"] = n_ok
    return out


def number_or_none(x) -> float | None:
    """A JSON-friendly float: None for NaN (undefined)."""
    x = float(x)
    return None if not np.isfinite(x) else x


def bootstrap_metrics(
    y_true,
    probs,
    threshold: float,
    patient_ids,
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    n_bins: int = 10,
) -> dict:
    """Point estimates with percentile CIs from a patient-level bootstrap: {metric: value,
    metric_ci_low, metric_ci_high} (plus metric_n_resamples where some resamples lacked a class
    and were skipped). Per-class and macro figures nest under "per_class" and "macro".
    n_resamples >= 1 and ci in (0, 1) (settings checks evaluate.bootstrap and evaluate.ci)."""
    point = classification_metrics(y_true, probs, threshold, n_bins=n_bins)
    boot = _merge(
        [
            classification_metrics(y_true, probs, threshold, weights=w, n_bins=n_bins)
            for w in _chunks(patient_bootstrap_weights(patient_ids, n_resamples, seed))
        ]
    )
    return _flatten(point, boot, float(ci))


def _chunks(weights: np.ndarray, max_cells: int = 20_000_000):
    """Row blocks of a (B, N) matrix, bounding the memory of the per-block temporaries."""
    step = max(1, max_cells // max(1, weights.shape[1]))
    for i in range(0, len(weights), step):
        yield weights[i : i + step]


def _merge(parts: list[dict]) -> dict:
    """Concatenate the per-block arrays of equally shaped (nested) metric dicts."""
    first = parts[0]
    return {
        k: _merge([p[k] for p in parts]) if isinstance(v, dict) else np.concatenate([p[k] for p in parts])
        for k, v in first.items()
    }


def fold_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """A CV fold's validation figures: covid-vs-rest AUC, and accuracy/sensitivity/specificity at
    the default decision (covid iff p_covid >= 0.5), plus the log loss."""
    from sklearn.metrics import log_loss

    found = classification_metrics(y, probs, 0.5)
    out = {m: float(found[m][0]) for m in ("auc", "accuracy", "sensitivity", "specificity")}
    out["loss"] = float(log_loss(y, np.clip(probs, 1e-7, 1.0), labels=list(range(probs.shape[1]))))
    return out


def finite_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """The finite numeric leaves of a (nested) metrics dict as MLflow metric names: nested keys
    joined by '_', spaces as '_'; None, NaN, infinities, booleans and text are left out."""
    out = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(finite_metrics(value, name + "_"))
        elif isinstance(value, Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value):
            out[name.replace(" ", "_")] = float(value)
    return out


# -- curves (for plots) ---------------------------------------------------------------------------


def curves(y_binary, scores, n_bins: int = 10) -> dict[str, pd.DataFrame]:
    """ROC (fpr, tpr, threshold), precision-recall (recall, precision, threshold) and
    calibration (bin, mean_predicted, fraction_positive, count) tables of one positive class."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = np.asarray(y_binary).astype(int).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    out = {}
    if len(np.unique(y)) == 2:
        fpr, tpr, thr = roc_curve(y, s)
        out["roc"] = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)})
        precision, recall, thr = precision_recall_curve(y, s)
        out["precision_recall"] = pd.DataFrame({"recall": recall, "precision": precision, "threshold": np.r_[thr, 1.0]})
    else:
        out["roc"] = pd.DataFrame(columns=["fpr", "tpr", "threshold"])
        out["precision_recall"] = pd.DataFrame(columns=["recall", "precision", "threshold"])
    bins = calibration_bins(s, n_bins)
    table = pd.DataFrame({"bin": bins, "p": s, "y": y}).groupby("bin")
    out["calibration"] = pd.DataFrame(
        {
            "bin": table.size().index,
            "mean_predicted": table["p"].mean().values,
            "fraction_positive": table["y"].mean().values,
            "count": table.size().values,
        }
    )
    return out
