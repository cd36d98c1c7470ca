"""Out-of-distribution flag: is an image like the X-rays the model was trained on?

The score is the Mahalanobis distance of the image's pooled backbone features (what the head
reads: the model's head_flatten output) to the training images' features: their mean and a
Ledoit-Wolf shrunk covariance, fitted on the final model's training rows by the train stage. The
threshold is the (1 - rate) quantile of held-out training images' distances (each CV fold's
validation rows, measured against a fit on the other folds' rows), so about `rate` of images like
the training ones are flagged (the stated false-alarm rate). Stored beside the model as ood.npz
(mean, precision, threshold, rate), written with deterministic bytes; a model folder without it
predicts as before, its ood columns empty.

With LiteRT (networks/litert.py) the features are model.tflite's second output (`with_features`
is what the train stage converts), computed in the same pass as the probabilities, so a LiteRT
model is scored without TensorFlow. Models trained before kept a LiteRT feature model in ood.npz
(features_tflite), still read; a Keras model runs the Keras sub-model.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OOD_FILE = "ood.npz"
OOD_LABEL = "out-of-distribution"


@dataclass
class Detector:
    """The training features' mean (D,) and precision matrix (D, D), the distance threshold and
    the false-alarm rate it was set at."""

    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    rate: float
    lite: bytes | None = None  # models trained before model.tflite had a features output: their LiteRT feature model

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of `features` (N, D) to the training mean."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", centred, self.precision, centred), 0.0))


def fit_gaussian(features: np.ndarray) -> Detector:
    """Mean and Ledoit-Wolf shrunk precision of `features` (N, D); no threshold yet. The shrunk
    covariance is positive definite, so its inverse comes from a Cholesky factor, not from the
    eigendecomposition sklearn's pinvh does (D = 2,064: 1.2 s instead of 7.9 s a fit; the
    distances agree to 1e-15)."""
    from scipy.linalg import cho_factor, cho_solve
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf(store_precision=False).fit(np.asarray(features, dtype=np.float64))
    precision = cho_solve(cho_factor(lw.covariance_), np.eye(lw.covariance_.shape[0]))
    return Detector(lw.location_, (precision + precision.T) / 2, float("nan"), float("nan"))


def fit(features: np.ndarray, fold_of: np.ndarray, folds, rate: float) -> Detector:
    """The detector of the training rows' `features`: fitted on all rows, its threshold the
    (1 - rate) quantile of the held-out distances (each fold's rows against a fit on the others)."""
    if not 0 < rate < 1:
        raise ValueError(f"false-alarm rate must lie in (0, 1), got {rate}")
    fold_of = np.asarray(fold_of)
    held = [
        fit_gaussian(features[fold_of != k]).distances(features[fold_of == k])
        for k in folds
        if (fold_of == k).any() and (fold_of != k).sum() > 1
    ]
    if not held:
        raise ValueError("the out-of-distribution threshold needs at least two folds with rows")
    detector = fit_gaussian(features)
    detector.threshold = float(np.quantile(np.concatenate(held), 1.0 - rate))
    detector.rate = float(rate)
    return detector


def save(detector: Detector, path: Path) -> Path:
    """Write the detector as an .npz file (np.load reads it) with fixed timestamps: the same
    detector gives the same bytes (DVC outputs). Stored, not deflated: a precision matrix of
    floats compressed by 3.5% (34.1 -> 32.9 MB for the default's), at ~2.4 s a write."""
    arrays = {
        "mean": detector.mean,
        "precision": detector.precision,
        "threshold": np.float64(detector.threshold),
        "rate": np.float64(detector.rate),
    }
    if detector.lite is not None:
        arrays["features_tflite"] = np.frombuffer(detector.lite, dtype=np.uint8)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            kept = array if name == "features_tflite" else np.asarray(array, dtype=np.float64)
            np.lib.format.write_array(buffer, kept, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))  # stored: ZipInfo's default
            archive.writestr(info, buffer.getvalue())
    return Path(path)


def load(path: Path) -> Detector | None:
    """The detector saved at `path`, or None when there is none (models from before the flag)."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as found:
        lite = found["features_tflite"].tobytes() if "features_tflite" in found.files else None
        return Detector(found["mean"], found["precision"], float(found["threshold"]), float(found["rate"]), lite)


def with_features(model):
    """The classifier with its pooled features as a second output (named as model.tflite's
    signature outputs: litert.PROBABILITIES, litert.FEATURES): what the train stage converts."""
    import keras

    from covidxray.networks import builders, litert

    outputs = {litert.PROBABILITIES: model.output, litert.FEATURES: model.get_layer(builders.POOLED_LAYER).output}
    return keras.Model(model.input, outputs, name=f"{model.name}_with_features")


def feature_model(model):
    """The Keras sub-model of `model` from its input to its pooled features (builders.pooled_model). A LiteRT
    model (litert.LiteModel: the classifier only) is scored with the Keras model whose model.keras
    bytes it carries, loaded once: the detector needs the features, not a second LiteRT output."""
    from covidxray.networks import builders
    from covidxray.networks.litert import LiteModel

    if isinstance(model, LiteModel):
        if getattr(model, "ood_features", None) is None:
            model.ood_features = feature_model(_keras_of(model))
        return model.ood_features
    return builders.pooled_model(model)


def _keras_of(lite):
    """The Keras model of a LiteRT model's model.keras bytes (a one-line error where it has none)."""
    import tempfile

    from covidxray import CovidXrayError
    from covidxray.networks.model_file import load

    if lite.keras is None:
        raise CovidXrayError(f"{lite.source}: its model.keras is needed for the out-of-distribution score")
    with tempfile.TemporaryDirectory(prefix="covidxray-ood-") as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(lite.keras)
        return load(path)


def features(model, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    """Pooled features (N, D) of uint8 model inputs (N, S, S), fed as raw 0..255 pixels."""
    x = np.asarray(pixels, dtype=np.float32)[..., None]
    return np.asarray(feature_model(model).predict(x, batch_size=batch, verbose=0), dtype=np.float64)


def lite_features(detector: Detector, model, pixels: np.ndarray) -> np.ndarray:
    """features(), for a LiteRT model from its features output, or from the LiteRT feature model
    of an older detector: no TensorFlow either way."""
    from covidxray.networks.litert import LiteModel

    x = np.asarray(pixels, dtype=np.float32)[..., None]
    if isinstance(model, LiteModel) and model.has_features:
        return np.asarray(model.features(x), dtype=np.float64)
    if not isinstance(model, LiteModel) or detector.lite is None:
        return features(model, pixels)
    return np.asarray(LiteModel(detector.lite, OOD_FILE).predict(x), dtype=np.float64)


def flag(detector: Detector | None, model, pixels: np.ndarray, features=None) -> tuple[list, list]:
    """(ood_score, ood) per image: the distance and whether it is above the threshold; None each
    without a detector. `features`: the images' pooled features where the pass that predicted them
    gave them (inference.outputs), else computed here."""
    if detector is None or len(pixels) == 0:
        return [None] * len(pixels), [None] * len(pixels)
    found = lite_features(detector, model, pixels) if features is None else features
    scores = detector.distances(found)
    return [float(s) for s in scores], [bool(s > detector.threshold) for s in scores]
