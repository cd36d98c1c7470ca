"""The training recipe is written once (training/recipe.py): the train stage and leave-one-collection-
out give the same model for the same images; a training algorithm plugs in through its seam
(one module + one config file) and trains through the real stack, train and LOCO."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import numpy as np
import pandas as pd
import pytest

from conftest import BIN, REPO, make_cfg, synthetic_xrays

# A frozen random backbone at 32 px (the smoke CNN: a frozen MobileNetV2 took 24 s a training, this 5 s):
# the stacked heads (the default recipe's path) at test size.
FROZEN = ["experiment=smoke", "model.freeze_base=true", "train.epochs=2"]
# LOCO inside `covidxray train` at test size: radiography held out, few calibration draws and resamples
LOCO_TINY = [
    "++optimized_metric=loco_auc_mean",  # force-add: the key may or may not be in the base config
    "loco.groups=[[radiography]]",
    "loco.calibration.k=4",
    "loco.calibration.draws=2",
    "loco.calibration.method=youden",  # no sensitivity target: K = 4 cannot support one
    "evaluate.bootstrap=20",
]
TUTORIAL_ROLES = ["data.sources.train.covid=[ieee8023]", "data.sources.train.normal=[kermany]"]


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    """kermany (normal) and ieee8023 (covid) first in the store, every one of their images in the
    CV partition, then radiography (both classes): LOCO holding radiography out trains on exactly
    the rows, in the same order, that the train stage trains on with the tutorial's roles."""
    from covidxray.data.images import save_curated

    root = tmp_path_factory.mktemp("two_sites")
    rng = np.random.default_rng(3)
    rows, arrays = [], []
    for source, label, y, n in (
        ("kermany", "normal", 0, 24),
        ("ieee8023", "covid", 1, 24),
        ("radiography", "normal", 0, 12),
        ("radiography", "covid", 1, 12),
    ):
        arrays.append(synthetic_xrays(n, 32, positive=bool(y), rng=rng))
        for i in range(n):
            image = f"{source}-{label}-{i:03d}"
            rows.append({"image_id": image, "label": label, "y": y, "patient_id": image, "source": source})
    index = pd.DataFrame(rows).assign(dup_group=lambda f: f["image_id"], orig_width=32, orig_height=32)
    index = index.assign(orig_format="PNG", orig_mode="L")
    save_curated(root / "curated", np.concatenate(arrays), index, ["normal", "covid"])
    held = index["source"] == "radiography"
    splits = pd.DataFrame(
        {
            "image_id": index["image_id"],
            "partition": np.where(held & (np.arange(len(index)) % 3 == 0), "test", "cv"),
            "fold": np.arange(len(index)) % 2,
        }
    )
    splits.loc[splits["partition"] == "test", "fold"] = -1
    splits.to_csv(root / "splits.csv", index=False)
    return {"curated": root / "curated", "splits": root / "splits.csv", "root": root}


def _paths(data: dict, out) -> list[str]:
    return [
        f"paths.curated={data['curated']}",
        f"paths.splits={data['splits']}",
        f"paths.models={out / 'models'}",
        f"paths.reports={out / 'reports'}",
        f"paths.features={out / 'features'}",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        "mlflow.register=false",
    ]


def test_train_stage_and_loco_run_the_same_recipe(two_sites, tmp_path):
    """The same images give the same threshold, epochs and final model whether the train stage or
    leave-one-collection-out runs the recipe."""
    from covidxray.evaluation import loco
    from covidxray.networks.model_file import load_model
    from covidxray.settings.loco import loco_settings
    from covidxray.stages import train

    train.main(make_cfg([*FROZEN, *TUTORIAL_ROLES, *_paths(two_sites, tmp_path)]))
    model, meta = load_model(tmp_path / "models")

    s = loco_settings(make_cfg([*FROZEN, "loco.groups=[[radiography]]", *_paths(two_sites, tmp_path / "loco")]))
    result = loco.run(s.train.curated, s.train.splits, s.recipe, s.spec, s.seed)
    group = result["groups"]["radiography"]
    assert group["n_train_images"] == 48 and group["epochs"] == [meta["epochs"]]
    assert group["threshold"] == pytest.approx(meta["threshold"], abs=1e-6)

    held = result["predictions"].query("role == 'held_out'")
    from covidxray.data.images import load_curated

    images, index, _ = load_curated(two_sites["curated"])
    at = index.reset_index().set_index("image_id").loc[held["image_id"], "index"].to_numpy()
    direct = model.predict(images[at][..., None].astype(np.float32), verbose=0)[:, -1]
    assert np.allclose(held["score"].to_numpy(), direct, atol=1e-5)


