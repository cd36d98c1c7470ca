"""Leave-one-collection-out (LOCO): how a training recipe does at a site it never saw.

For each held-out group (a set of collections), the recipe is trained again on the remaining
training collections (their cv partition, cross-validated for the threshold and the epoch count,
then one final fit, exactly as the train stage does) and measured on every image of the group,
less any image sharing a patient or a near-duplicate group (`dup_group`) with a training image.
This is the leave-one-domain-out protocol of domain generalization (DomainBed, Gulrajani &
Lopez-Paz 2021): a recipe is judged by the mean and the worst group, and model selection on that
figure never lets a held-out collection tune its own score.

Each group reports AUC with patient-bootstrap intervals beside the shortcut baseline (the audit's
geometry/format and pixel-statistics AUCs on the same images; the model's margin is its AUC minus
the better of the two), sensitivity and specificity at the transferred threshold (chosen on the
training collections' out-of-fold predictions) and at thresholds calibrated on K labelled images
of the group (calibration.py), and the figures per collection. A group with one class has no AUC:
it reports the sensitivity or the specificity only, and says so. Scores are covid vs the rest.

One Trainer holds the images of every group, so a frozen backbone's features are computed once
for all groups and folds (training/trainer.py's feature cache). `load` reads and prepares the
images once; a study runs each of its recipes on them (`run_on`), its Trainers sharing the feature
cache and the built models (LocoData).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.data import sources
from covidxray.evaluation import calibration
from covidxray.evaluation import metrics as M
from covidxray.training.loco_groups import (
    HEADLINE,
    MIXED,
    SUMMARY,
    LocoSpec,
    Recipe,
    counted,
    group_name,
    held_pairs,
    metric_key,
    remaining,
)

# -- measuring ------------------------------------------------------------------------------------


def shortcut_baseline(frame: pd.DataFrame, stored: np.ndarray, seed: int) -> dict:
    """The shortcut AUCs of a held-out set (geometry/format, pixel statistics: the curation
    audit's cross-validated decision tree) and the better of the two, `auc` (None for one class)."""
    from covidxray.evaluation import probes  # imports Keras: not at module level (settings/loco.py imports this)

    aucs = probes.shortcut_aucs(frame, stored, seed)
    found = [v for v in aucs.values() if v is not None]
    return {**aucs, "auc": max(found) if found else None}


def one_class_figure(positive: np.ndarray, called: np.ndarray, patients, n_resamples: int, ci: float, seed: int):
    """(name, value, low, high): sensitivity (all covid) or specificity (none), patient-bootstrap interval."""
    right = called if positive.all() else ~called
    weights = M.patient_bootstrap_weights(patients, n_resamples, seed)
    boot = weights @ right.astype(float) / weights.sum(axis=1)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return ("sensitivity" if positive.all() else "specificity"), float(right.mean()), float(lo), float(hi)


def adaptation_figures(positive: np.ndarray, scores: np.ndarray, adapted: np.ndarray, threshold: float) -> dict:
    """AUC (both classes only) and sensitivity/specificity at the transferred threshold, without
    and with site adaptation (`adapted`: the scores after aligning the group's features)."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for suffix, s in (("", scores), ("_adapted", adapted)):
        both = bool(positive.any() and (~positive).any())
        out[f"auc{suffix}"] = float(roc_auc_score(positive, s)) if both else None
        out.update({f"{k}{suffix}": v for k, v in calibration.operating_point(positive, s, threshold).items()})
    return out


def adapted_scores(trainer, model, train_idx: np.ndarray, held_idx: np.ndarray) -> np.ndarray:
    """Covid scores of the held-out rows after site adaptation (training/site_adaptation.py): their
    pooled features aligned, by their own statistics (no labels), to those of the training rows."""
    from covidxray.training import site_adaptation as sa
    from covidxray.training import stacked_heads

    pooled = trainer.pooled_features(model)
    shift = sa.alignment(sa.feature_stats(pooled[train_idx]), sa.feature_stats(pooled[held_idx]))
    return stacked_heads.head_probs(sa.fold(stacked_heads.head_weights(model), *shift), pooled[held_idx])[:, -1]


def measure(
    frame: pd.DataFrame,
    stored,
    scores,
    threshold: float,
    classes,
    spec: LocoSpec,
    seed: int,
    adapted=None,
    shortcuts=None,
) -> dict:
    """A held-out group's figures from its covid scores (see the module docstring); `adapted`:
    its scores after site adaptation, compared in `adaptation`. `shortcuts`: a dict keeping the
    shortcut baseline of each held-out set (it depends on the images only), so recipes measured on
    the same images (a study) compute it once."""
    from covidxray.evaluation import probes

    positive = (frame["label"].astype(str) == classes[-1]).to_numpy()
    called = scores >= threshold
    out: dict = {"classes_present": sorted(frame["label"].astype(str).unique().tolist())}
    if adapted is not None:
        out["adaptation"] = adaptation_figures(positive, scores, np.asarray(adapted, float), threshold)
    predicted = np.where(called, classes[-1], "other")
    out["per_collection"] = probes.per_source(frame, predicted, classes)
    if positive.all() or not positive.any():
        name, value, lo, hi = one_class_figure(positive, called, frame["patient_id"], spec.n_resamples, spec.ci, seed)
        out.update({name: value, f"{name}_ci_low": lo, f"{name}_ci_high": hi})
        out["note"] = f"one class only ({out['classes_present'][0]}): {name} only, no AUC and no calibration"
        return out
    probs = np.column_stack([1.0 - scores, scores])
    figs = M.bootstrap_metrics(
        positive.astype(int), probs, threshold, frame["patient_id"], spec.n_resamples, spec.ci, seed
    )
    for key in ("auc", "sensitivity", "specificity", "pr_auc"):
        out.update({k: figs[k] for k in (key, f"{key}_ci_low", f"{key}_ci_high")})
    key = (tuple(frame["image_id"]), seed)
    baseline = shortcuts.get(key) if shortcuts is not None else None
    if baseline is None:
        baseline = shortcut_baseline(frame, stored, seed)
        if shortcuts is not None:
            shortcuts[key] = baseline
    out["shortcut"] = baseline
    out["shortcut_auc"] = baseline["auc"]
    out["margin"] = None if baseline["auc"] is None or out["auc"] is None else out["auc"] - baseline["auc"]
    drawn = calibration.calibration_draws(
        positive,
        scores,
        frame["patient_id"],
        spec.calibration_k,
        spec.calibration_draws,
        spec.calibration_method,
        spec.calibration_target,
        seed,
        confidence=spec.calibration_confidence,
        prefer=threshold,
    )
    out["calibrated"] = drawn
    if drawn is not None:
        out["calibrated_sensitivity"] = drawn["sensitivity_mean"]
        out["calibrated_specificity"] = drawn["specificity_mean"]
        out["calibrated_target_held"] = drawn.get("target_held")
    return out


def _mean_worst(values: list) -> tuple[float | None, float | None]:
    return (float(np.mean(values)), float(np.min(values))) if values else (None, None)


def summarise(groups: dict, spec: LocoSpec) -> dict:
    """loco_<figure>_mean and _worst (lowest) over the groups that have the figure, and
    loco_<figure>_mixed_mean/_worst over the groups the objective counts (loco_groups.counted:
    both classes, shortcut baseline below spec.max_shortcut_auc, at least spec.min_images images).
    Marks each group with `counted` and `counted_why`."""
    for g in groups.values():
        g["counted"], g["counted_why"] = counted(g, spec.max_shortcut_auc, spec.min_images)
    out = {}
    for m in SUMMARY:
        out[f"loco_{m}_mean"], out[f"loco_{m}_worst"] = _mean_worst(
            [g[m] for g in groups.values() if g.get(m) is not None]
        )
    for m in MIXED:
        found = [g[m] for g in groups.values() if g["counted"] and g.get(m) is not None]
        out[f"loco_{m}_mixed_mean"], out[f"loco_{m}_mixed_worst"] = _mean_worst(found)
    out["loco_groups_counted"] = sum(g["counted"] for g in groups.values())
    return out


def headline(result: dict) -> dict:
    """The few figures for DVC metrics and MLflow: the summary, then per group HEADLINE."""
    out = {k: v for k, v in result["summary"].items()}
    for name, g in result["groups"].items():
        for m in HEADLINE:
            if g.get(m) is not None:
                out[f"loco_{metric_key(name)}_{m}"] = g[m]
    return out


# Per held-out group, the columns of `dvc metrics show reports/loco/groups` (one file, one row, per
# group; short keys, the ones every headline.json shares where they mean the same, so the table fits
# 120 columns): images, AUC and its interval, the shortcut baseline and the margin over it,
# sensitivity and specificity at the transferred threshold, specificity calibrated on K site images.
GROUP_ROW = {
    "n": "n_images",
    "auc": "auc",
    "auc_lo": "auc_ci_low",
    "auc_hi": "auc_ci_high",
    "base": "shortcut_auc",
    "margin": "margin",
    "sens": "sensitivity",
    "spec": "specificity",
    "spec_cal": "calibrated_specificity",
}


def group_metrics(result: dict) -> dict[str, dict]:
    """{file stem (the group's metric_key): its GROUP_ROW figures} (a one-class group has fewer)."""
    return {
        metric_key(name): {short: g[key] for short, key in GROUP_ROW.items() if g.get(key) is not None}
        for name, g in result["groups"].items()
    }


# -- the recipe, per held-out group ------------------------------------------------------------------


def fit_recipe(trainer, idx: np.ndarray, fold_of: np.ndarray, positive: np.ndarray, recipe: Recipe):
    """The train stage's recipe (training/recipe.py) on rows `idx` of the trainer: CV over their
    folds for the out-of-fold threshold and the epoch count, then the final model on all of them.
    Returns (final model, threshold, {"oof_auc", "epochs"})."""
    from covidxray.training.recipe import run_recipe

    folds = sorted(np.unique(fold_of[idx]).tolist())[: recipe.folds or None]
    rule = M.threshold_rule(recipe.threshold, recipe.target_sensitivity)
    found = run_recipe(trainer, idx, fold_of, folds, positive, rule)
    done = found.validated
    scores = found.oof[done, -1]
    oof = M.classification_metrics(positive[done].astype(int), np.column_stack([1 - scores, scores]), 0.5)
    info = {"oof_auc": M.number_or_none(oof["auc"][0]), "epochs": found.epochs[: 1 + trainer.fine_tunes]}
    return found.model, found.threshold, info


def group_rows(rows: pd.DataFrame, group, recipe: Recipe, provides: dict, seed: int):
    """(training row positions, held-out row positions, held-out images dropped for sharing a
    patient or dup_group with a training image)."""
    left = remaining(recipe.train_roles, group)
    train_mask = (rows["partition"] == "cv").to_numpy() & sources.in_role(rows, left)
    train = sources.balance(rows[train_mask], recipe.balance, seed)
    train_idx = rows.index.get_indexer(train.index)
    held_mask = sources.in_role(rows, held_pairs(group, provides))
    shared = rows["patient_id"].isin(set(train["patient_id"])) | rows["dup_group"].isin(set(train["dup_group"]))
    clash = held_mask & shared.to_numpy()
    return train_idx, np.flatnonzero(held_mask & ~clash), int(clash.sum())


def load_rows(curated, splits, provides: dict, classes_wanted=None):
    """(stored images, rows: index joined with partition and fold, classes) of every
    (class, collection) pair LOCO can train on or hold out."""
    from covidxray.data.images import load_curated, load_splits, with_splits

    images, index, classes = load_curated(curated)
    if classes_wanted is not None and list(classes) != list(classes_wanted):
        raise CovidXrayError(f"the curated data in {curated} holds the classes {classes}, not {list(classes_wanted)}")
    pairs = held_pairs(list(provides), provides)
    sources.check_present({"train": pairs}, index, curated)
    if "dup_group" not in index.columns:
        index = index.assign(dup_group=index["image_id"])
    joined = with_splits(index, load_splits(splits), splits)
    keep = np.flatnonzero(sources.in_role(joined, pairs))
    rows = joined.iloc[keep].reset_index(drop=True)
    rows["fold"] = pd.to_numeric(rows["fold"], errors="coerce").fillna(-1).astype(int)
    return images[keep], rows, list(classes)


@dataclass
class LocoData:
    """What LOCO trains and measures on, for one set of inputs (data.*): the stored images, their
    rows (index joined with partition and fold), the classes, the model inputs `pixels` made from
    them, and what the Trainers made on these pixels share (a study runs many recipes on one
    LocoData): `features`, the feature cache (backbone and pooled features, keyed by backbone), and
    `models`, the built models reused by Trainer.new_model."""

    stored: np.ndarray
    rows: pd.DataFrame
    classes: list
    pixels: np.ndarray
    features: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)


def load(curated, splits, provides: dict, inputs: dict, classes_wanted=None) -> LocoData:
    """load_rows, and the pixels prepared for the model's inputs (image_size, normalize, crop_border)."""
    from covidxray.data.images import prepare

    stored, rows, classes = load_rows(curated, splits, provides, classes_wanted)
    pixels = prepare(stored, inputs["image_size"], inputs["normalize"], inputs["crop_border"])
    return LocoData(stored, rows, classes, pixels)


def run(
    curated, splits, recipe: Recipe, spec: LocoSpec, seed: int, classes_wanted=None, inspect=None, shortcuts=None
) -> dict:
    """LOCO over spec.groups (run_on) of the images `load` gives for the recipe's inputs."""
    data = load(curated, splits, spec.provides, recipe.inputs, classes_wanted)
    return run_on(data, recipe, spec, seed, inspect, shortcuts)


def run_on(data: LocoData, recipe: Recipe, spec: LocoSpec, seed: int, inspect=None, shortcuts=None) -> dict:
    """LOCO over spec.groups: {"groups": {name: figures}, "summary": mean/worst, "seconds"}.
    `inspect(model, trainer, rows, train_idx, held_idx)`, if given, looks at each group's model
    before it is freed; what it returns is the group's `inspected`. `shortcuts`: see measure."""
    from covidxray.training.cv_data import CVData, make_trainer

    start = time.perf_counter()
    stored, rows, classes = data.stored, data.rows, data.classes
    trainer = make_trainer(
        recipe.fit,
        CVData(data.pixels, rows, classes, [], int(stored.shape[1])),
        recipe.deterministic,
        log_prefix="loco",
    )
    # the pixels' feature cache and built models, shared with the other recipes run on `data`
    trainer.verbose, trainer.cache, trainer.reused = 0, data.features, data.models
    positive = (rows["label"].astype(str) == classes[-1]).to_numpy()
    fold_of = rows["fold"].to_numpy()
    groups, predictions = {}, []
    for group in spec.groups:
        name, t0 = group_name(group), time.perf_counter()
        train_idx, held_idx, dropped = group_rows(rows, group, recipe, spec.provides, seed)
        model, threshold, info = fit_recipe(trainer, train_idx, fold_of, positive, recipe)
        scores = trainer.predict(model, held_idx)[:, -1].astype(np.float64)
        frame = rows.iloc[held_idx].reset_index(drop=True)
        adapted = adapted_scores(trainer, model, train_idx, held_idx)
        found = measure(frame, stored[held_idx], scores, threshold, classes, spec, seed, adapted, shortcuts)
        trained_on = remaining(recipe.train_roles, group)
        groups[name] = {
            "held_out": list(group),
            "trained_on": sources.describe({"train": trained_on}),
            "n_train_images": int(len(train_idx)),
            "n_images": int(len(held_idx)),
            "n_patients": int(frame["patient_id"].nunique()),
            "dropped_shared_with_training": dropped,
            "threshold": float(threshold),
            **info,
            **found,
            "seconds": time.perf_counter() - t0,
        }
        if inspect is not None:
            groups[name]["inspected"] = inspect(model, trainer, rows, train_idx, held_idx)
        predictions.append(role_rows(name, rows, train_idx, held_idx, scores))
        print(f"loco: held out {name}: {_line(groups[name])} ({groups[name]['seconds']:.0f}s)")
        import keras

        del model
        keras.backend.clear_session()
    return {
        "groups": groups,
        "summary": summarise(groups, spec),
        "seconds": time.perf_counter() - start,
        "feature_cache_s": trainer.cache_seconds,
        "predictions": pd.concat(predictions, ignore_index=True),
    }


def role_rows(name: str, rows: pd.DataFrame, train_idx, held_idx, scores) -> pd.DataFrame:
    """group, image_id, role (train | held_out), label, source, patient_id, dup_group, score (held out)."""
    cols = ["image_id", "label", "source", "patient_id", "dup_group"]
    train = rows.iloc[train_idx][cols].assign(role="train", score=float("nan"))
    held = rows.iloc[held_idx][cols].assign(role="held_out", score=scores)
    return pd.concat([train, held], ignore_index=True).assign(group=name)[["group", "role", *cols, "score"]]


def paired_auc_difference(
    base: pd.DataFrame, other: pd.DataFrame, positive: str, n_resamples: int, ci: float, seed: int
) -> pd.DataFrame:
    """Two recipes' AUC on the same held-out images, per group of two predictions tables (as
    role_rows writes them, reports/loco/predictions.csv): auc_base, auc_other, delta = other - base
    and its paired patient-bootstrap interval (the same resamples score both recipes), then a row
    "mean" with the mean over the groups (its interval: the mean of each resample's deltas)."""
    held = [t[t["role"] == "held_out"].astype({"image_id": str}) for t in (base, other)]
    rows, boots = [], []
    for group, a in held[0].groupby("group", sort=False):
        b = held[1][held[1]["group"] == group][["image_id", "score"]]
        joined = a.merge(b, on="image_id", suffixes=("_base", "_other"))
        if not len(joined) == len(a) == len(b):
            raise CovidXrayError(f"paired LOCO difference: group {group} holds out other images in the two tables")
        y = (joined["label"].astype(str) == positive).to_numpy()
        weights = np.vstack(
            [np.ones(len(joined)), M.patient_bootstrap_weights(joined["patient_id"], n_resamples, seed)]
        )
        aucs = [
            M.weighted_binary_metrics(y, joined[f"score_{k}"].to_numpy(float), y, weights)["auc"]
            for k in ("base", "other")
        ]
        delta = aucs[1] - aucs[0]
        boots.append(delta[1:])
        low, high, _ = M._interval(delta[1:], ci)
        rows.append(
            {"group": group, "n_images": len(joined), "n_patients": int(joined["patient_id"].nunique())}
            | {"auc_base": aucs[0][0], "auc_other": aucs[1][0], "delta": delta[0]}
            | {"delta_ci_low": low, "delta_ci_high": high}
        )
    out = pd.DataFrame(rows)
    low, high, _ = M._interval(np.mean(boots, axis=0), ci)
    mean = {"group": "mean", "n_images": int(out["n_images"].sum()), "n_patients": int(out["n_patients"].sum())}
    mean |= {k: float(out[k].mean()) for k in ("auc_base", "auc_other", "delta")}
    return pd.concat([out, pd.DataFrame([mean | {"delta_ci_low": low, "delta_ci_high": high}])], ignore_index=True)


def _line(g: dict) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    if g.get("auc") is None:
        return g.get("note", "")
    return (
        f"{g['n_images']} images, AUC {fmt(g['auc'])} (shortcut baseline {fmt(g.get('shortcut_auc'))}), "
        f"specificity {fmt(g.get('specificity'))} at the transferred threshold, "
        f"{fmt(g.get('calibrated_specificity'))} calibrated"
    )
