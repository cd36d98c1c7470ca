"""Where research plugs in: a backbone with converted weights added as one module + one catalogue
entry + one conf/model file, trained through the real stages; model.features=blocks trained on
the stacked heads' table and saved as a model that computes the same features."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, make_cfg

TOY_MODULE = '''"""toy_net: a two-layer backbone whose "ImageNet" weights are an .npz file, converted to Keras."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from covidxray import CovidXrayError
from covidxray.infra.outputs import replace_dir

WEIGHTS_FILE = "toy_net.weights.h5"
SOURCE_SHA256 = "{sha256}"
BLOCK_OUTPUTS = ("toy_conv1",)


def build(image_size: int):
    import keras
    from keras import layers

    inputs = keras.Input((int(image_size), int(image_size), 3))
    x = layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="toy_conv1")(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="toy_conv2")(x)
    return keras.Model(inputs, x, name="toy_net")


def source() -> Path:
    return Path("{source}")


def convert(source, target, expected_sha256=None) -> Path:
    source, target = Path(source), Path(target)
    if expected_sha256 and hashlib.sha256(source.read_bytes()).hexdigest() != expected_sha256:
        raise CovidXrayError(f"{{source}}: sha256 differs from the pinned {{expected_sha256}}")
    arrays = np.load(source)
    model = build(32)
    for name in ("toy_conv1", "toy_conv2"):
        model.get_layer(name).set_weights([arrays[name + "_kernel"], arrays[name + "_bias"]])
    replace_dir(target.parent, lambda new: model.save_weights(new / target.name), by="pretrained", names=[target.name])
    return target
