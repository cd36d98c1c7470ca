"""Site calibration: a decision threshold chosen on a site's own labelled images.

A threshold chosen on the training collections does not transfer to another hospital (its
scanners, population and prevalence shift the scores), while the ranking often does. A site
with a few labelled local images sets its own threshold: by Youden's J, or as the highest
threshold that reaches a target sensitivity. A target reached on the few positives of a small set
is a promise those positives cannot support (10 of 10 found says little about the next 100): with
a `confidence`, the target must hold for the one-sided Clopper-Pearson lower bound on the site's
sensitivity at that confidence, and a set with too few positives for that cannot calibrate at all
(`positives_needed`). `calibration_draws` estimates what that buys on a held-out collection: it
draws K labelled images (balanced), calibrates on them, and measures the rest, over many draws.
"""

from __future__ import annotations

import math

import numpy as np

from covidxray import CovidXrayError
from covidxray.evaluation.metrics import choose_threshold

MIN_PER_CLASS = 5  # fewer labelled images of a class than this cannot place a threshold


def sensitivity_lower_bound(found: int, positives: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound on a sensitivity at `confidence`, when `found` of
    `positives` positive images score at or above the threshold (0 when none does)."""
    from scipy.stats import beta

    if found <= 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, found, positives - found + 1))


def positives_needed(target: float, confidence: float) -> int | None:
    """The fewest positives for which even n of n found gives a lower bound >= target at
    `confidence` ((1 - c)^(1/n) >= target); None when no number does (target 1)."""
    if target >= 1.0:
        return None
    n = max(1, math.ceil(math.log(1.0 - confidence) / math.log(target)))
    while sensitivity_lower_bound(n, n, confidence) < target:  # float rounding at the edge
        n += 1
    while n > 1 and sensitivity_lower_bound(n - 1, n - 1, confidence) >= target:
        n -= 1
    return n


def check_positives(positives: int, target: float, confidence: float, what: str) -> int:
    """The positives the target needs at `confidence`; a one-line error naming that number when
    `positives` is fewer (or when no number of positives can show the target)."""
    needed = positives_needed(target, confidence)
    if needed is None:
        raise CovidXrayError(
            f"{what}: a target sensitivity of 1 can never be shown at {confidence:g} confidence "
            "(the lower bound stays below 1): choose a target below 1"
        )
    if positives < needed:
        raise CovidXrayError(
            f"{what}: {positives} positive image(s); sensitivity {target:g} at {confidence:g} confidence needs at "
            f"least {needed} (even {needed - 1} of {needed - 1} found gives a lower bound below {target:g})"
        )
    return needed


def bound_threshold(positive, scores, target: float, confidence: float) -> float:
    """The highest threshold whose lower bound on sensitivity (Clopper-Pearson at `confidence`,
    on the positives of `positive`) is >= target: the x-th highest positive score, x the fewest
    found positives whose bound reaches the target. Check the count first (check_positives)."""
    positive = np.asarray(positive, dtype=bool)
    ranked = np.sort(np.asarray(scores, dtype=float)[positive])[::-1]
    n = len(ranked)
    for found in range(1, n + 1):
        if sensitivity_lower_bound(found, n, confidence) >= target:
            return float(ranked[found - 1])
    raise CovidXrayError(f"{n} positive image(s) cannot show sensitivity {target:g} at {confidence:g} confidence")


def bound_at(positive, scores, threshold: float, confidence: float) -> float:
    """The lower bound on sensitivity at `threshold`, on the positives of `positive`."""
    positive = np.asarray(positive, dtype=bool)
    found = int((np.asarray(scores, dtype=float)[positive] >= threshold).sum())
    return sensitivity_lower_bound(found, int(positive.sum()), confidence)


def site_threshold(
    positive,
    scores,
    method: str,
    target_sensitivity: float,
    what: str = "the set",
    confidence: float | None = None,
    prefer: float | None = None,
) -> float:
    """The threshold on `scores` (call positive iff score >= threshold) for labelled images
    (`positive`: bool), by `method` (youden | sensitivity); needs MIN_PER_CLASS of each. With a
    `confidence`, method sensitivity takes the target on the lower bound (bound_threshold) and
    needs the positives that asks for. Youden ties break towards `prefer`, the threshold it
    replaces (metrics.choose_threshold)."""
    positive = np.asarray(positive, dtype=bool)
    for name, n in (("positive", int(positive.sum())), ("negative", int((~positive).sum()))):
        if n < MIN_PER_CLASS:
            raise CovidXrayError(
                f"{what}: {n} {name} image(s), at least {MIN_PER_CLASS} of each class are needed to calibrate"
            )
    if method == "sensitivity" and confidence is not None:
        check_positives(int(positive.sum()), target_sensitivity, confidence, what)
        return bound_threshold(positive, scores, target_sensitivity, confidence)
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


def _summary(found: dict, target: float | None) -> dict:
    """Mean and sd of each figure over the draws; with a target, the share of draws whose
    sensitivity on the rest reached it (`target_held`)."""
    out = {}
    for key, values in found.items():
        out[f"{key}_mean"], out[f"{key}_sd"] = _mean_sd(values)
    if target is not None:
        sens = [v for v in found["sensitivity"] if v is not None]
        out["target_held"] = float(np.mean([v >= target for v in sens])) if sens else None
    return out


def calibration_draws(
    positive,
    scores,
    patients,
    k: int,
    draws: int,
    method: str,
    target_sensitivity: float,
    seed: int,
    confidence: float | None = None,
    prefer: float | None = None,
) -> dict | None:
    """Calibrate on K labelled images (K/2 of each class, drawn at random), measure on the other
    images (none of the drawn images' patients), `draws` times: mean and sd of the threshold and
    of sensitivity and specificity on the rest. For method sensitivity, also the share of draws
    whose sensitivity on the rest reached the target (`target_held`); with a `confidence`, the
    threshold takes the target on the lower bound, and `point_rule` gives the same figures on the
    same draws for the target taken on the K/2 positives as found (the rule before the bound).
    None when a class has too few images to draw. Youden ties break towards `prefer` (the
    transferred threshold), as the calibrate tool's do."""
    positive = np.asarray(positive, dtype=bool)
    scores, patients = np.asarray(scores, dtype=float), np.asarray(patients).astype(str)
    per_class = (k // 2, k - k // 2)  # positives, negatives
    pos_idx, neg_idx = np.flatnonzero(positive), np.flatnonzero(~positive)
    if len(pos_idx) <= per_class[0] or len(neg_idx) <= per_class[1] or min(per_class) < 1:
        return None
    bounded = method == "sensitivity" and confidence is not None
    if bounded:
        check_positives(per_class[0], target_sensitivity, confidence, f"K = {k} ({per_class[0]} positives)")
    rules = {"bound": confidence, "point": None} if bounded else {"point": None}
    rng = np.random.default_rng(seed)
    found = {r: {"threshold": [], "sensitivity": [], "specificity": []} for r in rules}
    for _ in range(int(draws)):
        chosen = np.concatenate(
            [rng.choice(pos_idx, per_class[0], replace=False), rng.choice(neg_idx, per_class[1], replace=False)]
        )
        rest = ~np.isin(patients, patients[chosen])
        for rule, c in rules.items():
            y, s = positive[chosen], scores[chosen]
            threshold = (
                bound_threshold(y, s, target_sensitivity, c)
                if c is not None
                else choose_threshold(y, s, method, target_sensitivity, prefer)
            )
            point = operating_point(positive[rest], scores[rest], threshold)
            for key, v in (("threshold", threshold), *point.items()):
                found[rule][key].append(v)
    out = {"k": int(k), "draws": int(draws), "method": method}
    target = float(target_sensitivity) if method == "sensitivity" else None
    if target is not None:
        out.update(target_sensitivity=target, positives=per_class[0])
    if bounded:
        out.update(confidence=float(confidence), positives_needed=positives_needed(target, confidence))
        out.update(_summary(found["bound"], target), point_rule=_summary(found["point"], target))
    else:
        out.update(_summary(found["point"], target))
    return out
