"""curate stage: the labelled image set the models train on (data/curated/).

Classes come from two sources: `ieee8023` (the COVID-19 image collection in data/raw, chosen by
metadata) and `kermany` (the Kaggle/Mendeley NORMAL and viral PNEUMONIA X-rays in data/external).
Every image is decoded once to grayscale at data.image_size, exact duplicates are removed,
near-duplicates are tied to one patient group, and an audit (audit.json, audit.md) records what
the set is made of and whether something other than disease (image geometry, format) gives the
label away. Outputs: images.npy, index.csv, classes.json (see images.py), audit.json, audit.md.
"""
from __future__ import annotations

import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray import images as imgs
from covidxray.outputs import json_safe, replace_dir

TASKS = {"binary": ["normal", "covid"], "three_class": ["normal", "pneumonia", "covid"]}
BALANCE = ("none", "undersample")
COLLECTION, KAGGLE = "ieee8023", "kermany"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
COLUMNS = [
    "image_id", "label", "y", "patient_id", "source", "file", "finding", "view", "sex", "age",
    "orig_width", "orig_height", "orig_format", "orig_mode", "sha256", "phash",
]
UNKNOWN = "unknown"
SHORTCUT_AUC_WARN = 0.8
# Infectious pneumonias of the collection (bacterial, viral, fungal); COVID-19 is matched first.
INFECTIOUS = re.compile(
    r"pneumonia|bacterial|viral|streptococc|staphylococc|klebsiella|pneumocystis|\bsars\b|\bmers\b"
    r"|legionella|mycoplasma|e\.\s?coli|varicella|influenza|chlamydophila|chlamydia|aspergill"
    r"|nocardia|herpes",
    re.IGNORECASE,
)
NOT_INFECTIOUS = re.compile(r"lipoid", re.IGNORECASE)
KAGGLE_NORMAL = re.compile(r"^(?:NORMAL2-)?(IM-\d+)-")
KAGGLE_PERSON = re.compile(r"^(person\d+)_(?:virus|bacteria)_\d+")


