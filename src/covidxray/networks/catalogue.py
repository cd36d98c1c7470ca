"""The backbone catalogue: which networks `model.name` may pick, how each is built and fed, where
its pretrained weights come from, and the sizes they need, as plain data (no Keras import), so
configuration checks run before TensorFlow loads. builders.py builds the networks from it and the
`pretrained` stage converts the weights of every entry that names a converted file.

A backbone with converted weights is one module of this package (efficientnet_lite.py is the
example), imported here and named as the entry's `builder`. What the module provides (no Keras
import at module level: it loads with the catalogue):

    build(image_size) -> keras.Model          the network without its top, (S, S, channels) -> 4-D map
    source() -> Path                          the file its weights are converted from (no download)
    SOURCE_SHA256                             that file's pinned sha256
    convert(source, target, expected_sha256)  checks the file, writes Keras weights to target (*.weights.h5)
    BLOCK_OUTPUTS (optional)                  layer names whose pooled outputs model.features=blocks adds
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from types import ModuleType

from covidxray.networks import efficientnet_lite

DEFAULT_FILTERS = (16, 32, 64, 64)  # small_cnn's conv widths when model.filters is not given
MIN_IMAGENET_SIZE = 32  # the smallest input keras.applications accepts without the top
HEAD_TYPES = ("mlp", "linear")  # model.head.type: Dense + ReLU + Dropout + softmax | Dropout + softmax

# keras.applications.<family>.preprocess_input modes (imagenet_utils), plus two of our own:
#   caffe: RGB->BGR, minus the ImageNet BGR mean (vgg16, vgg19, resnet50)
#   torch: /255, minus the ImageNet mean, / std (densenet121)
#   tf:    /127.5 - 1 (mobilenetv2)
#   none:  pass-through (efficientnet: its rescaling/normalization is inside the network)
#   unit:  /255 (small_cnn)
#   lite:  (x - 127) / 128 (efficientnet_lite0: what its ImageNet weights were trained on)
PREPROCESS_MODES = ("caffe", "torch", "tf", "none", "unit", "lite")
# model.features: what the head (and the feature store) gets from the backbone
#   last:   the last feature map (pooled by the head's pooling)
#   blocks: the last feature map and the global-average-pooled outputs of the entry's `blocks`
FEATURE_SOURCES = ("last", "blocks")


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone, feed it, and where its pretrained weights come from: Keras's
    (application: keras.applications, weights through Keras's cache), converted (builder +
    converted: the `pretrained` stage writes `converted` under paths.pretrained from the
    builder module's source file), or none (trained from scratch: small_cnn)."""

    preprocess: str  # a PREPROCESS_MODES value, applied inside the model
    application: str | None = None  # keras.applications constructor name
    module: str | None = None  # keras.applications submodule (its preprocess_input)
    weights_file: Callable[[int], str] | None = None  # Keras's cache file name for the notop weights
    channels: int = 3  # input channels: 3 repeats the gray channel to RGB
    builder: ModuleType | None = None  # a module with build(image_size) (see the module docstring)
    converted: str | None = None  # the builder's converted weights file, under paths.pretrained
    blocks: tuple[str, ...] = ()  # backbone layers whose pooled outputs model.features=blocks adds


def _mobilenet_v2_file(size: int) -> str:
    rows = size if size in (96, 128, 160, 192, 224) else 224  # what MobileNetV2 picks
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec("caffe", "VGG16", "vgg16", lambda s: "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "vgg19": BackboneSpec("caffe", "VGG19", "vgg19", lambda s: "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "resnet50": BackboneSpec(
        "caffe", "ResNet50", "resnet50", lambda s: "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    ),
    "densenet121": BackboneSpec(
        "torch", "DenseNet121", "densenet", lambda s: "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
    ),
    "mobilenetv2": BackboneSpec("tf", "MobileNetV2", "mobilenet_v2", _mobilenet_v2_file),
    "efficientnetb0": BackboneSpec("none", "EfficientNetB0", "efficientnet", lambda s: "efficientnetb0_notop.h5"),
    "efficientnet_lite0": BackboneSpec(
        "lite",
        builder=efficientnet_lite,
        converted=efficientnet_lite.WEIGHTS_FILE,
        blocks=efficientnet_lite.BLOCK_OUTPUTS,
    ),
    "small_cnn": BackboneSpec("unit", channels=1),
}
MODEL_NAMES = tuple(BACKBONES)


def is_pretrainable(name: str) -> bool:
    """True for the backbones with ImageNet weights (keras.applications or converted)."""
    return BACKBONES[name].application is not None or BACKBONES[name].converted is not None


def converted_backbones() -> dict[str, BackboneSpec]:
    """The entries whose weights the `pretrained` stage converts, by name."""
    return {name: spec for name, spec in BACKBONES.items() if spec.converted is not None}


def feature_map_size(name: str, image_size: int, filters=DEFAULT_FILTERS) -> int:
    """Side of the backbone's output feature map for an input of image_size (no model built)."""
    s = int(image_size)
    if name == "small_cnn":
        for _ in filters:
            s //= 2
        return s
    if name in ("vgg16", "vgg19"):
        for _ in range(5):
            s //= 2  # 'valid' max pooling
        return s
    for _ in range(5):
        s = -(-s // 2)  # strided convolutions with 'same' (or corrected) padding
    return s
