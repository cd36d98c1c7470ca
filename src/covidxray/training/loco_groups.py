"""Leave-one-collection-out's plain values, read by settings/loco.py without loading any model code:
the held-out groups (which collections, checked against `data.sources`), the recipe LOCO repeats
per group, how each group is measured, and the names of the figures a sweep may optimize.
evaluation/loco.py runs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from covidxray import CovidXrayError
from covidxray.data import sources
from covidxray.training.specs import FitSettings

# The figures of a group that go to DVC metrics and MLflow (loco_<group>_<name>); details stay in JSON.
HEADLINE = ("auc", "shortcut_auc", "margin", "sensitivity", "specificity", "calibrated_specificity")
# What a recipe is judged (and a sweep can select) by: mean and worst over the held-out groups.
SUMMARY = (
    "auc",
    "margin",
    "specificity",
    "calibrated_sensitivity",
    "calibrated_specificity",
    "calibrated_target_held",  # share of calibration draws whose sensitivity on the rest reached the target
)
# The same over the groups the objective counts (loco.objective: class is not collection, enough
# images): loco_auc_mixed_mean is the headline and the default objective of LOCO sweeps.
MIXED = ("auc", "margin")


def metric_names() -> tuple[str, ...]:
    """loco_<figure>_mean and _worst, loco_<figure>_mixed_mean and _mixed_worst: the names a sweep
    may optimize (optimized_metric)."""
    plain = tuple(f"loco_{m}_{s}" for m in SUMMARY for s in ("mean", "worst"))
    return plain + tuple(f"loco_{m}_mixed_{s}" for m in MIXED for s in ("mean", "worst"))


@dataclass(frozen=True)
class Recipe:
    """What trains a model: the train stage's settings that LOCO repeats per held-out group."""

    fit: FitSettings
    inputs: dict  # images.input_spec
    train_roles: dict  # {class: [collection]}: the recipe's training collections
    balance: str
    folds: int | None  # the first n CV folds (None: all)
    threshold: str  # youden | sensitivity
    target_sensitivity: float
    deterministic: bool = False


@dataclass(frozen=True)
class LocoSpec:
    """The held-out groups and how each is measured."""

    groups: tuple[tuple[str, ...], ...]
    provides: dict  # {collection: (class, ...)}: the (class, collection) pairs LOCO can hold out
    calibration_k: int
    calibration_draws: int
    calibration_method: str
    calibration_target: float
    n_resamples: int
    ci: float
    calibration_confidence: float | None = None  # method sensitivity: the target on the lower bound (None: as found)
    max_shortcut_auc: float = 0.9  # loco.objective: a group counts when its shortcut baseline is below
    min_images: int = 100  # ... and it holds at least this many images (smaller ones: flagged only)


# -- groups -------------------------------------------------------------------------------------


def group_name(group) -> str:
    """A held-out group as shown in tables: its collections joined by '+'."""
    return "+".join(group)


def metric_key(name: str) -> str:
    """A group's name as part of a metric name (MLflow allows no '+')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def collections_of(roles: dict) -> dict[str, tuple[str, ...]]:
    """{collection: the classes it provides} over every role of `data.sources`."""
    out: dict[str, set[str]] = {}
    for per_class in roles.values():
        for label, names in per_class.items():
            for name in names:
                out.setdefault(name, set()).add(label)
    return {name: tuple(sorted(labels)) for name, labels in sorted(out.items())}


def remaining(train_roles: dict, group) -> dict[str, list[str]]:
    """The training collections per class once `group` is held out."""
    return {label: [n for n in names if n not in group] for label, names in train_roles.items()}


def starved(train_roles: dict, group, classes) -> list[str]:
    """The classes that holding out `group` leaves with no training collection."""
    left = remaining(train_roles, group)
    return [c for c in classes if not left.get(c)]


def default_groups(roles: dict, classes) -> tuple[tuple[str, ...], ...]:
    """Every collection that provides each class is a group of its own; the others are held out
    together (so a group has every class where possible). A group that would leave a class with
    no training collection is split into its collections, and those that still would are skipped."""
    provides = collections_of(roles)
    whole = [(name,) for name, labels in provides.items() if set(classes) <= set(labels)]
    partial = tuple(name for name, labels in provides.items() if not set(classes) <= set(labels))
    out = []
    for group in whole + ([partial] if partial else []):
        for g in [group] if not starved(roles["train"], group, classes) else [(n,) for n in group]:
            if not starved(roles["train"], g, classes):
                out.append(g)
    return tuple(out)


def check_groups(groups, roles: dict, classes) -> tuple[tuple[str, ...], ...]:
    """`loco.groups` as tuples, checked: known collections, none named twice, and every class
    keeps a training collection. Errors name the key and what is allowed."""
    provides = collections_of(roles)
    allowed = ", ".join(provides)
    if not isinstance(groups, (list, tuple)) or not groups:
        raise CovidXrayError(f"loco.groups: a non-empty list of groups of collections (of {allowed}), got {groups!r}")
    out = []
    for i, group in enumerate(groups):
        key = f"loco.groups[{i}]"
        names = [group] if isinstance(group, str) else group
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise CovidXrayError(f"{key}: a non-empty list of collection names (allowed: {allowed}), got {group!r}")
        for name in names:
            if name not in provides:
                raise CovidXrayError(f"{key}: unknown collection {name!r} (allowed: {allowed})")
        twice = sorted({n for n in names if list(names).count(n) > 1})
        if twice:
            raise CovidXrayError(f"{key}: names {', '.join(twice)} twice (allowed: each of {allowed} at most once)")
        lacking = starved(roles["train"], names, classes)
        if lacking:
            left = {c: [n for n in roles["train"].get(c, []) if n not in names] for c in lacking}
            raise CovidXrayError(
                f"{key}={list(names)}: holding it out leaves class {', '.join(lacking)} with no training "
                f"collection (training collections: {sources.describe({'train': roles['train']})}; left: {left})"
            )
        if sorted(names) in [sorted(g) for g in out]:
            raise CovidXrayError(
                f"{key}={list(names)}: the same group is named twice (it would count twice in the mean; "
                f"allowed: each group once)"
            )
        out.append(tuple(names))
    return tuple(out)


def counted(group: dict, max_shortcut_auc: float, min_images: int) -> tuple[bool, str]:
    """Whether a measured held-out group counts in the objective (loco_*_mixed_*), and why (not):
    it needs both classes, a shortcut baseline AUC of at most max_shortcut_auc (where pixel statistics
    or geometry alone separate the classes better, class is collection and the AUC measures the shortcut)
    and at least min_images images (a few dozen images give an interval too wide to rank on)."""
    if group.get("auc") is None:
        return False, "one class: no AUC"
    base = group.get("shortcut_auc")
    if base is not None and base > max_shortcut_auc:
        return False, f"class is collection: shortcut baseline AUC {base:.3f} > {max_shortcut_auc}"
    if group["n_images"] < min_images:
        return False, f"{group['n_images']} images < {min_images}: flagged, interval only"
    return True, "counted"


def held_pairs(group, provides: dict) -> dict[str, list[str]]:
    """{class: [collection]}: every class that the group's collections provide."""
    out: dict[str, list[str]] = {}
    for name in group:
        for label in provides[name]:
            out.setdefault(label, []).append(name)
    return out