def check_params(task: str, resize: str, balance: str, image_size, phash_distance, views) -> None:
    """Reject unknown or impossible data.* values before any work, naming the key and allowed values."""
    if task not in TASKS:
        raise CovidXrayError(f"data.task must be one of {', '.join(TASKS)}, got {task!r}")
    imgs.check_resize_policy(resize)
    if balance not in BALANCE:
        raise CovidXrayError(f"data.balance must be one of {', '.join(BALANCE)}, got {balance!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise CovidXrayError(f"data.image_size must be an integer >= 8, got {image_size!r}")
    if not isinstance(phash_distance, int) or isinstance(phash_distance, bool) or not 0 <= phash_distance <= 64:
        raise CovidXrayError(f"data.phash_distance must be an integer in 0..64, got {phash_distance!r}")
    if not views or any(not isinstance(v, str) for v in views):
        raise CovidXrayError(f"data.views must be a non-empty list of view names, got {views!r}")


def collection_label(finding: str, task: str) -> str | None:
    """The class of a collection finding, or None when it belongs to no class of `task`.

    covid: the finding names COVID-19 (also "COVID-19, ARDS"). pneumonia (three_class only):
    an infectious pneumonia, bacterial, viral or fungal (Pneumonia, Streptococcus, Klebsiella,
    Pneumocystis, SARS, Legionella, Mycoplasma, E.Coli, Varicella, Influenza, Chlamydophila,
    Bacterial, ...). Excluded: No Finding, ARDS alone (a syndrome, not an infection) and Lipoid
    pneumonia (not infectious).
    """
    finding = str(finding) if isinstance(finding, str) else ""
    if "COVID-19" in finding:
        return "covid"
    if task == "three_class" and INFECTIOUS.search(finding) and not NOT_INFECTIOUS.search(finding):
        return "pneumonia"
    return None


def _sex(value) -> str:
    value = str(value).strip().upper() if isinstance(value, str) else ""
    return value if value in ("M", "F") else UNKNOWN


def select_collection(metadata: pd.DataFrame, views, task: str, raw_dir: Path = Path("data/raw")) -> pd.DataFrame:
    """The collection's X-ray rows of `views` that belong to a class of `task`, as image records."""
    need = {"patientid", "finding", "modality", "view", "filename", "sex", "age"}
    if need - set(metadata.columns):
        raise CovidXrayError(f"metadata.csv lacks columns: {', '.join(sorted(need - set(metadata.columns)))}")
    rows = metadata[(metadata["modality"] == "X-ray") & metadata["view"].isin(list(views))].copy()
    rows["label"] = [collection_label(f, task) for f in rows["finding"]]
    rows = rows[rows["label"].notna()]
    folder = rows["folder"] if "folder" in rows.columns else pd.Series("images", index=rows.index)
    files = [(Path(raw_dir) / str(d) / str(f)).as_posix() for d, f in zip(folder.fillna("images"), rows["filename"])]
    return pd.DataFrame({
        "label": rows["label"].astype(str).to_numpy(),
        "patient_id": [f"{COLLECTION}-{p}" for p in rows["patientid"]],
        "source": COLLECTION,
        "file": files,
        "finding": rows["finding"].astype(str).to_numpy(),
        "view": rows["view"].astype(str).to_numpy(),
        "sex": [_sex(s) for s in rows["sex"]],
        "age": pd.to_numeric(rows["age"], errors="coerce").astype(float).to_numpy(),
    })


def patient_id_from_kaggle_name(name: str) -> str | None:
    """The Kermany patient of a Kaggle file name, prefixed `kermany-`; None if the name has no patient.

    `IM-0587-0001.jpeg` and `NORMAL2-IM-0587-0001-0002.jpeg` -> kermany-IM-0587 (the IM-XXXX part
    is the patient, so both spellings are one patient); `person1261_virus_2147.jpeg` -> kermany-person1261.
    """
    name = Path(name).name
    match = KAGGLE_NORMAL.match(name) or KAGGLE_PERSON.match(name)
    return f"{KAGGLE}-{match.group(1)}" if match else None


def list_external(external_dir: Path, task: str) -> pd.DataFrame:
    """Kermany image records: chest_xray/NORMAL as normal, and chest_xray/PNEUMONIA as pneumonia (three_class)."""
    folders = {"normal": ("NORMAL", "No Finding")}
    if task == "three_class":
        folders["pneumonia"] = ("PNEUMONIA", "Pneumonia (viral)")
    records = []
    for label, (folder, finding) in folders.items():
        directory = Path(external_dir) / "chest_xray" / folder
        if not directory.is_dir():
            raise CovidXrayError(f"external images missing: {directory} (run `dvc pull data.dvc`)")
        for path in sorted(directory.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            patient = patient_id_from_kaggle_name(path.name)
            if patient is None:
                raise CovidXrayError(f"cannot tell the patient of {path} (expected IM-XXXX-... or personNNN_virus_MMM)")
            records.append({
                "label": label, "patient_id": patient, "source": KAGGLE, "file": path.as_posix(),
                "finding": finding, "view": UNKNOWN, "sex": UNKNOWN, "age": np.nan,
            })
    return pd.DataFrame(records, columns=["label", "patient_id", "source", "file", "finding", "view", "sex", "age"])


def assign_image_ids(records: pd.DataFrame) -> pd.Series:
    """`source-stem` per record; the whole file name where two files of a source share a stem."""
    stems = [f"{s}-{Path(f).stem}" for s, f in zip(records["source"], records["file"])]
    names = [f"{s}-{Path(f).name}" for s, f in zip(records["source"], records["file"])]
    files_per_stem = pd.Series(list(records["file"])).groupby(stems).nunique()
    return pd.Series([n if files_per_stem[s] > 1 else s for s, n in zip(stems, names)], index=records.index)


def _decode(file: str, size: int, policy: str) -> dict:
    """Worker: decode one file once; its resized pixels, geometry, sha256 and phash (or the error)."""
    import imagehash
    from PIL import Image

    try:
        gray, info = imgs.read_grayscale(Path(file))
    except CovidXrayError as err:
        return {"file": file, "error": str(err)}
    return {
        "file": file,
        "pixels": imgs.resize(gray, size, policy),
        "orig_width": info["width"], "orig_height": info["height"],
        "orig_format": info["format"], "orig_mode": info["mode"],
        "sha256": info["sha256"], "phash": str(imagehash.phash(Image.fromarray(gray))),
    }


def decode_files(files: list[str], size: int, policy: str, workers: int = 1) -> list[dict]:
    """Decode every file once, in `workers` processes, in order, with a progress bar on stderr."""
    from tqdm import tqdm

    bar = dict(total=len(files), desc="curate: decoding", unit="img", file=sys.stderr, disable=None)
    if workers <= 1 or len(files) < 2:
        return [_decode(f, size, policy) for f in tqdm(files, **bar)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(_decode, files, repeat(size), repeat(policy), chunksize=4), **bar))


class _UnionFind:
    """Disjoint sets whose representative is the smallest member (so merges are order-independent)."""

    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def phash_pairs(phashes: list[str], max_distance: int) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose 64-bit perceptual hashes differ in at most `max_distance` bits."""
    if len(phashes) < 2:
        return []
    bits = np.array([int(h, 16) for h in phashes], dtype=np.uint64)
    dist = np.bitwise_count(bits[:, None] ^ bits[None, :])
    i, j = np.nonzero(np.triu(dist <= max_distance, k=1))
    return list(zip(i.tolist(), j.tolist()))


def dedupe(records: pd.DataFrame, phash_distance: int) -> tuple[pd.DataFrame, dict]:
    """Drop exact duplicates (sha256, keep one), tie near-duplicates (phash) to one patient group,
    and drop every copy of an image found under two classes. Returns the kept records and a report.

    Patients linked by a duplicate or near-duplicate are merged (union-find) into the smallest
    id, so the split never puts copies of one image on both sides.
    """
    df = records.sort_values(["image_id", "patient_id", "file"], kind="stable").reset_index(drop=True)
    patients = _UnionFind()
    conflicts, exact_groups, drop = [], [], set()
    for sha, group in df.groupby("sha256", sort=True):
        if len(group) < 2:
            continue
        entry = {"sha256": sha, "files": sorted(set(group["file"])), "labels": sorted(set(group["label"])),
                 "rows": int(len(group))}
        if group["label"].nunique() > 1:
            conflicts.append({"kind": "exact", **entry})
            drop.update(group.index)
            continue
        for p in group["patient_id"]:
            patients.union(group["patient_id"].iloc[0], p)
        exact_groups.append({**entry, "patients": sorted(set(group["patient_id"]))})
        drop.update(group.index[1:])
    exact_removed = sum(g["rows"] - 1 for g in exact_groups)
    df = df.drop(index=sorted(drop)).reset_index(drop=True)

    images = _UnionFind()
    for i, j in phash_pairs(list(df["phash"]), phash_distance):
        images.union(i, j)
    components: dict[int, list[int]] = {}
    for i in range(len(df)):
        components.setdefault(images.find(i), []).append(i)
    near_groups, drop = [], set()
    for members in components.values():
        if len(members) < 2:
            continue
        group = df.iloc[members]
        entry = {"image_ids": list(group["image_id"]), "labels": sorted(set(group["label"]))}
        if group["label"].nunique() > 1:
            conflicts.append({"kind": "near", **entry})
            drop.update(members)
            continue
        for p in group["patient_id"]:
            patients.union(group["patient_id"].iloc[0], p)
        near_groups.append({**entry, "patients": sorted(set(group["patient_id"]))})
    df = df.drop(index=sorted(drop)).reset_index(drop=True)
    merged = df["patient_id"].map(patients.find)
    report = {
        "exact_duplicates_removed": int(exact_removed),
        "exact_duplicate_groups": exact_groups,
        "near_duplicate_groups": near_groups,
        "near_duplicate_images": int(sum(len(g["image_ids"]) for g in near_groups)),
        "patients_merged": int((merged != df["patient_id"]).groupby(df["patient_id"]).any().sum()),
        "cross_class_conflicts": conflicts,
        "cross_class_images_dropped": int(
            sum(c["rows"] if c["kind"] == "exact" else len(c["image_ids"]) for c in conflicts)
        ),
    }
    df["patient_id"] = merged
    return df, report


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


def build_index(records: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """The index.csv table: contract columns, y from the class order, sorted by class then image_id."""
    df = records.copy()
    df["y"] = df["label"].map({c: i for i, c in enumerate(classes)}).astype(int)
    df["age"] = df["age"].astype(float)
    df = df.sort_values(["y", "image_id"], kind="stable").reset_index(drop=True)
    if df["image_id"].duplicated().any():
        raise CovidXrayError(f"duplicate image ids: {sorted(df.loc[df['image_id'].duplicated(), 'image_id'])[:5]}")
    return df[COLUMNS]


def age_band(age: float) -> str:
    """Ten-year band of an age ('50-59', '90+'), or 'unknown'."""
    if age is None or not np.isfinite(age) or age < 0:
        return UNKNOWN
    lo = int(age // 10) * 10
    return "90+" if lo >= 90 else f"{lo}-{lo + 9}"


def geometry_features(index: pd.DataFrame) -> pd.DataFrame:
    """Disease-unrelated file attributes: original width, height, aspect ratio, format and mode (one-hot)."""
    feats = pd.DataFrame({
        "orig_width": index["orig_width"].astype(float),
        "orig_height": index["orig_height"].astype(float),
        "aspect": index["orig_width"].astype(float) / index["orig_height"].astype(float),
    })
    for col in ("orig_format", "orig_mode"):
        for value in sorted(index[col].astype(str).unique()):
            feats[f"{col}={value}"] = (index[col].astype(str) == value).astype(float)
    return feats.reset_index(drop=True)


def pixel_features(images: np.ndarray) -> pd.DataFrame:
    """Simple statistics of the stored pixels: mean, std, and the fraction of border pixels that are black (< 16)."""
    n, size = len(images), images.shape[-1] if images.ndim == 3 else 0
    width = max(1, size // 16)
    ring = np.ones((size, size), dtype=bool)
    ring[width:size - width, width:size - width] = False
    flat = images.reshape(n, -1).astype(np.float64)
    return pd.DataFrame({
        "mean": flat.mean(axis=1) if n else [],
        "std": flat.std(axis=1) if n else [],
        "border_black": (images[:, ring] < 16).mean(axis=1) if n else [],
    })


def shortcut_aucs(features: pd.DataFrame, y, groups, seed: int, folds: int = 5) -> dict | None:
    """Cross-validated ROC AUCs of a depth-3 decision tree predicting the label from `features` alone.

    Folds are StratifiedGroupKFold by patient; AUCs are on the pooled out-of-fold probabilities.
    Returns {"auc": binary AUC or one-vs-rest macro AUC, "per_class": {class: one-vs-rest AUC}},
    or None when there are too few patients to fold.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.tree import DecisionTreeClassifier

    y, groups = np.asarray(y), np.asarray(groups)
    classes = np.unique(y)
    if len(classes) < 2:
        return None
    n_splits = min(int(folds), min(len(np.unique(groups[y == c])) for c in classes))
    if n_splits < 2:
        return None
    X = np.asarray(features, dtype=np.float64)
    proba = np.zeros((len(y), len(classes)))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train, test in splitter.split(X, y, groups):
        tree = DecisionTreeClassifier(max_depth=3, min_samples_leaf=5, random_state=seed).fit(X[train], y[train])
        proba[np.ix_(test, np.searchsorted(classes, tree.classes_))] = tree.predict_proba(X[test])
    per_class = {c.item(): float(roc_auc_score(y == c, proba[:, k])) for k, c in enumerate(classes)}
    auc = per_class[classes[1].item()] if len(classes) == 2 else float(np.mean(list(per_class.values())))
    return {"auc": auc, "per_class": per_class}


def shortcut_auc(features: pd.DataFrame, y, groups, seed: int, folds: int = 5) -> float | None:
    """The headline of `shortcut_aucs`: binary ROC AUC, or one-vs-rest macro AUC for 3 classes."""
    result = shortcut_aucs(features, y, groups, seed, folds)
    return None if result is None else result["auc"]


def _counts(series: pd.Series) -> dict:
    return {str(k): int(v) for k, v in series.value_counts().sort_index().items()}


def _summary(values: pd.Series) -> dict:
    values = values.astype(float)
    return {k: round(float(f(values)), 4) for k, f in
            (("min", np.min), ("median", np.median), ("mean", np.mean), ("max", np.max))}


def audit(index: pd.DataFrame, images: np.ndarray, classes: list[str], seed: int, folds: int = 5) -> dict:
    """What the curated set is made of: counts by class and attribute, original geometry per class,
    and the shortcut AUCs (label predicted from geometry/format, or from pixel statistics, alone)."""
    df = index.assign(age_band=[age_band(a) for a in index["age"]])
    strata = (df.groupby(["label", "source", "view", "sex", "age_band"]).size()
              .rename("images").reset_index().sort_values(["label", "source", "view", "sex", "age_band"]))
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
            "width": _summary(rows["orig_width"]), "height": _summary(rows["orig_height"]),
            "aspect": _summary(rows["orig_width"] / rows["orig_height"]),
            "format": _counts(rows["orig_format"]), "mode": _counts(rows["orig_mode"]),
        }
    results = {
        "geometry_format": shortcut_aucs(geometry_features(df), df["y"], df["patient_id"], seed, folds),
        "pixel_stats": shortcut_aucs(pixel_features(images), df["y"], df["patient_id"], seed, folds),
    }
    aucs = {k: (None if r is None else round(r["auc"], 4)) for k, r in results.items()}
    per_class = {k: ({} if r is None or len(classes) < 3 else
                     {classes[int(c)]: round(v, 4) for c, v in r["per_class"].items()}) for k, r in results.items()}
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
        shortcuts.append({"features": k, "auc": value, "target": target,
                          "warning": f"{what[k]} alone predict {target} (cross-validated ROC AUC {value:.3f} >= "
                                     f"{SHORTCUT_AUC_WARN}): a model can learn the source instead of the disease"})
    sources = df.groupby("label")["source"].unique()
    notes = []
    if (KAGGLE == df["source"]).any():
        notes.append("kermany images have no age or sex in their source: the patients are children "
                     "(1-5 years) per the dataset's description, recorded here as unknown")
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
    }


