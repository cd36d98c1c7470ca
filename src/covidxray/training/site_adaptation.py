"""Site adaptation from unlabeled images: test-time feature alignment on the head's input.

A hospital's scanners shift the frozen backbone's pooled features (what the head reads) away from
those of the training collections, and the head's decision surface with them. In the spirit of
AdaBN (Li et al. 2016, "Revisiting batch normalization for practical domain adaptation"), a site's
pooled features are standardized to the training set's statistics, per feature:

    x' = (x - site_mean) / site_std * train_std + train_mean

No label is needed: the site's mean and std come from its unlabeled images. The map is affine and
the head's first layer (head_dense) is linear before its ReLU, so the map is folded into that
layer's kernel and bias (`fold`): the adapted model is a model of the same structure whose head
reads aligned features, and every consumer (predict, validate, the served pyfunc model, Grad-CAM,
the feature store's head on pooled tables) applies the alignment without knowing of it.

The training statistics are written by the train stage beside model.keras (STATS_FILE); an adapted
model folder holds them too, with the site's (SITE_STATS_FILE). Both: float32 (2, D), rows mean
and std. A feature the site never varies (std ~ 0) is only shifted, not scaled.

Caveat: standardizing assumes the site's mix of classes is the training set's; a site with far
fewer positives shifts the mean towards its negatives (the loco stage measures what it does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covidxray import CovidXrayError

STATS_FILE = "feature_stats.npy"  # the training set's pooled-feature mean and std, beside model.keras
SITE_STATS_FILE = "site_feature_stats.npy"  # the site's, in an adapted model folder
MIN_STD = 1e-6  # a site std below this: the feature is shifted only


def feature_stats(features: np.ndarray) -> np.ndarray:
    """float32 (2, D): per-feature mean and (population) std of pooled features (N, D)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise CovidXrayError(f"feature statistics need a non-empty (N, D) table, got shape {x.shape}")
    return np.stack([x.mean(axis=0), x.std(axis=0)]).astype(np.float32)


def alignment(train: np.ndarray, site: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) with scale * x + shift mapping the site's statistics onto the training set's."""
    train, site = np.asarray(train, np.float64), np.asarray(site, np.float64)
    if train.shape != site.shape or train.ndim != 2 or train.shape[0] != 2:
        raise CovidXrayError(f"feature statistics differ in shape: training {train.shape}, site {site.shape}")
    flat = site[1] < MIN_STD
    scale = np.where(flat, 1.0, train[1] / np.where(flat, 1.0, site[1]))
    return scale, train[0] - scale * site[0]


def fold(weights: list[np.ndarray], scale: np.ndarray, shift: np.ndarray) -> list[np.ndarray]:
    """The head's weights [kernel, bias, ...] (head_dense first) reading scale * x + shift:
    kernel rows scaled, shift @ kernel added to the bias; the other layers' weights unchanged."""
    kernel, bias, *rest = weights
    kernel64 = np.asarray(kernel, np.float64)
    new_kernel = (scale[:, None] * kernel64).astype(np.asarray(kernel).dtype)
    new_bias = (np.asarray(bias, np.float64) + shift @ kernel64).astype(np.asarray(bias).dtype)
    return [new_kernel, new_bias, *rest]


def adapt_model(model, train: np.ndarray, site: np.ndarray) -> None:
    """Fold the alignment of `site` onto `train` statistics into the model's head_dense, in place."""
    layer = model.get_layer("head_dense")
    layer.set_weights(fold(layer.get_weights(), *alignment(train, site)))


def read_stats(path: Path, what: str) -> np.ndarray:
    """A (2, D) statistics file, or a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise CovidXrayError(f"{what} not found: {path}")
    try:
        stats = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CovidXrayError(f"cannot read {what} {path}: {' '.join(str(err).split())[:200]}") from None
    if stats.ndim != 2 or stats.shape[0] != 2 or not np.isfinite(stats).all():
        raise CovidXrayError(f"{path}: {what} must be a finite (2, D) array (mean, std), got shape {stats.shape}")
    return stats


def write_stats(path: Path, stats: np.ndarray) -> None:
    """Save (2, D) statistics as .npy (no time stamp: the same values give the same bytes)."""
    np.save(Path(path), np.asarray(stats, dtype=np.float32), allow_pickle=False)
