"""Models: every backbone in conf/model/ builds with the structure contract Grad-CAM and predict
rely on, saves and reloads, feeds grayscale to ImageNet backbones with their own preprocessing,
and says exactly where the ImageNet file goes when it cannot be downloaded."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from conftest import REPO, make_cfg

MODEL_NAMES = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
SIZE = 32


def _cfg(name: str, **extra) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(make_cfg([f"model={name}"]).model)  # as composed (base configs included)
    cfg["weights"] = "none"
    cfg["head"]["dense_units"] = 8
    if name == "small_cnn":
        cfg["filters"] = [4, 8]
    cfg.update(extra)
    return cfg


def _pixels(n: int = 3, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, size=(n, size, size, 1)).astype(np.float32)


def test_conf_lists_every_backbone():
    from covidxray.networks import catalogue

    assert set(MODEL_NAMES) == set(catalogue.MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_structure_contract_save_and_reload(name, tmp_path):
    import keras

    from covidxray.networks import builders

    model = builders.build_model(_cfg(name), SIZE, 3)
    kinds = [type(layer).__name__ for layer in model.layers]
    names = [layer.name for layer in model.layers]
    assert kinds[0] == "InputLayer" and names[1:3] == ["preprocess", "backbone"]
    assert model.input_shape == (None, SIZE, SIZE, 1)
    backbone = model.get_layer("backbone")
    assert isinstance(backbone, keras.Model)
    assert len(backbone.output.shape) == 4
    assert names[3:] == ["head_pool", "head_flatten", "head_dense", "head_dropout", "predictions"]
    last = model.layers[-1]
    assert isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax
    assert model.output_shape == (None, 3)

    x = _pixels()
    before = model(x, training=False).numpy()  # eager: predict traces a graph first (the 8 backbones: 33 -> 24 s)
    assert np.allclose(before.sum(axis=1), 1.0, atol=1e-5)
    preprocess, backbone_part, head = builders.split_at_backbone(model)
    assert np.allclose(head(backbone_part(preprocess(x), training=False)).numpy(), before, atol=1e-5)

    path = tmp_path / "model.keras"
    model.save(path)
    again = keras.models.load_model(path)
    assert [layer.name for layer in again.layers] == names
    assert np.allclose(again(x, training=False).numpy(), before, atol=1e-5)


def test_saved_model_loads_in_another_process(tmp_path):
    from covidxray.networks import builders

    model = builders.build_model(_cfg("mobilenetv2"), SIZE, 2)
    model.save(tmp_path / "model.keras")
    x = _pixels()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "p.npy", model(x, training=False).numpy())
    code = (
        "import sys, numpy as np, keras, covidxray.networks.builders; d = sys.argv[1]; "
        "m = keras.models.load_model(d + '/model.keras'); "
        "assert np.allclose(m(np.load(d + '/x.npy'), training=False).numpy(), np.load(d + '/p.npy'), atol=1e-5)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in ("small_cnn", "efficientnet_lite0")])
def test_preprocess_matches_keras_applications(name):
    """The in-model layer equals keras.applications.<family>.preprocess_input on RGB-repeated gray."""
    import keras

    from covidxray.networks import builders
    from covidxray.networks import catalogue

    x = _pixels()
    family = getattr(keras.applications, catalogue.BACKBONES[name].module)
    expected = np.asarray(family.preprocess_input(np.repeat(x, 3, axis=-1).copy()))
    layer = builders.GrayscalePreprocess(catalogue.BACKBONES[name].preprocess, 3)
    assert np.allclose(layer(x).numpy(), expected, atol=1e-4)


def test_small_cnn_scales_to_unit_range_on_one_channel():
    from covidxray.networks import builders

    model = builders.build_model(_cfg("small_cnn"), SIZE, 2)
    out = model.get_layer("preprocess")(_pixels())
    assert out.shape[-1] == 1 and float(np.max(out)) <= 1.0 and float(np.min(out)) >= 0.0


def test_pooling_is_clamped_to_small_feature_maps():
    from covidxray.networks import builders
    from covidxray.networks import catalogue

    model = builders.build_model(_cfg("vgg16", head={"pool_size": 4, "dense_units": 8, "dropout": 0.5}), SIZE, 2)
    assert model.get_layer("backbone").output.shape[1] == 1
    assert model.get_layer("head_pool").pool_size == (1, 1)
    assert catalogue.feature_map_size("vgg16", SIZE) == 1
    assert catalogue.feature_map_size("small_cnn", 128, [16, 32, 64, 64]) == 8


def test_frozen_base_and_fine_tune():
    from covidxray.networks import builders

    model = builders.build_model(_cfg("mobilenetv2", freeze_base=True), SIZE, 2)
    backbone = model.get_layer("backbone")
    assert not backbone.trainable
    head_weights = len(model.trainable_weights)
    assert head_weights == 4  # two Dense layers: kernel + bias each
    unfrozen = builders.set_fine_tune(model, 5)
    assert unfrozen >= 1
    assert len(model.trainable_weights) > head_weights
    bn = [layer for layer in backbone.layers if type(layer).__name__ == "BatchNormalization"]
    assert not any(layer.trainable for layer in bn)


def test_weights_file_path_loads_into_backbone(tmp_path):
    from covidxray.networks import builders

    source = builders.build_backbone("vgg16", SIZE, "none")
    path = tmp_path / "vgg16_backbone.weights.h5"
    source.save_weights(path)
    loaded = builders.build_backbone("vgg16", SIZE, str(path))
    assert all(np.array_equal(a, b) for a, b in zip(source.get_weights(), loaded.get_weights()))


def test_missing_weights_file_is_a_config_error(tmp_path):
    from covidxray import CovidXrayError
    from covidxray.networks import builders

    with pytest.raises(CovidXrayError, match="model.weights"):
        builders.build_backbone("vgg16", SIZE, str(tmp_path / "nope.h5"))


@pytest.mark.parametrize(
    "name, size, expected",
    [
        ("vgg16", 64, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("mobilenetv2", 128, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_128_no_top.h5"),
    ],
)
def test_offline_imagenet_names_the_cache_file(name, size, expected, tmp_path, monkeypatch):
    """Offline with an empty cache: one CovidXrayError with the exact path and the way out."""
    import time

    from keras.src.backend import config as keras_config
    from keras.src.utils import file_utils

    from covidxray import CovidXrayError
    from covidxray.networks import builders

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras-home"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    start = time.monotonic()
    with pytest.raises(CovidXrayError) as err:
        builders.build_model({"name": name, "weights": "imagenet", "freeze_base": True}, size, 2)
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert str(tmp_path / "keras-home" / "models" / expected) in message
    assert "model.weights=none" in message
    assert builders.imagenet_weights_path(name, size) == Path(tmp_path / "keras-home" / "models" / expected)


def test_small_cnn_has_no_imagenet_weights():
    from covidxray import CovidXrayError
    from covidxray.networks import builders

    with pytest.raises(CovidXrayError, match="model.weights"):
        builders.build_backbone("small_cnn", SIZE, "imagenet")


def test_corrupt_model_file_is_one_line_naming_the_file(tmp_path, capsys):
    """Truncated, bit-flipped, empty or foreign files: one line naming the file, never Keras's
    "File not found" for a file that exists, nor a zipfile traceback."""
    import zipfile

    from covidxray import CovidXrayError, cli
    from covidxray.networks import builders
    from covidxray.networks import model_file

    good = tmp_path / "good.keras"
    builders.build_model(_cfg("small_cnn"), SIZE, 2).save(good)
    data = good.read_bytes()
    with zipfile.ZipFile(good) as archive:
        weights = archive.getinfo("model.weights.h5")
    middle = weights.header_offset + 200  # inside the stored weights: the CRC check fails
    corrupt = {
        "truncated.keras": data[: len(data) // 2],
        "flipped.keras": data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :],
        "empty.keras": b"",
        "text.keras": b"not a model\n",
    }
    for name, content in corrupt.items():
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / "model.keras").write_bytes(content)
        (folder / "model.json").write_text('{"classes": ["normal", "covid"], "image_size": 32, "threshold": 0.5}')
        with pytest.raises(CovidXrayError) as err:
            model_file.load(folder / "model.keras")
        message = str(err.value)
        assert str(folder / "model.keras") in message and "\n" not in message
        assert "File not found" not in message
        image = tmp_path / "x.png"  # present, so predict gets as far as the model
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(image)
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["predict", str(image), "--model", str(folder)])
        assert exit_info.value.code == 1
        err_text = capsys.readouterr().err
        assert err_text.count("\n") == 1 and err_text.startswith("covidxray predict: error: cannot load model")