def audit_markdown(report: dict) -> str:
    """A short human-readable summary of audit.json."""
    classes = report["classes"]
    lines = ["# Curated data audit", "",
             f"task `{report['config']['task']}`, image_size {report['config']['image_size']}, "
             f"resize `{report['config']['resize']}`, balance `{report['config']['balance']}`, "
             f"views {report['config']['views']}", "",
             "| class | images | patients |", "|---|---:|---:|"]
    lines += [f"| {c} | {report['per_class'][c]} | {report['patients_per_class'][c]} |" for c in classes]
    lines += [f"| total | {report['images']} | {report['patients']} |", "", "## By attribute", ""]
    for col, per_class in report["by_attribute"].items():
        cells = "; ".join(f"{c}: " + ", ".join(f"{k} {v}" for k, v in per_class[c].items()) for c in classes)
        lines.append(f"- **{col}**: {cells}")
    lines += ["", "## Original geometry", "", "| class | width (min/median/max) | height | aspect | formats | modes |",
              "|---|---|---|---|---|---|"]
    for c, g in report["geometry"].items():
        span = lambda s: f"{s['min']:g} / {s['median']:g} / {s['max']:g}"  # noqa: E731
        lines.append(f"| {c} | {span(g['width'])} | {span(g['height'])} | {span(g['aspect'])} | "
                     + ", ".join(f"{k} {v}" for k, v in g["format"].items()) + " | "
                     + ", ".join(f"{k} {v}" for k, v in g["mode"].items()) + " |")
    d, sel = report["dedupe"], report["selection"]
    lines += ["", "## Cleaning", "",
              f"- records selected: {sel['records']}; missing files: {len(sel['missing_files'])}; "
              f"records sharing a file: {sel['records_sharing_a_file']}",
              f"- exact duplicates removed: {d['exact_duplicates_removed']} "
              f"({len(d['exact_duplicate_groups'])} groups)",
              f"- near-duplicate groups (phash distance <= {report['config']['phash_distance']}): "
              f"{len(d['near_duplicate_groups'])} ({d['near_duplicate_images']} images), patients merged: "
              f"{d['patients_merged']}",
              f"- cross-class conflicts dropped: {len(d['cross_class_conflicts'])} "
              f"({d['cross_class_images_dropped']} images)",
              f"- removed by balancing: {report['balance_removed']}", "",
              "## Shortcuts", "", f"Method: {report['shortcut_auc_method']}.", ""]
    for k, v in report["shortcut_auc"].items():
        ovr = "".join(f"; {c} vs rest {a:.3f}" for c, a in report["shortcut_auc_per_class"].get(k, {}).items())
        lines.append(f"- {k}: AUC {'n/a' if v is None else f'{v:.3f}'}{ovr}")
    lines += [""] + [f"> **WARNING**: {s['warning']}" for s in report["shortcuts"]]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def read_metadata(path: Path) -> pd.DataFrame:
    """The collection's metadata.csv."""
    if not Path(path).is_file():
        raise CovidXrayError(f"metadata missing: {path} (run `dvc repro fetch`)")
    return pd.read_csv(path, dtype={"patientid": str, "filename": str, "folder": str})


