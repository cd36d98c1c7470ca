"""split stage: a held-out test partition and K cross-validation folds, grouped by patient.

Every image of a patient lands in the same partition and fold, so no patient is ever seen in
training and evaluation at once; the proportions of each (class, collection) pair are kept close
to the whole set's (sklearn's StratifiedGroupKFold), so whichever collections `data.sources`
trains on, their test partition and folds are representative. Output: data/splits.csv with image_id, patient_id, label,
partition (cv | test) and fold (0..K-1 for cv, -1 for test).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from covidxray import CovidXrayError
from covidxray.data.images import INDEX_FILE
from covidxray.infra.outputs import replace_dir
from covidxray.settings.split import split_settings

COLUMNS = ["image_id", "patient_id", "label", "partition", "fold"]


def _grouped_folds(labels: pd.Series, groups: pd.Series, n_splits: int, seed: int) -> np.ndarray:
    """Fold number per row: stratified by label, never splitting a group."""
    per_class = groups.groupby(labels).nunique()
    if (per_class < n_splits).any():
        short = ", ".join(f"{c}: {n}" for c, n in per_class.items() if n < n_splits)
        raise CovidXrayError(f"too few patients for {n_splits} groups ({short} patients)")
    fold = np.full(len(labels), -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        fold[held] = k
    return fold


def make_splits(index: pd.DataFrame, test_fraction: float, folds: int, seed: int) -> pd.DataFrame:
    """Assign each image to the test partition or one of `folds` CV folds, grouped by patient.

    The test partition is one of round(1 / test_fraction) stratified patient groups, so its
    share is close to, not exactly, test_fraction.
    """
    index = index.reset_index(drop=True)
    strata = index["label"].astype(str)
    if "source" in index.columns:
        strata = strata + "@" + index["source"].astype(str)
    n_groups = max(2, round(1.0 / float(test_fraction)))
    in_test = _grouped_folds(strata, index["patient_id"], n_groups, seed) == 0
    out = index.loc[:, ["image_id", "patient_id", "label"]].copy()
    out["partition"] = np.where(in_test, "test", "cv")
    out["fold"] = -1
    rest = out.index[~in_test]
    out.loc[rest, "fold"] = _grouped_folds(strata[rest], out.loc[rest, "patient_id"], int(folds), seed)
    return out[COLUMNS]


def main(cfg) -> None:
    """Stage entry: read the curated index, write data/splits.csv."""
    settings = split_settings(cfg)
    index_path = settings.curated / INDEX_FILE
    if not index_path.is_file():
        raise CovidXrayError(f"curated index missing: {index_path} (run `dvc repro curate`)")
    index = pd.read_csv(index_path, dtype={"patient_id": str, "image_id": str})
    splits = make_splits(index, settings.test_fraction, settings.folds, settings.seed)
    out = settings.splits
    replace_dir(out.parent, lambda new: splits.to_csv(new / out.name, index=False), by="split", names=[out.name])
    counts = splits.groupby(["partition", "label"]).size().to_dict()
    print(f"wrote {out}: {len(splits)} images, {splits['patient_id'].nunique()} patients, {counts}")
