"""A model's frozen backbone as a feature extractor, fast on CPU, through the feature store.

`backbone_features(model, images, store)` is the entry point: the output of the model's
preprocess + backbone (in inference mode) for uint8 model inputs (N, S, S), read from the store or
computed and stored. `pooled_features` keeps, under a key of its own, that output through the
head's pooling and flatten: the small table the head's trainable layers (stacked_heads.py) read. Two
engines compute the maps:

- keras: the extractor's `predict` over the tf.data pipeline (what training did before the store);
- tflite: the same extractor converted once per key with TensorFlow's own TFLite converter (the
  converted file is kept in the store) and run by the TFLite interpreter shipped in the
  TensorFlow wheel, whose XNNPACK delegate runs float CPU kernels several times faster than the
  Keras graph for a mobile network such as EfficientNet-Lite0 (benchmarks/bench_lite0_features.py).
  Features agree with Keras's to ~1e-4 (float32 summation order).

The engine is part of the key, and chosen by the model alone (tflite from TFLITE_MIN_SIZE px up
when the interpreter is available, keras below), so one model always gets the same features,
whether the store was warm or not. Progress (images/s, ETA) shows on a terminal (tqdm).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from covidxray.infra.outputs import ensure_room
from covidxray.networks import litert
from covidxray.training.feature_store import FeatureStore

KERAS_BATCH = 64
TFLITE_BATCH = 1  # XNNPACK on 2 cores: single images kept both busy at least as well as batches
TFLITE_MIN_SIZE = 64  # below, conversion costs more than it saves
TFLITE_FILE = "backbone.tflite"


def is_frozen(model) -> bool:
    """True when the model's backbone is not trainable (its features are fixed)."""
    from covidxray.networks import builders

    return not builders.model_parts(model)[1].trainable


def feature_extractor(model):
    """preprocess + backbone (inference mode) of a model of the structure contract, as a keras Model
    from raw 0..255 pixels (S, S, 1) to the backbone's feature map."""
    import keras

    from covidxray.networks import builders

    preprocess, backbone, _ = builders.split_at_backbone(model)
    inputs = keras.Input(tuple(model.input.shape[1:]))
    return keras.Model(inputs, backbone(preprocess(inputs), training=False), name="feature_extractor")


def weights_digest(layer) -> str:
    """sha256 over the shapes, dtypes and values of a layer's weights, in order."""
    digest = hashlib.sha256()
    for w in layer.get_weights():
        w = np.ascontiguousarray(w)
        digest.update(f"{w.dtype.str}{w.shape}".encode())
        digest.update(w.tobytes())
    return digest.hexdigest()


def tflite_available() -> bool:
    """Whether a TFLite interpreter can be made (TensorFlow's own, or ai_edge_litert's)."""
    return litert.interpreter_class() is not None


def choose_engine(image_size: int) -> str:
    return "tflite" if int(image_size) >= TFLITE_MIN_SIZE and tflite_available() else "keras"


def feature_key(model, engine: str) -> dict:
    """Everything besides the pixels that decides the backbone's output."""
    from covidxray.networks import builders

    preprocess, backbone, _ = builders.model_parts(model)
    return {
        "model": model.name.removeprefix("covidxray_"),
        "backbone_weights_sha256": weights_digest(backbone),
        "preprocess": {"mode": preprocess.mode, "channels": int(preprocess.channels)},
        "input_shape": [int(d) for d in model.input.shape[1:]],
        "output_shape": [int(d) for d in backbone.output.shape[1:]],
        "features": builders.feature_source(backbone),  # model.features: last | blocks
        "engine": engine,
    }


def backbone_features(model, images: np.ndarray, store: FeatureStore, engine: str | None = None, label: str = ""):
    """Backbone features (float32 (N, h, w, c)) of uint8 model inputs (N, S, S) through the store."""
    engine = engine or choose_engine(model.input.shape[1])
    key = feature_key(model, engine)
    extractor = feature_extractor(model)
    if engine == "tflite":
        blob = []  # converted on the first miss only

        def compute(x):
            if not blob:
                blob.append(store.artifact(key, TFLITE_FILE, lambda: convert_tflite(extractor, store.log)))
            return run_tflite(blob[0], x, label=label)
    else:

        def compute(x):
            return run_keras(extractor, x, label=label)

    return store.lookup(key, images, compute, label)


