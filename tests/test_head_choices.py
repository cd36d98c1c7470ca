"""Head choices as configuration (issue 25): the mlp and the linear head, an L2 penalty on the
kernels and feature standardization folded into the first Dense layer, through the stacked-heads
trainer and the Keras path; the head_loco search composes."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import frozen_head_settings, make_cfg
from covidxray.training import stacked_heads
from test_heads import fit


def data(n=200, d=12, seed=0):
    """Features on unequal scales and offsets (what standardization changes), the signal in 3."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)) + 1.5 * y[:, None] * (np.arange(d) < 3)
    return (x * np.linspace(0.2, 5.0, d) + np.linspace(-3.0, 8.0, d)).astype(np.float32), y


@pytest.mark.parametrize("units", [8, 0], ids=["mlp", "linear"])
def test_standardization_folded_equals_the_head_trained_on_standardized_features(units):
    """A head trained with standardize=true returns weights on the raw features that predict what
    the same head, trained on features standardized beforehand by the same rows, predicts."""
    x, y = data()
    train, val = np.arange(150), np.arange(150, 200)
    shape = stacked_heads.HeadShape(units, 0.5, 2, standardize=True)
    (folded,) = fit(x, y, [(train, val)], epochs=4, shape=shape)
    mean, std = (m[0] for m in stacked_heads.standardization(x, [train]))
    plain = stacked_heads.HeadShape(units, 0.5, 2)
    (beforehand,) = fit((x - mean) / std, y, [(train, val)], epochs=4, shape=plain)
    expected = stacked_heads.head_probs(beforehand.weights, (x - mean) / std)
    assert np.allclose(stacked_heads.head_probs(folded.weights, x), expected, atol=1e-5)
    assert len(folded.weights) == (4 if units else 2)
    raw = fit(x, y, [(train, val)], epochs=4, shape=plain)[0]  # without standardization the head is another one
    assert not np.allclose(stacked_heads.head_probs(raw.weights, x), expected, atol=1e-3)


@pytest.mark.parametrize("units", [8, 0], ids=["mlp", "linear"])
def test_l2_shrinks_the_kernels(units):
    x, y = data(seed=1)
    splits = [(np.arange(200), None)]
    norms = []
    for l2 in (0.0, 0.05):
        (found,) = fit(x, y, splits, shape=stacked_heads.HeadShape(units, 0.0, 2, l2=l2, standardize=True))
        norms.append(sum(float(np.sum(w**2)) for w in found.weights[::2]))
    assert norms[1] < 0.5 * norms[0]


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_each_head_type_trains_through_the_real_stack_and_saves_its_standardization(kind, tiny_data, tmp_path):
    """A frozen backbone, a head of each type with L2 and standardization: the folds' heads train
    together on the pooled features; the saved and reloaded model predicts on images what the
    stacked head predicts on the same rows (the standardization is inside its first Dense layer)."""
    from covidxray.networks import model_file
    from covidxray.training.cv_data import load_cv_data
    from covidxray.training.trainer import Trainer

    s = frozen_head_settings(tiny_data, f"model.head.type={kind}", "model.head.l2=0.01", "model.head.standardize=true")
    data = load_cv_data(s.curated, s.splits, s.inputs, s.roles)
    fold = data.rows["fold"].to_numpy()
    splits = [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in (0, 1)]
    trainer = Trainer(s.fit, data.images, data.y, len(data.classes), verbose=0)
    model = trainer.new_model()
    shape = trainer.stacked_head(model)
    assert shape.units == (8 if kind == "mlp" else 0) and shape.l2 == 0.01 and shape.standardize
    assert ("head_dense" in [layer.name for layer in model.layers]) is (kind == "mlp")
    fitted = trainer.cross_validate(splits, [2, 0], labels=[0, 1])
    trainer.fit(model, splits[0][0], splits[0][1], [2, 0])
    saved = model_file.load(model_file.save(model, tmp_path / "model.keras"))
    on_images = saved.predict(data.images[splits[0][1]].astype(np.float32)[..., None], verbose=0)
    assert np.allclose(on_images, fitted[0][0], atol=1e-5)


