"""The curation audit: what a labelled image set is made of, and what other than disease gives
its labels away (shortcut AUCs of image geometry/format and of simple pixel statistics).

Used by the curate stage (the whole curated store, and each collection against the rest) and by
the loco stage (the training set and the external set of a model, and its collections within
one class).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

UNKNOWN = "unknown"
ADULT_AGE = 18
SHORTCUT_AUC_WARN = 0.8


def age_band(age: float) -> str:
    """Ten-year band of an age ('50-59', '90+'), or 'unknown'."""
    if age is None or not np.isfinite(age) or age < 0:
        return UNKNOWN
    lo = int(age // 10) * 10
    return "90+" if lo >= 90 else f"{lo}-{lo + 9}"


def geometry_features(index: pd.DataFrame) -> pd.DataFrame:
    """Disease-unrelated file attributes: original width, height, aspect ratio, format and mode (one-hot)."""
    feats = pd.DataFrame(
        {
            "orig_width": index["orig_width"].astype(float),
            "orig_height": index["orig_height"].astype(float),
            "aspect": index["orig_width"].astype(float) / index["orig_height"].astype(float),
        }
    )
    for col in ("orig_format", "orig_mode"):
        for value in sorted(index[col].astype(str).unique()):
            feats[f"{col}={value}"] = (index[col].astype(str) == value).astype(float)
    return feats.reset_index(drop=True)


def pixel_features(images: np.ndarray) -> pd.DataFrame:
    """Simple statistics of the stored pixels: mean, std, and the fraction of border pixels that are black (< 16)."""
    n, size = len(images), images.shape[-1] if images.ndim == 3 else 0
    width = max(1, size // 16)
    ring = np.ones((size, size), dtype=bool)
    ring[width : size - width, width : size - width] = False
    flat = images.reshape(n, -1).astype(np.float64)
    return pd.DataFrame(
        {
            "mean": flat.mean(axis=1) if n else [],
            "std": flat.std(axis=1) if n else [],
            "border_black": (images[:, ring] < 16).mean(axis=1) if n else [],
        }
    )


def shortcut_aucs(features: dict[str, pd.DataFrame], y, groups, seed: int, folds: int = 5) -> dict:
    """Cross-validated ROC AUCs of a depth-3 decision tree predicting the label from each table of
    `features` ({name: table}) alone.

    Folds are StratifiedGroupKFold by patient, the same for every table (they depend on the labels
    and patients only, and sklearn's splitter, a Python loop over patients, is the slow part);
    AUCs are on the pooled out-of-fold probabilities. Returns {name: {"auc": binary AUC or
    one-vs-rest macro AUC, "per_class": {class: one-vs-rest AUC}}}, each None when there are too
    few patients to fold.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.tree import DecisionTreeClassifier

    y, groups = np.asarray(y), np.asarray(groups)
    classes = np.unique(y)
    n_splits = 0 if len(classes) < 2 else min(int(folds), min(len(np.unique(groups[y == c])) for c in classes))
    if n_splits < 2:
        return dict.fromkeys(features)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    splits = list(splitter.split(np.zeros(len(y)), y, groups))  # X: only its row count is read
    out = {}
    for name, table in features.items():
        X = np.asarray(table, dtype=np.float64)
        proba = np.zeros((len(y), len(classes)))
        for train, test in splits:
            tree = DecisionTreeClassifier(max_depth=3, min_samples_leaf=5, random_state=seed).fit(X[train], y[train])
            proba[np.ix_(test, np.searchsorted(classes, tree.classes_))] = tree.predict_proba(X[test])
        per_class = {c.item(): float(roc_auc_score(y == c, proba[:, k])) for k, c in enumerate(classes)}
        auc = per_class[classes[1].item()] if len(classes) == 2 else float(np.mean(list(per_class.values())))
        out[name] = {"auc": auc, "per_class": per_class}
    return out


def _counts(series: pd.Series) -> dict:
    return {str(k): int(v) for k, v in series.value_counts().sort_index().items()}


def _summary(values: pd.Series) -> dict:
    values = values.astype(float)
    return {
        k: round(float(f(values)), 4)
        for k, f in (("min", np.min), ("median", np.median), ("mean", np.mean), ("max", np.max))
    }


def collection_facts(index: pd.DataFrame, features: dict, described: dict, seed: int, folds: int = 5) -> dict:
    """Per collection ({name: {age_group, kind, citation, license}}): images, patients, images per
    class, original sizes and formats, age groups (per-image ages where known, else the definition's),
    and how well each set of `features` ({name: table}, e.g. geometry/format, pixel statistics)
    alone tells it from the other collections."""
    facts = {}
    for name, info in described.items():
        mine = (index["source"] == name).to_numpy()
        rows, ages = index[mine], index.loc[mine, "age"].astype(float)
        separable = 0 < mine.sum() < len(index)
        vs_rest = (
            shortcut_aucs(features, mine.astype(int), index["patient_id"], seed, folds)
            if separable
            else dict.fromkeys(features)
        )
        facts[name] = {
            "images": int(mine.sum()),
            "patients": int(rows["patient_id"].nunique()),
            "classes": _counts(rows["label"]),
            "width": _summary(rows["orig_width"]) if len(rows) else None,
            "height": _summary(rows["orig_height"]) if len(rows) else None,
            "format": _counts(rows["orig_format"]),
            "mode": _counts(rows["orig_mode"]),
            "age_group": info.get("age_group"),
            "ages": {
                f"adult (>= {ADULT_AGE})": int((ages >= ADULT_AGE).sum()),
                f"child (< {ADULT_AGE})": int((ages < ADULT_AGE).sum()),
                UNKNOWN: int(ages.isna().sum()),
            },
            "shortcut_auc_vs_rest": {k: None if r is None else r["auc"] for k, r in vs_rest.items()},
            **{k: info.get(k) for k in ("kind", "citation", "license")},
        }
    return facts


def _collection_notes(df: pd.DataFrame, described: dict) -> list[str]:
    """Collections whose images carry no age: what their definition says about the patients."""
    notes = []
    for name, info in described.items():
        rows = df[df["source"] == name]
        if len(rows) and info.get("age_group") and rows["age"].isna().all():
            notes.append(
                f"{name} images have no age or sex in their source: the patients are {info['age_group']} "
                "per the dataset's description, recorded here as unknown"
            )
    return notes


def audit(
    index: pd.DataFrame,
    images: np.ndarray,
    classes: list[str],
    seed: int,
    folds: int = 5,
    described: dict | None = None,
) -> dict:
    """What the curated set is made of: counts by class and attribute, original geometry per class,
    the shortcut AUCs (label predicted from geometry/format, or from pixel statistics, alone) and,
    for the collections `described` ({name: {age_group, kind, citation, license}}), their facts."""
    df = index.assign(age_band=[age_band(a) for a in index["age"]])
    strata = (
        df.groupby(["label", "source", "view", "sex", "age_band"])
        .size()
        .rename("images")
        .reset_index()
        .sort_values(["label", "source", "view", "sex", "age_band"])
    )
    by_attribute = {
        col: {c: _counts(df.loc[df["label"] == c, col]) for c in classes}
        for col in ("source", "view", "sex", "age_band")
    }
    geometry = {}
    for c in classes:
        rows = df[df["label"] == c]
        if rows.empty:
            continue
        geometry[c] = {
            "width": _summary(rows["orig_width"]),
            "height": _summary(rows["orig_height"]),
            "aspect": _summary(rows["orig_width"] / rows["orig_height"]),
            "format": _counts(rows["orig_format"]),
            "mode": _counts(rows["orig_mode"]),
        }
    features = {"geometry_format": geometry_features(df), "pixel_stats": pixel_features(images)}
    results = shortcut_aucs(features, df["y"], df["patient_id"], seed, folds)
    aucs = {k: (None if r is None else round(r["auc"], 4)) for k, r in results.items()}
    per_class = {
        k: ({} if r is None or len(classes) < 3 else {classes[int(c)]: round(v, 4) for c, v in r["per_class"].items()})
        for k, r in results.items()
    }
    what = {
        "geometry_format": "original width, height, aspect ratio, file format and mode",
        "pixel_stats": "mean and std of intensity and the black fraction of the border of the stored pixels",
    }
    shortcuts = []
    for k, auc in aucs.items():
        flagged = {c: v for c, v in per_class[k].items() if v >= SHORTCUT_AUC_WARN}
        if auc is not None and auc >= SHORTCUT_AUC_WARN:
            target, value = "the label", auc
        elif flagged:
            target, value = f"{max(flagged, key=flagged.get)} vs rest", max(flagged.values())
        else:
            continue
        shortcuts.append(
            {
                "features": k,
                "auc": value,
                "target": target,
                "warning": f"{what[k]} alone predict {target} (cross-validated ROC AUC {value:.3f} >= "
                f"{SHORTCUT_AUC_WARN}): a model can learn the source instead of the disease",
            }
        )
    sources = df.groupby("label")["source"].unique()
    notes = _collection_notes(df, described or {})
    if len(sources) > 1 and all(len(s) == 1 for s in sources) and len({s[0] for s in sources}) == len(sources):
        notes.append("each class comes from a single source: source and label are fully confounded")
    multi = df.groupby("patient_id")["label"].nunique()
    return {
        "classes": classes,
        "images": int(len(df)),
        "patients": int(df["patient_id"].nunique()),
        "per_class": {c: int((df["label"] == c).sum()) for c in classes},
        "patients_per_class": {c: int(df.loc[df["label"] == c, "patient_id"].nunique()) for c in classes},
        "patients_in_several_classes": int((multi > 1).sum()),
        "strata": strata.to_dict(orient="records"),
        "by_attribute": by_attribute,
        "geometry": geometry,
        "shortcut_auc": aucs,
        "shortcut_auc_per_class": per_class,
        "shortcut_auc_method": f"depth-3 decision tree, StratifiedGroupKFold by patient ({folds} folds, seed {seed}), "
        "pooled out-of-fold ROC AUC (one-vs-rest macro for 3 classes, and each class "
        "one-vs-rest); a warning when either reaches " + str(SHORTCUT_AUC_WARN),
        "shortcuts": shortcuts,
        "notes": notes,
        "collections": collection_facts(df, features, described or {}, seed, folds),
    }


def collection_markdown(facts: dict) -> list[str]:
    """Markdown lines: one row per collection (its facts), then each one's citation and license."""
    if not facts:
        return []
    auc = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "## Collections",
        "",
        "| collection | images | patients | classes | width (min/median/max) | formats | ages | "
        "shortcut AUC vs the rest (geometry / pixels) |",
        "|---|---:|---:|---|---|---|---|---|",
    ]
    for name, f in facts.items():
        width = "n/a" if not f["width"] else f"{f['width']['min']:g} / {f['width']['median']:g} / {f['width']['max']:g}"
        ages = ", ".join(f"{k} {v}" for k, v in f["ages"].items() if v)
        ages = (
            f"{f['age_group']} (per the source)"
            if f.get("age_group") and not any(v for k, v in f["ages"].items() if k != UNKNOWN)
            else ages
        )
        lines.append(
            f"| {name} | {f['images']} | {f['patients']} | "
            + ", ".join(f"{k} {v}" for k, v in f["classes"].items())
            + f" | {width} | "
            + ", ".join(f"{k} {v}" for k, v in f["format"].items())
            + f" | {ages} | {auc(f['shortcut_auc_vs_rest']['geometry_format'])} / "
            f"{auc(f['shortcut_auc_vs_rest']['pixel_stats'])} |"
        )
    lines += [""] + [
        f"- **{name}**: {f.get('citation') or 'no citation given'}; license: {f.get('license') or 'not given'}"
        for name, f in facts.items()
    ]
    return lines + [""]


