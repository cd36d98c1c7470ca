"""Roles: which (class, collection) pairs train a model and which are its external set.

The curated store holds every image of every collection; `data.sources` decides, per class, which
collections train the model (their cv partition for training, their test partition for the
internal test) and which are held out whole as the external set. Roles are read at training and
evaluation time, so `covidxray train experiment=cross_dataset_reverse` needs no re-curation.

    data.sources.train:    {covid: [ieee8023], normal: [kermany]}      # the tutorial's sources
    data.sources.external: {covid: [radiography], normal: [radiography]}

A (class, collection) pair is never in both roles, and an external image that near-duplicates any
training-role image (same `dup_group` in the curated index) is dropped from the external set. The
collections themselves, and the classes each provides, are configuration (data.collections, see
collections.py): a role may name any of them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidxray import CovidXrayError

ROLES = ("train", "external")
BALANCE = ("none", "undersample")


def as_roles(sources) -> dict[str, dict[str, list[str]]]:
    """`data.sources` (a mapping, e.g. an OmegaConf node) as plain {role: {class: [collection]}}."""
    sources = sources or {}
    out = {}
    for role in ROLES:
        given = sources.get(role) or {}
        out[role] = {str(c): [str(s) for s in (given.get(c) or [])] for c in given}
    return out


def check_roles(roles: dict, classes: list[str], provides: dict[str, tuple[str, ...]]) -> None:
    """Reject unknown collections or classes, pairs a collection cannot provide, a pair in both
    roles, and a class of the model that no collection trains; errors name the key. `provides` maps
    each collection of data.collections to its classes (`collections.provides`)."""
    unknown_roles = sorted(set(roles) - set(ROLES))
    if unknown_roles:
        raise CovidXrayError(f"data.sources: unknown role(s) {unknown_roles}; allowed: {', '.join(ROLES)}")
    for role, per_class in roles.items():
        for label, collections in per_class.items():
            key = f"data.sources.{role}.{label}"
            if label not in classes:
                raise CovidXrayError(
                    f"{key}: class {label!r} is not a class of this task (allowed: {', '.join(classes)})"
                )
            for name in collections:
                if name not in provides:
                    raise CovidXrayError(
                        f"{key}: unknown collection {name!r} (allowed: {', '.join(provides)}; a collection is "
                        "conf/collection/<name>.yaml, named in `collection: [...]` of conf/config.yaml)"
                    )
                if label not in provides[name]:
                    raise CovidXrayError(
                        f"{key}: collection {name!r} has no {label} images (it provides {', '.join(provides[name])})"
                    )
    for label in classes:
        if not roles.get("train", {}).get(label):
            raise CovidXrayError(
                f"data.sources.train.{label}: no collection trains class {label!r} "
                f"(allowed: {', '.join(c for c in provides if label in provides[c])})"
            )
        both = set(roles["train"].get(label, [])) & set(roles.get("external", {}).get(label, []))
        if both:
            raise CovidXrayError(
                f"data.sources: collection(s) {sorted(both)} are in both roles for class "
                f"{label!r}: a collection is either trained on or held out"
            )


def in_role(index: pd.DataFrame, per_class: dict[str, list[str]]) -> np.ndarray:
    """Boolean mask of the rows whose (label, source) pair is in `per_class` ({class: [collection]})."""
    pairs = {(c, s) for c, names in per_class.items() for s in names}
    return np.array([(lab, src) in pairs for lab, src in zip(index["label"], index["source"])], dtype=bool)


def external_set(index: pd.DataFrame, roles: dict) -> tuple[np.ndarray, int]:
    """Mask of the external-role rows that near-duplicate no training-role image, and how many
    external rows were dropped for near-duplicating one (same `dup_group`)."""
    external = in_role(index, roles.get("external", {}))
    train = in_role(index, roles["train"])
    groups = index["dup_group"] if "dup_group" in index.columns else index["image_id"]
    seen = set(groups[train])
    clash = external & groups.isin(seen).to_numpy()
    return external & ~clash, int(clash.sum())


def check_present(roles: dict, index: pd.DataFrame, where) -> None:
    """Every (class, collection) pair named in the roles has images in the curated index."""
    have = set(zip(index["label"], index["source"]))
    for role, per_class in roles.items():
        for label, names in per_class.items():
            absent = [s for s in names if (label, s) not in have]
            if absent:
                raise CovidXrayError(
                    f"data.sources.{role}.{label}: no {label} images of {', '.join(absent)} in "
                    f"{where} (run `dvc repro curate` with that collection in data.collections)"
                )


def model_roles(meta_sources, configured) -> dict:
    """The roles a saved model was trained with (model.json `sources`), which a configuration that
    names other roles must not contradict; models saved before roles existed take the configured."""
    wanted = as_roles(configured)
    if not meta_sources:
        return wanted
    saved = as_roles(meta_sources)
    if configured is not None and wanted != saved:
        raise CovidXrayError(
            f"data.sources ({describe(wanted)}) differ from the model's ({describe(saved)}): "
            "retrain, or evaluate with the model's data.sources"
        )
    return saved


def role_table(index: pd.DataFrame, splits: pd.DataFrame, roles: dict) -> pd.DataFrame:
    """image_id and its role for a model: cv or test (its training collections), external, or
    unused (a collection in no role)."""
    from covidxray.data.images import with_splits

    partition = with_splits(index, splits)["partition"].to_numpy()
    train, external = in_role(index, roles["train"]), in_role(index, roles.get("external", {}))
    role = np.where(train, partition, np.where(external, "external", "unused"))
    return pd.DataFrame({"image_id": index["image_id"].to_numpy(), "partition": role})


def describe(roles: dict) -> str:
    """One line: 'train covid: ieee8023; normal: kermany | external covid: radiography; ...'."""
    parts = []
    for role in (r for r in ROLES if r in roles):
        cells = "; ".join(f"{c}: {', '.join(s)}" for c, s in roles.get(role, {}).items() if s)
        parts.append(f"{role} {cells or '(none)'}")
    return " | ".join(parts)


def balance(index: pd.DataFrame, method: str, seed: int) -> pd.DataFrame:
    """`none`: unchanged. `undersample`: every class cut to about the smallest class's image count
    by drawing whole patients at random (by seed), so a patient is kept or dropped entirely."""
    if method not in BALANCE:
        raise CovidXrayError(f"data.balance must be one of {', '.join(BALANCE)}, got {method!r}")
    if method == "none" or index.empty:
        return index
    counts = index["label"].value_counts()
    target = int(counts.min())
    rng = np.random.default_rng(seed)
    keep = []
    for label in sorted(counts.index):
        rows = index[index["label"] == label]
        if len(rows) <= target:
            keep.append(rows)
            continue
        sizes = rows.groupby("patient_id").size().sort_index()
        chosen, total = [], 0
        for k in rng.permutation(len(sizes)):
            if total + int(sizes.iloc[k]) <= target:
                chosen.append(sizes.index[k])
                total += int(sizes.iloc[k])
        keep.append(rows[rows["patient_id"].isin(chosen)])
    return pd.concat(keep).sort_index()
