"""Site calibration: a decision threshold chosen on a site's own labelled images.

A threshold chosen on the training collections does not transfer to another hospital (its
scanners, population and prevalence shift the scores), while the ranking often does. A site
with a few labelled local images sets its own threshold: by Youden's J, or as the highest
threshold that reaches a target sensitivity. `calibration_draws` estimates what that buys on a
held-out collection: it draws K labelled images (balanced), calibrates on them, and measures the
rest, over many draws.
"""

from __future__ import annotations

import numpy as np

from covidxray import CovidXrayError
from covidxray.evaluation.metrics import choose_threshold

MIN_PER_CLASS = 5  # fewer labelled images of a class than this cannot place a threshold


def site_threshold(
    positive, scores, method: str, target_sensitivity: float, what: str = "the set", prefer: float | None = None
) -> float:
    """The threshold on `scores` (call positive iff score >= threshold) for labelled images
    (`positive`: bool), by `method` (youden | sensitivity); needs MIN_PER_CLASS of each. Youden
    ties break towards `prefer`, the threshold it replaces (metrics.choose_threshold)."""
    positive = np.asarray(positive, dtype=bool)
    for name, n in (("positive", int(positive.sum())), ("negative", int((~positive).sum()))):
        if n < MIN_PER_CLASS:
            raise CovidXrayError(
                f"{what}: {n} {name} image(s), at least {MIN_PER_CLASS} of each class are needed to calibrate"
            )
    return choose_threshold(positive, scores, method, target_sensitivity, prefer)


def operating_point(positive, scores, threshold: float) -> dict:
    """Sensitivity and specificity at `threshold` (None where a class is absent)."""
    positive = np.asarray(positive, dtype=bool)
    called = np.asarray(scores, dtype=float) >= threshold
    sens = float(called[positive].mean()) if positive.any() else None
    spec = float((~called[~positive]).mean()) if (~positive).any() else None
    return {"sensitivity": sens, "specificity": spec}


def _mean_sd(values: list) -> tuple[float | None, float | None]:
    found = np.array([v for v in values if v is not None], dtype=float)
    if not len(found):
        return None, None
    return float(found.mean()), float(found.std(ddof=1)) if len(found) > 1 else 0.0


def calibration_draws(
    positive,
    scores,
    patients,
    k: int,
    draws: int,
    method: str,
    target_sensitivity: float,
    seed: int,
    prefer: float | None = None,
) -> dict | None:
    """Calibrate on K labelled images (K/2 of each class, drawn at random), measure on the other
    images (none of the drawn images' patients), `draws` times: mean and sd of the threshold and
    of sensitivity and specificity on the rest. None when a class has too few images to draw.
    Youden ties break towards `prefer` (the transferred threshold), as the calibrate tool's do."""
    positive = np.asarray(positive, dtype=bool)
    scores, patients = np.asarray(scores, dtype=float), np.asarray(patients).astype(str)
    per_class = (k // 2, k - k // 2)  # positives, negatives
    pos_idx, neg_idx = np.flatnonzero(positive), np.flatnonzero(~positive)
    if len(pos_idx) <= per_class[0] or len(neg_idx) <= per_class[1] or min(per_class) < 1:
        return None
    rng = np.random.default_rng(seed)
    found = {"threshold": [], "sensitivity": [], "specificity": []}
    for _ in range(int(draws)):
        chosen = np.concatenate(
            [rng.choice(pos_idx, per_class[0], replace=False), rng.choice(neg_idx, per_class[1], replace=False)]
        )
        rest = ~np.isin(patients, patients[chosen])
        threshold = choose_threshold(positive[chosen], scores[chosen], method, target_sensitivity, prefer)
        point = operating_point(positive[rest], scores[rest], threshold)
        for key, v in (("threshold", threshold), *point.items()):
            found[key].append(v)
    out = {"k": int(k), "draws": int(draws), "method": method}
    if method == "sensitivity":
        out["target_sensitivity"] = float(target_sensitivity)
    for key, values in found.items():
        out[f"{key}_mean"], out[f"{key}_sd"] = _mean_sd(values)
    return out
