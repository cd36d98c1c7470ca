"""Models: the tutorial's head on a choice of convolutional backbones, for grayscale X-rays.

Every model the project builds has the same layout, which Grad-CAM and predict rely on:

    Input "image" (S, S, 1) float32, raw 0..255 pixels
      -> "preprocess"  GrayscalePreprocess: repeat to 3 channels (ImageNet backbones) and apply
                       the backbone family's `keras.applications.<family>.preprocess_input`
      -> "backbone"    nested keras Model, the convolutional base; output: last conv feature map (4-D)
                       (model.features=blocks: with its blocks' pooled outputs on more channels)
      -> head_pool     AveragePooling2D(pool x pool), pool clamped to the feature map size
      -> head_flatten, head_dense (ReLU), head_dropout
      -> "predictions" Dense(n_classes, softmax)

`model_parts(model)` returns (preprocess layer, backbone model, head layers), and
`split_at_backbone(model)` the three parts as callables (preprocess layer, backbone model,
head model sharing the head's layers), e.g. for Grad-CAM or to train the head on cached features.
Saved .keras files load in any process that has imported `covidxray.networks.builders` (the one custom
layer is registered as "covidxray>GrayscalePreprocess"; no Lambda layers).

Backbones (the catalogue, without Keras, is catalogue.py): vgg16 (the tutorial's), vgg19,
resnet50, densenet121, mobilenetv2, efficientnetb0 from keras.applications, efficientnet_lite0
(efficientnet_lite.py, a catalogue entry's `builder`), and small_cnn (trained from scratch).
`weights`: imagenet (Keras's own download and cache, ~/.keras/models; for a backbone with
converted weights the file the `pretrained` stage converts, `model.imagenet_file`),
none (random init), or a path to a weights file of the same backbone without its top (e.g. a
cached *_notop.h5, or `backbone.save_weights`).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path

import keras
from keras import layers, ops

from covidxray import CovidXrayError
from covidxray.networks import efficientnet_lite
from covidxray.networks.catalogue import (
    BACKBONES,
    DEFAULT_FILTERS,
    FEATURE_SOURCES,
    HEAD_TYPES,
    MODEL_NAMES,
    PREPROCESS_MODES,
    is_pretrainable,
)

BLOCKS_LAYER = "features_blocks"  # the concatenation that ends a backbone built with features="blocks"
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
    beyond importing covidxray.networks.builders.
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
    name: str,
    image_size: int,
    weights: str | None = "none",
    filters=DEFAULT_FILTERS,
    imagenet_file: str | None = None,
    features: str = "last",
) -> keras.Model:
    """The convolutional base as a keras Model named "backbone"; output: its last feature map (4-D),
    with features="blocks" also the pooled outputs of its catalogue entry's blocks (_with_blocks).
    imagenet_file: where weights=imagenet are read from for a backbone with converted weights."""
    spec = _spec(name)
    weights = "none" if weights is None else str(weights)
    image_size = int(image_size)
    if weights == "imagenet" and not is_pretrainable(name):
        raise CovidXrayError(
            f"model.weights=imagenet: {name} has no ImageNet weights (allowed for it: none or a path to a weights file)"
        )
    if spec.builder is None and spec.application is None:
        base = _small_cnn(image_size, filters)  # already named "backbone"
        if weights != "none":
            _load_weights_file(base, weights)
    elif spec.builder is not None:
        base = spec.builder.build(image_size)
        if weights == "imagenet":
            _load_weights_file(base, _converted_imagenet_file(name, imagenet_file))
        elif weights != "none":
            _load_weights_file(base, weights)
    elif weights == "imagenet":
        base = _imagenet_backbone(name, image_size)
    else:
        base = _construct(name, image_size, None)
        if weights != "none":
            _load_weights_file(base, weights)
    if features == "blocks":
        return _with_blocks(base, name)
    if features != "last":
        raise CovidXrayError(f"model.features must be one of {', '.join(FEATURE_SOURCES)}, got {features!r}")
    if base.name == "backbone":
        return base
    # A new Functional over the same layers, named as the structure contract says (renaming the
    # application's own model would change, e.g., EfficientNet's weight file name).
    return keras.Model(base.input, base.output, name="backbone")


def _spec(name: str):
    if name not in BACKBONES:
        raise CovidXrayError(f"unknown backbone {name!r} (one of {', '.join(MODEL_NAMES)})")
    return BACKBONES[name]


def _with_blocks(base: keras.Model, name: str) -> keras.Model:
    """The backbone whose output is its last feature map (h, w, c) with, concatenated on the
    channels, the global average of each catalogue block's output repeated over the h x w
    positions: the head's pooling then sees [pooled map, pooled blocks], so the head is built on
    the concatenated pooled outputs and the structure contract (one 4-D output) holds."""
    blocks = BACKBONES[name].blocks
    if not blocks:
        with_blocks = ", ".join(n for n, spec in BACKBONES.items() if spec.blocks)
        raise CovidXrayError(
            f"model.features=blocks: the catalogue names no blocks for {name} (allowed for it: last; "
            f"blocks for {with_blocks})"
        )
    last = base.output
    h, w = int(last.shape[1]), int(last.shape[2])
    parts = [last]
    for i, layer_name in enumerate(blocks):
        pooled = layers.GlobalAveragePooling2D(keepdims=True, name=f"features_block{i}_pool")(
            base.get_layer(layer_name).output
        )
        parts.append(layers.UpSampling2D((h, w), name=f"features_block{i}_tile")(pooled))
    return keras.Model(base.input, layers.Concatenate(name=BLOCKS_LAYER)(parts), name="backbone")


def feature_source(backbone: keras.Model) -> str:
    """model.features of a built backbone: "blocks" when its output is _with_blocks', else "last"."""
    return "blocks" if any(layer.name == BLOCKS_LAYER for layer in backbone.layers) else "last"