def pooled_features(model, images: np.ndarray, store: FeatureStore, label: str = "") -> np.ndarray:
    """backbone_features through the model's pooling and flatten (stacked_heads.pooled): the (N, D) table
    the head's trainable layers see, kept in the store under the backbone's key plus the pooling
    (a fiftieth of the maps' size for a 7x7 map); maps are read or computed for its misses only."""
    from covidxray.training import stacked_heads

    engine = choose_engine(model.input.shape[1])
    key = {**feature_key(model, engine), "head_pool": [int(p) for p in model.get_layer("head_pool").pool_size]}

    def compute(x):
        return stacked_heads.pooled(model, backbone_features(model, x, store, engine, label))

    return store.lookup(key, images, compute, label)


def probabilities(model, pixels: np.ndarray, n_classes: int, store: FeatureStore | None = None) -> np.ndarray:
    """inference.probabilities, with a frozen backbone's features from the store (computed once
    per image, on the fast engine) when one is given: only the head runs on them."""
    from covidxray import CovidXrayError
    from covidxray.networks import inference

    if store is None or len(pixels) == 0 or not is_frozen(model):
        return inference.probabilities(model, pixels, n_classes)
    from covidxray.training import stacked_heads

    pixels = np.asarray(pixels, dtype=np.uint8)
    if stacked_heads.head_shape(model) is not None:  # the standard head: on the (small) pooled table
        probs = stacked_heads.head_probs(stacked_heads.head_weights(model), pooled_features(model, pixels, store))
    else:
        probs = head_outputs(model, backbone_features(model, pixels, store))
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise CovidXrayError(f"the model outputs shape {probs.shape[1:]}, but its metadata names {n_classes} classes")
    return probs


def head_outputs(model, features: np.ndarray, until: str | None = None) -> np.ndarray:
    """The model's head (inference mode) on backbone features: its softmax outputs (N, K), or the
    output of the head layer named `until` (e.g. the penultimate head_dense)."""
    import keras

    from covidxray.networks import builders

    _, backbone, head_layers = builders.model_parts(model)
    inputs = keras.Input(tuple(backbone.output.shape[1:]))
    x = inputs
    for layer in head_layers:
        x = layer(x)
        if layer.name == until:
            break
    head = keras.Model(inputs, x)
    return np.asarray(head.predict(np.asarray(features), batch_size=KERAS_BATCH, verbose=0), dtype=float)


# -- engines -----------------------------------------------------------------------------------------


def progress(total: int, label: str):
    """A tqdm bar (images/s, ETA) on a terminal; silent otherwise (logs get one line per step)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="img",
        desc=f"features{f' ({label})' if label else ''}",
        disable=not sys.stderr.isatty(),
        leave=False,
        dynamic_ncols=True,
    )


def run_keras(extractor, images: np.ndarray, batch: int = KERAS_BATCH, label: str = "") -> np.ndarray:
    """The extractor's predict over the tf.data pipeline of uint8 images."""
    import keras

    from covidxray.training.inputs import make_dataset

    bar = progress(len(images), label)

    class Progress(keras.callbacks.Callback):
        def on_predict_batch_end(self, batch_index, logs=None):
            bar.update(min(batch, bar.total - bar.n))

    try:
        out = extractor.predict(make_dataset(images, None, None, batch), verbose=0, callbacks=[Progress()])
    finally:
        bar.close()
    return np.asarray(out, dtype=np.float32)


def convert_tflite(extractor, log=None) -> bytes:
    """The extractor as a float32 TFLite flat buffer (networks/litert.py's conversion), timed in the log."""
    start = time.perf_counter()  # the converter saves a SavedModel (the weights and more) under TMPDIR first
    need = 2 * 4 * extractor.count_params() + (16 << 20)
    ensure_room(Path(tempfile.gettempdir()), need, "features: converting the backbone to TFLite (TMPDIR)")
    blob = litert.convert(extractor)
    if log is not None:
        log(f"features: converted the backbone to TFLite in {time.perf_counter() - start:.1f}s (once per key, kept)")
    return blob


def run_tflite(
    blob: bytes, images: np.ndarray, batch: int = TFLITE_BATCH, threads: int | None = None, label: str = ""
) -> np.ndarray:
    """The converted extractor over uint8 images (N, S, S), `batch` images per call."""
    n, out = len(images), None
    interpreter = litert.interpreter(blob, batch, threads)
    inp, res = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    with progress(n, label) as bar:
        for start in range(0, n, batch):
            chunk = np.asarray(images[start : start + batch], dtype=np.float32)[..., None]
            if len(chunk) < batch:
                interpreter = litert.interpreter(blob, len(chunk), threads)
            interpreter.set_tensor(inp, chunk)
            interpreter.invoke()
            found = interpreter.get_tensor(res)
            if out is None:
                out = np.empty((n, *found.shape[1:]), dtype=np.float32)
            out[start : start + len(chunk)] = found
            bar.update(len(chunk))
    return out if out is not None else np.zeros((0,), np.float32)