def main(cfg) -> None:
    """Stage entry: select, decode, deduplicate, balance and audit the images; write data/curated/."""
    data = cfg.data
    task, policy, method = str(data.task), str(data.resize), str(data.balance)
    views = list(data.views) if data.views is not None else []
    size, distance, seed = data.image_size, data.phash_distance, int(cfg.seed)
    check_params(task, policy, method, size, distance, views)
    classes = TASKS[task]
    raw, external, out = Path(cfg.paths.raw), Path(cfg.paths.external), Path(cfg.paths.curated)

    records = pd.concat([select_collection(read_metadata(raw / "metadata.csv"), views, task, raw),
                         list_external(external, task)], ignore_index=True)
    present = records["file"].map(lambda f: Path(f).is_file())
    missing = sorted(set(records.loc[~present, "file"]))
    records = records[present].reset_index(drop=True)
    records["image_id"] = assign_image_ids(records)
    files = sorted(set(records["file"]))
    decoded = decode_files(files, size, policy, workers=min(os.cpu_count() or 1, 8))
    errors = [r["error"] for r in decoded if "error" in r]
    if errors:  # inputs are pinned and verified: an unreadable one is a broken input, not noise
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise CovidXrayError(f"{errors[0]}{more}")
    decoded = {r["file"]: r for r in decoded}
    for col in ("orig_width", "orig_height", "orig_format", "orig_mode", "sha256", "phash"):
        records[col] = [decoded[f][col] for f in records["file"]]
    kept, dedupe_report = dedupe(records, distance)
    balanced = balance(kept, method, seed)
    index = build_index(balanced, classes)
    if index["label"].nunique() < len(classes):
        absent = sorted(set(classes) - set(index["label"]))
        raise CovidXrayError(f"no images left for class(es) {', '.join(absent)}: check data.views and the inputs")
    pixels = np.stack([decoded[f]["pixels"] for f in index["file"]]).astype(np.uint8)

    report = audit(index, pixels, classes, seed)
    report["config"] = {"task": task, "views": views, "image_size": size, "resize": policy,
                        "balance": method, "phash_distance": distance, "seed": seed}
    report["selection"] = {"records": int(len(present)), "missing_files": missing,
                           "records_sharing_a_file": int(records["file"].duplicated().sum())}
    report["dedupe"] = dedupe_report
    report["balance_removed"] = {c: int((kept["label"] == c).sum() - (index["label"] == c).sum()) for c in classes}
    report = json_safe(report, digits=4)

    def write(tmp: Path) -> None:
        imgs.save_curated(tmp, pixels, index, classes)
        (tmp / "audit.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        (tmp / "audit.md").write_text(audit_markdown(report))

    replace_dir(out, write, by="curate")
    if missing:
        print(f"curate: warning: {len(missing)} selected file(s) missing, e.g. {missing[0]}", file=sys.stderr)
    for item in report["shortcuts"]:
        print(f"curate: WARNING: shortcut: {item['warning']}", file=sys.stderr)
    counts = ", ".join(f"{c} {n}" for c, n in report["per_class"].items())
    print(f"curate: wrote {out} ({counts}; {report['patients']} patients)", file=sys.stderr)