TOY = '''
"""A toy algorithm: ERM scaled by `scale` (scale 0: no gradient, the heads keep their initial weights)."""
import dataclasses

from covidxray.training.algorithms.base import Algorithm


@dataclasses.dataclass(frozen=True)
class Scaled(Algorithm):
    NAME = "toy_scaled"
    USES_GROUPS = True
    scale: float = 1.0

    def __post_init__(self):
        self._check("scale", self.scale)

    def loss(self, ce, weight, group, hidden, state, n_groups):
        return self.scale * self.weighted_mean(ce, weight)
'''


def test_a_toy_algorithm_plugs_in_through_one_module_and_one_config(two_sites, tmp_path):
    """An algorithm from another package (its module, registered under the entry-point group
    covidxray.algorithms) and its conf/algorithm/<name>.yaml on Hydra's search path: `covidxray
    train algorithm=<name>` trains with it, through the CV, the final model and LOCO."""
    plugin = tmp_path / "plugin"
    (plugin / "toy_algorithm-0.1.dist-info").mkdir(parents=True)
    (plugin / "toy_algorithm.py").write_text(textwrap.dedent(TOY))
    (plugin / "toy_algorithm-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-algorithm\n")
    (plugin / "toy_algorithm-0.1.dist-info" / "entry_points.txt").write_text(
        "[covidxray.algorithms]\ntoy_scaled = toy_algorithm:Scaled\n"
    )
    (tmp_path / "conf" / "algorithm").mkdir(parents=True)
    (tmp_path / "conf" / "algorithm" / "toy.yaml").write_text("name: toy_scaled\nscale: 0.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([str(plugin), *filter(None, [env.get("PYTHONPATH")])])
    argv = [
        str(BIN / "covidxray"),
        "train",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "algorithm=toy",
        *FROZEN,
        *LOCO_TINY,
        *_paths(two_sites, tmp_path),
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "reports" / "cv" / "metrics.json").read_text())
    assert "loco_radiography_auc" in metrics  # LOCO ran the same recipe, with the toy algorithm

    import keras

    from covidxray.networks.model_file import load
    from covidxray.training.stacked_heads import HeadShape, initial_weights

    head = load(tmp_path / "run" / "models" / "model.keras").get_layer("head_dense").get_weights()[0]
    start = initial_weights(1, head.shape[0], HeadShape(head.shape[1], 0.5, 2), seed=42)[0]
    assert np.array_equal(head, keras.ops.convert_to_numpy(start)[0])  # scale 0: the loss had no gradient

    bad = subprocess.run([*argv[:3], "algorithm=toy", "algorithm.scale=-1"], cwd=REPO, env=env, capture_output=True)
    assert bad.returncode != 0 and b"algorithm.scale must be a number >= 0.0 for toy_scaled" in bad.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.name=dro"], "algorithm.name must be one of coral, erm, groupdro, mixup, vrex, got 'dro'"),
        (["algorithm=erm", "+algorithm.eta=0.1"], "algorithm.eta: not a parameter of erm"),
        (["+algorithm.eta=0.1"], r"algorithm.eta: not a parameter of vrex \(its parameters: penalty, anneal_steps\)"),
    ],
)
def test_bad_algorithms_are_one_line_before_training(overrides, message):
    from covidxray import CovidXrayError
    from covidxray.settings.train import train_settings

    with pytest.raises(CovidXrayError, match=message):
        train_settings(make_cfg(overrides))