def test_the_keras_path_applies_l2_and_refuses_standardization(tiny_data):
    """A head that trains from pixels (small_cnn, Keras's fit) gets the L2 penalty as a kernel
    regularizer, which shrinks its kernels; standardization is refused there in one line."""
    from covidxray import CovidXrayError
    from covidxray.settings.train import train_settings
    from covidxray.training.cv_data import load_cv_data
    from covidxray.training.trainer import Trainer

    norms = []
    for l2 in (0.0, 1.0):
        s = train_settings(
            make_cfg(
                [
                    "experiment=smoke",
                    "train.epochs=3",
                    "train.run_eagerly=false",  # 24 steps: here the graph costs less than eager steps
                    f"model.head.l2={l2}",
                    f"paths.curated={tiny_data['curated']}",
                    f"paths.splits={tiny_data['splits']}",
                ]
            )
        )
        data = load_cv_data(s.curated, s.splits, s.inputs, s.roles)
        trainer = Trainer(s.fit, data.images, data.y, len(data.classes), verbose=0)
        model = trainer.new_model()
        assert trainer.stacked_head(model) is None  # pixels: Keras's fit
        assert (model.get_layer("predictions").kernel_regularizer is None) is (l2 == 0.0)
        trainer.fit(model, np.arange(len(data.y)), None, [3, 0])
        norms.append(float(np.sum(model.get_layer("head_dense").get_weights()[0] ** 2)))
    assert norms[1] < norms[0]
    with pytest.raises(CovidXrayError, match="model.head.standardize=true: standardization requested") as err:
        train_settings(make_cfg(["experiment=smoke", "model.head.standardize=true"]))
    assert "\n" not in str(err.value)


def test_the_head_loco_search_composes():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import REPO
    from covidxray.settings.train import train_settings

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=["hparams_search=head_loco"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler._target_ == "optuna.samplers.GridSampler"
    assert cfg.optimized_metric == "loco_auc_mean" and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    grid = {k: v.removeprefix("choice(").removesuffix(")").split(",") for k, v in sweeper.params.items()}
    assert set(grid) == {"model.head.type", "model.head.l2", "model.head.standardize"}
    assert int(np.prod([len(v) for v in grid.values()])) == sweeper.n_trials >= 24
    plain = OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"})
    for kind in grid["model.head.type"]:  # every point is a valid config
        for l2 in grid["model.head.l2"]:
            for standardize in grid["model.head.standardize"]:
                head = {"type": kind.strip(), "l2": float(l2), "standardize": standardize.strip() == "true"}
                point = OmegaConf.merge(plain, {"model": {"head": head}})
                head = train_settings(point).fit.model.head
                assert head.type == kind.strip() and head.l2 == float(l2)


def _predictions(scores_by_group: dict, labels, patients):
    import pandas as pd

    frames = [
        pd.DataFrame({"group": g, "role": "held_out", "image_id": [f"{g}-{i}" for i in range(len(s))]}).assign(
            label=labels, patient_id=patients, score=s
        )
        for g, s in scores_by_group.items()
    ]
    train = pd.DataFrame({"group": ["a"], "role": ["train"], "image_id": ["t"], "label": ["covid"]})
    return pd.concat([*frames, train.assign(patient_id="t", score=np.nan)], ignore_index=True)


def test_the_paired_difference_scores_both_heads_on_the_same_resamples():
    """Same scores in a group: delta 0 with a zero-width interval (both recipes on each resample);
    better scores: a positive delta whose interval lies above 0; the mean row averages the groups."""
    from covidxray import CovidXrayError
    from covidxray.evaluation.loco import paired_auc_difference

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    labels, patients = np.where(y == 1, "covid", "normal"), [f"p{i // 2}" for i in range(120)]
    noisy = np.clip(0.5 + 0.15 * (y - 0.5) + rng.normal(0, 0.25, 120), 0, 1)
    clean = np.clip(0.5 + 0.6 * (y - 0.5) + rng.normal(0, 0.1, 120), 0, 1)
    base = _predictions({"a": noisy, "b": noisy}, labels, patients)
    other = _predictions({"a": noisy, "b": clean}, labels, patients)
    table = paired_auc_difference(base, other, "covid", 200, 0.95, 1).set_index("group")
    assert list(table.index) == ["a", "b", "mean"] and table.loc["a", "n_images"] == 120
    assert table.loc["a", "delta"] == table.loc["a", "delta_ci_low"] == table.loc["a", "delta_ci_high"] == 0.0
    assert table.loc["b", "auc_other"] > table.loc["b", "auc_base"] and table.loc["b", "delta_ci_low"] > 0
    assert np.isclose(table.loc["mean", "delta"], table.loc["b", "delta"] / 2)
    assert table.loc["mean", "delta_ci_low"] <= table.loc["mean", "delta"] <= table.loc["mean", "delta_ci_high"]
    with pytest.raises(CovidXrayError, match="group b holds out other images"):
        paired_auc_difference(base, other[other["image_id"] != "b-3"], "covid", 20, 0.95, 1)