'''

TOY_YAML = """defaults: [base/imagenet@_here_, _self_]   # the head's keys every backbone shares
name: toy_net
weights: imagenet
imagenet_file: ${paths.pretrained}/toy_net.weights.h5
freeze_base: true
features: blocks
head:
  pool_size: 2
  dense_units: 8
  dropout: 0.5
fine_tune:
  unfreeze_top: 0
  epochs: 0
  lr_factor: 0.1
"""

# One process runs the stages as `dvc repro` does (pretrained, train, evaluate, loco) on the copy,
# then reads the saved model: its backbone carries the converted weights, its output the pooled block.
STAGES = """
import json, sys
import keras, numpy as np
from covidxray.infra.config import compose
from covidxray.stages import evaluate, loco, pretrained, train
cfg = compose(json.loads(sys.argv[1]))
pretrained.main(cfg)
train.main(cfg)
evaluate.main(cfg)
loco.main(cfg)
backbone = keras.saving.load_model(cfg.paths.models + "/model.keras").get_layer("backbone")
converted = np.load(sys.argv[2])
assert np.array_equal(backbone.get_layer("toy_conv1").get_weights()[0], converted["toy_conv1_kernel"])
assert backbone.output.shape[-1] == 8 + 4, backbone.output.shape  # the last map and the pooled block
"""


def add_toy_backbone(copy, weights_npz) -> None:
    """What a contributor writes: the module, its catalogue entry (with its import), the conf file."""
    sha = hashlib.sha256(weights_npz.read_bytes()).hexdigest()
    networks = copy / "src" / "covidxray" / "networks"
    (networks / "toy_net.py").write_text(TOY_MODULE.format(sha256=sha, source=weights_npz))
    catalogue = networks / "catalogue.py"
    text = catalogue.read_text()
    text = text.replace(
        "from covidxray.networks import efficientnet_lite\n",
        "from covidxray.networks import efficientnet_lite, toy_net\n",
    )
    entry = (
        '    "toy_net": BackboneSpec(\n'
        '        "tf", builder=toy_net, converted=toy_net.WEIGHTS_FILE, blocks=toy_net.BLOCK_OUTPUTS\n'
        "    ),\n"
    )
    last = '    "small_cnn": BackboneSpec("unit", channels=1),\n'
    text = text.replace(last, last + entry)
    assert "toy_net" in text and text.count("toy_net") >= 4
    catalogue.write_text(text)
    (copy / "conf" / "model" / "toy_net.yaml").write_text(TOY_YAML)


def test_a_backbone_added_through_the_seam_trains_through_the_stages(tiny_data, tmp_path):
    """A toy backbone with converted weights (module + catalogue entry + conf/model file in a copy
    of the project, nothing else changed): the pretrained stage converts it, train, evaluate and loco
    run on it, and the trained model carries its converted weights."""
    copy = tmp_path / "project"
    shutil.copytree(REPO / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", copy / "conf")
    rng = np.random.default_rng(0)
    arrays = {
        "toy_conv1_kernel": rng.normal(0, 0.2, (3, 3, 3, 4)).astype(np.float32),
        "toy_conv1_bias": np.full(4, 0.1, np.float32),
        "toy_conv2_kernel": rng.normal(0, 0.2, (3, 3, 4, 8)).astype(np.float32),
        "toy_conv2_bias": np.full(8, 0.1, np.float32),
    }
    np.savez(tmp_path / "toy.npz", **arrays)
    add_toy_backbone(copy, tmp_path / "toy.npz")
    out = tmp_path / "out"
    shutil.copytree(tiny_data["curated"], out / "curated")
    overrides = [
        "experiment=smoke",
        "model=toy_net",
        f"paths.curated={out / 'curated'}",
        f"paths.splits={tiny_data['splits']}",
        f"paths.models={out / 'models'}",
        f"paths.pretrained={out / 'pretrained'}",
        f"paths.reports={out / 'reports'}",
        f"paths.features={out / 'features'}",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlruns.db'}",
        "evaluate.bootstrap=50",
        "evaluate.gradcam_per_group=1",
        "loco.calibration.k=6",
        "loco.calibration.method=youden",  # K = 6 cannot support a sensitivity target on its lower bound
        "loco.calibration.draws=5",
        "loco.objective.min_images=10",  # the tiny group counts in the headline
        "loco.objective.max_shortcut_auc=1.0",  # although its synthetic classes differ in pixel statistics
    ]
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "CUDA_VISIBLE_DEVICES": "-1"}
    done = subprocess.run(
        [sys.executable, "-c", STAGES, json.dumps(overrides), str(tmp_path / "toy.npz")],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "pretrained" / "toy_net.weights.h5").is_file()
    assert (out / "pretrained" / "efficientnet_lite0.weights.h5").is_file()  # every converted backbone
    assert json.loads((out / "models" / "model.json").read_text())["model"] == "toy_net"
    assert "auc" in json.loads((out / "reports" / "loco" / "headline.json").read_text())


def test_blocks_features_train_and_the_saved_model_computes_them(tiny_data, tmp_path):
    """model.features=blocks: the stacked heads train on [pooled last map, pooled stage outputs],
    the full model predicts on images what the stacked head predicts on that table, and the table
    has a store key of its own (never mixed with `last`'s)."""
    import keras

    from covidxray.settings.train import train_settings
    from covidxray.training import stacked_heads
    from covidxray.training.cv_data import load_cv_data
    from covidxray.training.feature_store import FeatureStore
    from covidxray.training.trainer import Trainer

    store = FeatureStore(tmp_path / "features", log=lambda line: None)
    found = {}
    for source in ("last", "blocks"):
        s = train_settings(
            make_cfg(
                [
                    "experiment=smoke",
                    "model=efficientnet_lite0",
                    "model.weights=none",
                    f"model.features={source}",
                    f"paths.curated={tiny_data['curated']}",
                    f"paths.splits={tiny_data['splits']}",
                ]
            )
        )
        data = load_cv_data(s.curated, s.splits, s.inputs, s.roles)
        trainer = Trainer(s.fit, data.images, data.y, len(data.classes), verbose=0, store=store)
        model = trainer.new_model()
        assert trainer.stacked_head(model) is not None
        idx = np.arange(len(data.y))
        trainer.fit(model, idx[::2], idx[1::2], [1, 0])
        table = trainer.pooled_features(model)
        found[source] = (table, store.keys[-1])
        if source == "blocks":
            path = tmp_path / "model.keras"
            model.save(path)
            loaded = keras.saving.load_model(path)
            on_images = loaded.predict(data.images[idx[1::2]].astype(np.float32)[..., None], verbose=0)
            by_head = stacked_heads.head_probs(stacked_heads.head_weights(model), table[idx[1::2]])
            assert np.allclose(on_images, by_head, atol=1e-5)
    (last, last_key), (blocks, blocks_key) = found["last"], found["blocks"]
    assert last_key != blocks_key
    assert blocks.shape[1] == last.shape[1] + 16 + 24 + 40 + 80 + 112 + 192 + 320
    assert np.allclose(blocks[:, : last.shape[1]], last, atol=1e-5)  # the last map's pooled part is the same


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.features=stages"], "model.features must be one of last, blocks, got 'stages'"),
        (["model=vgg16", "model.features=blocks"], "model.features must be last for model.name=vgg16"),
    ],
)
def test_an_unknown_feature_source_fails_before_training(overrides, message):
    from covidxray import CovidXrayError
    from covidxray.settings.train import train_settings

    with pytest.raises(CovidXrayError) as err:
        train_settings(make_cfg(["experiment=smoke", *overrides]))
    assert message in str(err.value) and "\n" not in str(err.value)
