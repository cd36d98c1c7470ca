"""Inference on X-ray images: decode the rows a served model receives, the softmax
probabilities, and the label at the threshold saved with the model (decide).

Shared by `covidxray predict` and the MLflow pyfunc model (serving/pyfunc.py), so a file gives the same
answer from the command line, from `mlflow.pyfunc.load_model` and from `mlflow models serve`.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.networks import ood

BATCH_SIZE = 32
# Which model answered, from its metadata (model.json / the logged model): columns of every answer.
IDENTITY = {"model_name": "registered_model", "model_version": "registered_version", "model_run_id": "mlflow_run_id"}
# The out-of-distribution flag (networks/ood.py; meta["ood"]: the detector loaded with the model, if any).
OOD_COLUMNS = {"ood_score": "double", "ood": "boolean"}


def _row_pixels(image, pixels, row: int) -> np.ndarray:
    """The 2-D uint8 grayscale image of one input row (`image` bytes or base64, or `pixels`)."""
    from covidxray.data.images import check_xray, decode_grayscale

    given = [v is not None and not (isinstance(v, float) and np.isnan(v)) for v in (image, pixels)]
    if given[0] == given[1]:
        raise CovidXrayError(f"row {row}: give exactly one of image (encoded file bytes) or pixels (2-D array)")
    if given[0]:
        if isinstance(image, str):
            try:
                image = base64.b64decode(image, validate=True)
            except ValueError:
                raise CovidXrayError(f"row {row}: image is text but not base64") from None
        return decode_grayscale(bytes(image), f"row {row}")[0]
    try:
        array = np.array([np.asarray(line, dtype=float) for line in pixels], dtype=float)
    except (TypeError, ValueError):
        raise CovidXrayError(f"row {row}: pixels must be a 2-D array of numbers (rows of equal length)") from None
    if array.ndim != 2 or array.size == 0:
        raise CovidXrayError(f"row {row}: pixels must be a non-empty 2-D grayscale array, got shape {array.shape}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise CovidXrayError(f"row {row}: pixels must lie in 0..255")
    gray = np.rint(array).astype(np.uint8)
    check_xray(gray, f"row {row} (pixels)")  # the same limits as a decoded file
    return gray


def decode_rows(model_input, meta: dict) -> np.ndarray:
    """(N, S, S) uint8 model inputs from the input rows, by the input steps saved with the model
    (meta: image_size, resize, store_size, normalize, crop_border), as in training."""
    from covidxray.data.images import prepare_for, resize

    if not isinstance(model_input, pd.DataFrame) or not {"image", "pixels"} & set(model_input.columns):
        raise CovidXrayError("input must be a table with a column image (encoded file) or pixels (2-D array)")
    images, pixels = (model_input[c] if c in model_input else [None] * len(model_input) for c in ("image", "pixels"))
    store, policy, size = meta["store_size"], meta["resize"], meta["image_size"]
    out = [resize(_row_pixels(a, b, i), store, policy) for i, (a, b) in enumerate(zip(images, pixels, strict=True))]
    return prepare_for(meta, np.stack(out)) if out else np.zeros((0, size, size), np.uint8)


def probabilities(model, pixels: np.ndarray, n_classes: int) -> np.ndarray:
    """Softmax outputs (N, K) for uint8 images (N, S, S), fed as raw 0..255 pixels as in training."""
    return outputs(model, pixels, n_classes)[0]


def outputs(model, pixels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities(), the pooled features (N, D) where the model gives them in the same pass:
    a LiteRT model with model.tflite's features output; else None)."""
    if len(pixels) == 0:
        return np.zeros((0, n_classes)), None
    x = np.asarray(pixels, dtype=np.float32)[..., None]
    if getattr(model, "has_features", False):
        probs, features = model.outputs(x)
    else:
        probs, features = model.predict(x, batch_size=BATCH_SIZE, verbose=0), None
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise CovidXrayError(f"the model outputs shape {probs.shape[1:]}, but its metadata names {n_classes} classes")
    return probs, features


def decide(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Predicted class per row of softmax outputs (N, K): covid (last) iff p_covid >= threshold,
    else the most probable of the other classes."""
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError("probs must be (N, K) with K >= 2")
    other = np.argmax(probs[:, :-1], axis=1)
    return np.where(probs[:, -1] >= threshold, probs.shape[1] - 1, other)


def identity(meta: dict) -> dict[str, str]:
    """model_name, model_version, model_run_id of the model that answers ("" where unknown). A
    site-calibrated copy (`covidxray calibrate`) keeps those of the model it calibrates, its
    version followed by "site-calibrated": the same network, another threshold; a copy adapted to a
    site's images (`covidxray adapt`: its head reads aligned features) by "site-adapted"."""
    out = {column: "" if meta.get(key) is None else str(meta[key]) for column, key in IDENTITY.items()}
    for key, mark in (("site_adaptation", "site-adapted"), ("site_calibration", "site-calibrated")):
        if meta.get(key):
            out["model_version"] = f"{out['model_version']} {mark}".strip()
    return out


def describe_model(meta: dict) -> str:
    """Which model answered, in words: registered name and version, and its MLflow run."""
    name, version, run = identity(meta).values()
    said = f"model {name} version {version}" if name and version else f"model {meta.get('model', 'unregistered')}"
    if not name and meta.get("site_calibration"):
        said += " (site-calibrated)"
    return said + (f", run {run}" if run else "")


def predictions(model, meta: dict, pixels: np.ndarray) -> pd.DataFrame:
    """Per image: p_<class> (the positive class, last in meta["classes"], first), the label at
    meta["threshold"], the threshold, and the model that answered (IDENTITY: registered name,
    version and MLflow run; empty where the model was never registered or tracked), then ood_score
    and ood (networks/ood.py; None without a detector): an image flagged out-of-distribution is
    labelled so instead of a class, its p_<class> kept."""
    classes = list(meta["classes"])
    probs, features = outputs(model, pixels, len(classes))
    table = pd.DataFrame({f"p_{classes[-1]}": probs[:, -1]})
    for c, name in enumerate(classes[:-1]):
        table[f"p_{name}"] = probs[:, c]
    labels = np.asarray(classes, dtype=object)[decide(probs, meta["threshold"])] if len(probs) else []
    scores, flagged = ood.flag(meta.get("ood"), model, pixels, features)
    labels = [ood.OOD_LABEL if out else label for label, out in zip(labels, flagged, strict=True)]
    table["label"] = pd.Series(labels, dtype=object)
    table["threshold"] = float(meta["threshold"])
    for column, value in identity(meta).items():
        table[column] = value
    table["ood_score"] = pd.Series(scores, dtype=object if meta.get("ood") is None else float)
    table["ood"] = pd.Series(flagged, dtype=object)
    return table


def png_bytes(gray: np.ndarray) -> bytes:
    """A 2-D uint8 image as PNG file bytes (lossless: decodes to the same pixels)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