def _lost(by_collection: dict[str, int]) -> str:
    """The collections that lost images to exact copies kept in a collection listed before them."""
    if not by_collection:
        return ""
    said = ", ".join(f"{name} {n}" for name, n in by_collection.items())
    return f"; removed from {said} (each copy kept in the collection listed first in data.collections)"


def audit_markdown(report: dict) -> str:
    """A short human-readable summary of audit.json."""
    classes = report["classes"]
    lines = [
        "# Curated data audit",
        "",
        f"task `{report['config']['task']}`, store_size {report['config']['store_size']}, "
        f"resize `{report['config']['resize']}`, collections {report['config']['collections']}, "
        f"views {report['config']['views']}",
        "",
        "| class | images | patients |",
        "|---|---:|---:|",
    ]
    lines += [f"| {c} | {report['per_class'][c]} | {report['patients_per_class'][c]} |" for c in classes]
    lines += [f"| total | {report['images']} | {report['patients']} |", ""]
    lines += collection_markdown(report.get("collections") or {})
    lines += ["## By attribute", ""]
    for col, per_class in report["by_attribute"].items():
        cells = "; ".join(f"{c}: " + ", ".join(f"{k} {v}" for k, v in per_class[c].items()) for c in classes)
        lines.append(f"- **{col}**: {cells}")
    lines += [
        "",
        "## Original geometry",
        "",
        "| class | width (min/median/max) | height | aspect | formats | modes |",
        "|---|---|---|---|---|---|",
    ]
    for c, g in report["geometry"].items():
        span = lambda s: f"{s['min']:g} / {s['median']:g} / {s['max']:g}"  # noqa: E731
        lines.append(
            f"| {c} | {span(g['width'])} | {span(g['height'])} | {span(g['aspect'])} | "
            + ", ".join(f"{k} {v}" for k, v in g["format"].items())
            + " | "
            + ", ".join(f"{k} {v}" for k, v in g["mode"].items())
            + " |"
        )
    d, sel = report["dedupe"], report["selection"]
    lines += [
        "",
        "## Cleaning",
        "",
        f"- records selected: {sel['records']}; missing files: {len(sel['missing_files'])}; "
        f"records sharing a file: {sel['records_sharing_a_file']}",
        f"- exact duplicates removed: {d['exact_duplicates_removed']} ({len(d['exact_duplicate_groups'])} groups)"
        + _lost(d.get("exact_duplicates_removed_from", {})),
        f"- near-duplicate groups (phash distance <= {report['config']['phash_distance']}): "
        f"{len(d['near_duplicate_groups'])} ({d['near_duplicate_images']} images), patients merged: "
        f"{d['patients_merged']}",
        f"- cross-class conflicts dropped: {len(d['cross_class_conflicts'])} "
        f"({d['cross_class_images_dropped']} images)",
        f"- probe images (the collection's other findings, for the same-source probe): "
        f"{report['probe']['images']} (near-duplicates of curated images dropped: "
        f"{report['probe']['near_duplicates_of_curated_dropped']})",
        "",
        "## Shortcuts",
        "",
        f"Method: {report['shortcut_auc_method']}.",
        "",
    ]
    for k, v in report["shortcut_auc"].items():
        ovr = "".join(f"; {c} vs rest {a:.3f}" for c, a in report["shortcut_auc_per_class"].get(k, {}).items())
        lines.append(f"- {k}: AUC {'n/a' if v is None else f'{v:.3f}'}{ovr}")
    lines += [""] + [f"> **WARNING**: {s['warning']}" for s in report["shortcuts"]]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines).rstrip() + "\n"
