"""Shortcut probes: does a model detect COVID-19, or the collection an X-ray came from?

- same source, other finding: the share of the COVID-19 collection's non-COVID adult X-rays
  (other pneumonias, ARDS, no finding) that the model calls covid. A model that learnt the
  collection calls most of them covid; one that learnt the disease calls few.
- shortcut AUCs: how well image geometry/format or simple pixel statistics alone separate the
  classes of a set (the curation audit's measure), for the training and the external set.
- feature collection AUC: within one class, how well the model's own penultimate features
  separate the collections (cross-validated logistic regression, grouped by patient). Near 0.5:
  the features do not encode the source; near 1: they do, and decisions can ride on it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidxray.data import audit
from covidxray.training.extraction import probabilities
from covidxray.networks.inference import decide

FEATURE_LAYER = "head_dense"  # the head's last hidden layer (the mlp head's; the linear head: head_flatten)
PROBE_FOLDS = 5


def same_source_probe(model, meta: dict, images: np.ndarray, frame: pd.DataFrame, store=None) -> dict:
    """Share of the probe images (model inputs, rows of `frame` with a `finding`) labelled as the
    positive class at the model's saved threshold, overall and per finding."""
    if len(frame) == 0:
        return {"images": 0, "labelled_covid": None, "share_labelled_covid": None, "per_finding": {}}
    probs = probabilities(model, images, len(meta["classes"]), store=store)
    positive = decide(probs, meta["threshold"]) == len(meta["classes"]) - 1
    per_finding = {
        str(f): {"images": int(len(rows)), "share_labelled_covid": float(positive[rows].mean())}
        for f, rows in frame.reset_index(drop=True).groupby("finding").indices.items()
    }
    return {
        "images": int(len(frame)),
        "labelled_covid": int(positive.sum()),
        "share_labelled_covid": float(positive.mean()),
        "per_finding": per_finding,
    }


def shortcut_aucs(frame: pd.DataFrame, stored: np.ndarray, seed: int) -> dict:
    """The audit's shortcut AUCs (geometry/format, pixel statistics) for the label of one set."""
    y = frame["label"].astype("category").cat.codes.to_numpy()
    features = {"geometry_format": audit.geometry_features(frame), "pixel_stats": audit.pixel_features(stored)}
    found = audit.shortcut_aucs(features, y, frame["patient_id"], seed)
    return {name: None if result is None else float(result["auc"]) for name, result in found.items()}


def penultimate_features(model, images: np.ndarray, batch_size: int = 64, store=None) -> np.ndarray:
    """The model's head features (layer `head_dense`; `head_flatten` for a linear head) for model
    inputs (N, S, S) uint8; a frozen backbone's features come from the feature store when one is given."""
    import keras

    from covidxray.training import extraction

    layer = FEATURE_LAYER if FEATURE_LAYER in {layer.name for layer in model.layers} else "head_flatten"
    if store is not None and extraction.is_frozen(model):
        features = extraction.backbone_features(model, np.asarray(images, dtype=np.uint8), store, label="probe")
        return extraction.head_outputs(model, features, until=layer).reshape(len(images), -1)
    extractor = keras.Model(model.inputs, model.get_layer(layer).output)
    x = np.asarray(images, dtype=np.float32)[..., None]
    return np.asarray(extractor.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64).reshape(len(x), -1)


def collection_auc(features: np.ndarray, collection, groups, seed: int) -> float | None:
    """Cross-validated ROC AUC of a logistic regression telling two collections apart from
    `features` (folds grouped by patient); None when there are too few patients of either."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    collection, groups = np.asarray(collection), np.asarray(groups)
    names = np.unique(collection)
    if len(names) != 2:
        return None
    y = (collection == names[1]).astype(int)
    n_splits = min(PROBE_FOLDS, *(len(np.unique(groups[y == k])) for k in (0, 1)))
    if n_splits < 2:
        return None
    scores = np.zeros(len(y))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for fit, held in splitter.split(features, y, groups):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        scores[held] = clf.fit(features[fit], y[fit]).predict_proba(features[held])[:, 1]
    return float(roc_auc_score(y, scores))


def feature_collection_aucs(model, images: np.ndarray, frame: pd.DataFrame, seed: int, store=None) -> dict:
    """Per class with images of two collections in `frame`: {class: {collections, images, auc}}."""
    return collection_aucs_of(penultimate_features(model, images, store=store), frame, seed)


def collection_aucs_of(features: np.ndarray, frame: pd.DataFrame, seed: int) -> dict:
    """feature_collection_aucs on given features (one row per row of `frame`)."""
    out = {}
    for label, rows in frame.reset_index(drop=True).groupby("label").indices.items():
        names = sorted(frame["source"].iloc[rows].unique())
        if len(names) != 2:
            continue
        auc = collection_auc(features[rows], frame["source"].iloc[rows], frame["patient_id"].iloc[rows], seed)
        out[str(label)] = {"collections": names, "images": int(len(rows)), "auc": auc}
    return out


def per_source(frame: pd.DataFrame, predicted, classes: list[str]) -> dict:
    """Per (class, collection): images and the share predicted correctly at the saved threshold,
    i.e. sensitivity for each source of the positive class, specificity for the others' sources."""
    positive = classes[-1]
    called = np.asarray(predicted) == positive
    out = {}
    for (label, source), rows in frame.reset_index(drop=True).groupby(["label", "source"]).indices.items():
        name = "sensitivity" if label == positive else "specificity"
        share = called[rows].mean() if label == positive else (~called[rows]).mean()
        out[f"{label}/{source}"] = {"images": int(len(rows)), name: float(share)}
    return out