def check_imagenet(name: str, image_size: int, imagenet_file: str | None = None) -> None:
    """Fail now, with the advice, when a backbone's ImageNet weights cannot be had: the converted
    file of a backbone with converted weights (its presence), else Keras's cache or download (by building it)."""
    spec = BACKBONES.get(name)
    if spec is not None and spec.converted is not None:
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

    model_cfg keys: name, weights, freeze_base, head.{pool_size, dense_units, dropout, type, l2}
    (type linear: no head_dense, the dropout on the pooled features; l2 > 0: an L2 kernel
    regularizer on the head's Dense layers), features (last | blocks), for small_cnn filters, for a
    backbone with converted weights imagenet_file. A frozen base always runs in inference mode
    (`training=False`, as Keras's transfer-learning guide does), also when its top is unfrozen
    later for fine-tuning, so its BatchNormalization statistics stay those it was trained with.
    """
    name = str(model_cfg["name"])
    image_size = int(image_size)
    spec = _spec(name)
    filters = tuple(int(f) for f in (model_cfg.get("filters") or DEFAULT_FILTERS))
    head = model_cfg.get("head") or {}
    freeze = bool(model_cfg.get("freeze_base", False))

    inputs = keras.Input((image_size, image_size, 1), dtype="float32", name="image")
    x = GrayscalePreprocess(spec.preprocess, spec.channels, name="preprocess")(inputs)
    backbone = build_backbone(
        name,
        image_size,
        model_cfg.get("weights", "none"),
        filters,
        imagenet_file=model_cfg.get("imagenet_file"),
        features=str(model_cfg.get("features") or "last"),
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
    kind, l2 = str(head.get("type", "mlp")), float(head.get("l2", 0.0))
    regularizer = keras.regularizers.L2(l2) if l2 > 0 else None
    if kind not in HEAD_TYPES:
        raise CovidXrayError(f"model.head.type must be one of {', '.join(HEAD_TYPES)}, got {kind!r}")
    if kind == "mlp":
        units = int(head.get("dense_units", 64))
        x = layers.Dense(units, activation="relu", name="head_dense", kernel_regularizer=regularizer)(x)
    x = layers.Dropout(float(head.get("dropout", 0.5)), name="head_dropout")(x)
    outputs = layers.Dense(int(n_classes), activation="softmax", name="predictions", kernel_regularizer=regularizer)(x)
    return keras.Model(inputs, outputs, name=f"covidxray_{name}")


POOLED_LAYER = "head_flatten"  # the pooled backbone features the head's trainable layers read


def pooled_model(model: keras.Model) -> keras.Model:
    """The sub-model of a model of the structure contract from its input to its pooled features
    (POOLED_LAYER, inference mode): what the OOD score and site adaptation read."""
    return keras.Model(model.input, model.get_layer(POOLED_LAYER).output, name="pooled_features")


def pooled_features(model: keras.Model, pixels, batch: int = 32):
    """The pooled features (N, D), float32, of uint8 model inputs (N, S, S) fed as predict feeds
    them (raw 0..255 pixels)."""
    import numpy as np

    x = np.asarray(pixels, dtype=np.float32)[..., None]
    return np.asarray(pooled_model(model).predict(x, batch_size=batch, verbose=0), dtype=np.float32)


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
    """Make the top `unfreeze_top` layers of the backbone network trainable (BatchNormalization
    layers stay frozen), the rest frozen; the layers model.features=blocks adds (_with_blocks: no
    weights) are not counted among them. Returns how many layers with weights became trainable."""
    backbone = model.get_layer("backbone")
    backbone.trainable = True
    network = [layer for layer in backbone.layers if not _adds_blocks(layer)]
    cut = max(0, len(network) - int(unfreeze_top))
    top = {id(layer) for layer in network[cut:]}
    unfrozen = 0
    for layer in backbone.layers:
        trainable = id(layer) in top and not isinstance(layer, layers.BatchNormalization)
        layer.trainable = trainable
        unfrozen += int(trainable and bool(layer.weights))
    return unfrozen


def _adds_blocks(layer) -> bool:
    """Whether a backbone layer is one _with_blocks added (the blocks' pooling, tiling, concat)."""
    return layer.name == BLOCKS_LAYER or layer.name.startswith("features_block")
