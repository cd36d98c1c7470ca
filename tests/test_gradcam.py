"""Grad-CAM: image-sized maps in [0, 1] for the project's backbones, and where they point."""

import numpy as np
import pytest

from covidxray.evaluation import gradcam


def _model(name: str, size: int, **model_cfg):
    from covidxray.networks.builders import build_model

    cfg = {
        "name": name,
        "weights": "none",
        "freeze_base": False,
        "head": {"pool_size": 4, "dense_units": 8, "dropout": 0.5},
        **model_cfg,
    }
    return build_model(cfg, size, 2)


@pytest.mark.parametrize(
    "name,size,extra",
    [
        ("small_cnn", 32, {"filters": [4, 8]}),
        ("mobilenetv2", 64, {}),
        ("vgg16", 64, {}),
        ("vgg19", 64, {}),
        ("resnet50", 64, {}),
        ("densenet121", 64, {}),
        ("efficientnetb0", 64, {}),
        ("efficientnet_lite0", 64, {}),
    ],
)
def test_shape_and_range(name, size, extra):
    model = _model(name, size, **extra)
    images = np.random.default_rng(0).integers(0, 256, (3, size, size)).astype(np.uint8)
    cams = gradcam.gradcam(model, images, class_index=-1, batch_size=2)
    assert cams.shape == (3, size, size)
    assert np.isfinite(cams).all()
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    picture = gradcam.overlay(images[0], cams[0])
    assert picture.shape == (size, size, 3) and picture.dtype == np.uint8


def test_points_at_the_evidence():
    """A model whose covid logit is the mean of a hand-set feature map responding to bright
    pixels: the heat map peaks where the bright square is."""
    import keras

    size = 32
    inputs = keras.Input((size, size, 1))
    x = keras.layers.Rescaling(1 / 255.0, name="preprocess")(inputs)
    conv = keras.layers.Conv2D(1, 1, activation="relu", name="bright")
    feat_in = keras.Input((size, size, 1))
    backbone = keras.Model(feat_in, conv(feat_in), name="backbone")
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs)
    conv.set_weights([np.ones((1, 1, 1, 1)), np.array([-0.5])])
    model.get_layer("predictions").set_weights([np.array([[-1.0, 1.0]]), np.zeros(2)])
    image = np.full((size, size), 40, np.uint8)
    image[20:28, 4:12] = 250
    cam = gradcam.gradcam(model, image[None])[0]
    assert cam[20:28, 4:12].mean() > 0.9
    assert cam[:16, 16:].max() < 0.1


def test_figure_with_an_empty_group(tmp_path):
    from covidxray.evaluation.figures import gradcam_panel

    img = np.zeros((16, 16), np.uint8)
    cam = np.linspace(0, 1, 256).reshape(16, 16)
    groups = {"true positives": [(img, cam, "a\np(covid)=0.91")], "false positives": []}
    path = gradcam_panel(groups, tmp_path / "g.png", per_row=2, score="p(covid)")
    assert path.stat().st_size > 1000


def test_needs_a_backbone():
    import keras

    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    with pytest.raises(ValueError, match="backbone"):
        gradcam.gradcam(model, np.zeros((1, 8, 8)))
