"""The domain-generalization algorithms (training/algorithms): each on a constructed case where its
effect is known, through the real stacked-heads trainer on small feature tables; one end to end
through `covidxray train` with leave-one-collection-out; bad hyper-parameters one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import make_cfg
from test_recipe import FROZEN, LOCO_TINY, _paths, two_sites  # noqa: F401 (two_sites: the fixture)


def _fit(x, y, groups, algorithm=None, *, units=8, epochs=8, batch_size=32, seed=0):
    """One head trained on every row of the table (no validation), ERM by default."""
    import keras

    from covidxray.training import stacked_heads

    fit = stacked_heads.fit_heads(
        np.asarray(x, np.float32),
        np.asarray(y),
        [(np.arange(len(y)), None)],
        stacked_heads.HeadShape(units, 0.0, 2),
        epochs=epochs,
        batch_size=batch_size,
        sample_weight=[np.ones(len(y), np.float32)],
        make_optimizer=lambda steps: keras.optimizers.Adam(0.01),
        seed=seed,
        algorithm=algorithm,
        groups=np.asarray(groups),
    )
    return [np.asarray(w[0]) if w.ndim > 2 else np.asarray(w) for w in fit[0].weights]


def _hidden(weights, x):
    return np.maximum(np.asarray(x, np.float32) @ weights[0] + weights[1], 0.0)


def _group_ce(weights, x, y, groups):
    """{group: mean cross-entropy of the trained head on its rows}."""
    from covidxray.training.stacked_heads import head_probs

    p = np.clip(head_probs(weights, x)[np.arange(len(y)), y], 1e-7, 1)
    return {int(g): float(-np.log(p[groups == g]).mean()) for g in np.unique(groups)}


def test_groupdro_weights_move_by_exp_eta_risk_and_absent_groups_do_not():
    """Sagawa et al.'s update on one batch: q_g grows by exp(eta * risk_g) relative to a group
    absent from the batch; the loss is the q-weighted group risk."""
    import tensorflow as tf

    from covidxray.training.algorithms import build

    dro = build("groupdro", {"eta": 0.5})
    ce = tf.constant([[0.2, 0.4, 1.0, 2.0, 3.0]])
    group = tf.constant([[0, 0, 1, 2, 2]])
    state = dro.initial_state(1, 4)
    loss = dro.loss(ce, tf.ones_like(ce), group, None, state, 4).numpy()
    q = state[0].numpy()[0]
    risks = np.array([0.3, 1.0, 2.5, 0.0])
    assert np.allclose(q / q[3], np.exp(0.5 * risks), rtol=1e-5)  # group 3: absent, unmoved
    assert q.argmax() == 2 and q.sum() == pytest.approx(1.0)
    assert loss[0] == pytest.approx(float(q @ risks), rel=1e-5)


def _spurious_table(rng, n=600):
    """Class signal c (noisy) in every group; a spurious feature s that agrees with the class in
    the large groups and disagrees in the small ones (group = class x minority)."""
    y = rng.integers(0, 2, n)
    minority = rng.random(n) < 0.1
    sign = 2 * y - 1
    s = np.where(minority, -sign, sign) + 0.3 * rng.normal(size=n)
    c = 1.0 * sign + rng.normal(size=n)
    return np.stack([s, c], axis=1), y, y * 2 + minority


def test_groupdro_lowers_the_worst_group_risk_where_erm_follows_the_majority():
    x, y, groups = _spurious_table(np.random.default_rng(0))
    erm = _group_ce(_fit(x, y, groups, epochs=15), x, y, groups)
    dro = _group_ce(_fit(x, y, groups, _algorithm("groupdro", eta=1.0), epochs=15), x, y, groups)
    assert max(dro.values()) < 0.7 * max(erm.values())


def _algorithm(name, **params):
    from covidxray.training.algorithms import build

    return build(name, params)


def _two_collection_table(rng, n=400, both=True):
    """Feature 0: the class; feature 1: the collection (a large offset); 2-3: noise. both: every
    class in both collections; else class = collection (ieee8023 covid, kermany normal)."""
    y = rng.integers(0, 2, n)
    site = rng.integers(0, 2, n) if both else y
    x = np.stack([(2 * y - 1) + 0.5 * rng.normal(size=n), 3.0 * (2 * site - 1), *rng.normal(size=(2, n))], axis=1)
    return x + 0.3 * rng.normal(size=x.shape), y, y * 2 + site


def _within_class_gap(weights, x, y, groups):
    h = _hidden(weights, x)
    return np.mean([np.linalg.norm(h[groups == 2 * k].mean(0) - h[groups == 2 * k + 1].mean(0)) for k in (0, 1)])


def test_coral_within_class_removes_the_collection_gap_and_keeps_the_class():
    x, y, groups = _two_collection_table(np.random.default_rng(1))
    erm = _fit(x, y, groups)
    coral = _fit(x, y, groups, _algorithm("coral", gamma=10.0))
    assert _within_class_gap(coral, x, y, groups) < 0.3 * _within_class_gap(erm, x, y, groups)
    assert roc_auc_score(y, _hidden(coral, x) @ coral[2][:, 1] + coral[3][1]) > 0.95


def test_coral_of_whole_collections_erases_the_label_where_collection_is_class():
    """Class = collection: aligning every pair of groups (whole collections) aligns covid with
    normal and the head loses the class; within a class there is nothing to align (ERM)."""
    x, y, groups = _two_collection_table(np.random.default_rng(2), both=False)
    x[:, 0] = 0.3 * np.random.default_rng(3).normal(size=len(y)) + 0.5 * (2 * y - 1)  # a weaker class signal
    from covidxray.training.stacked_heads import head_probs

    scores = {}
    for pairs in ("within_class", "all"):
        w = _fit(x, y, groups, _algorithm("coral", gamma=100.0, pairs=pairs))
        scores[pairs] = roc_auc_score(y, head_probs(w, x)[:, 1])
        between = _hidden(w, x)
        scores[pairs + "_gap"] = np.linalg.norm(between[y == 0].mean(0) - between[y == 1].mean(0))
    assert scores["within_class"] > 0.99
    assert scores["all_gap"] < 0.1 * scores["within_class_gap"]


def test_mixup_loss_is_the_lambda_weighted_cross_entropy_of_partners_within_a_class():
    import tensorflow as tf

    mix = _algorithm("mixup", alpha=0.2)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 6, 3)).astype(np.float32)
    y = np.array([[0, 0, 1, 1, 1, 0]])
    group = np.array([[0, 1, 2, 3, 3, 0]])  # class 0: collections 0, 1; class 1: 2, 3
    onehot = np.eye(2, dtype=np.float32)[y]
    weight = np.array([[1.0, 1.0, 2.0, 2.0, 2.0, 1.0]], np.float32)
    draws = mix.draws(rng, 1, 6)[0][None].astype(np.float32)
    kernel = rng.normal(size=(3, 2)).astype(np.float32)

    def forward(inputs):
        return tf.nn.softmax(tf.einsum("kbd,dc->kbc", inputs, kernel)), inputs

    p, loss = mix.objective(forward, x, onehot, weight, group, draws, [], 4)
    partner, paired = (t.numpy()[0] for t in mix.partners(onehot, group, draws[..., 0]))
    assert paired.all() and (y[0, partner] == y[0]).all() and (group[0, partner] != group[0]).all()
    lam = draws[0, 0, 1]
    mixed = lam * x[0] + (1 - lam) * x[0, partner]
    z = mixed @ kernel
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    expected = lam * weight[0] * -log_p[np.arange(6), y[0]]
    expected += (1 - lam) * weight[0, partner] * -log_p[np.arange(6), y[0, partner]]
    assert loss.numpy()[0] == pytest.approx(expected.mean(), rel=1e-5)


def test_mixup_within_a_class_is_erm_where_each_class_has_one_collection_and_across_classes_is_not():
    x, y, groups = _two_collection_table(np.random.default_rng(5), n=200, both=False)
    erm = _fit(x, y, groups, epochs=3)
    within = _fit(x, y, groups, _algorithm("mixup", alpha=0.2), epochs=3)
    across = _fit(x, y, groups, _algorithm("mixup", alpha=0.2, pairs="all"), epochs=3)
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(erm, within, strict=True))
    assert not np.allclose(erm[0], across[0], atol=1e-3)


def test_vrex_penalty_is_zero_where_group_risks_are_equal():
    """Two groups that are copies of each other (one batch: the whole table): the variance of
    their risks is 0 at every step, so any penalty weight trains the same head; groups that
    differ are pulled apart by the penalty."""
    rng = np.random.default_rng(6)
    half, hy = rng.normal(size=(40, 4)), rng.integers(0, 2, 40)
    x, y = np.concatenate([half, half]), np.concatenate([hy, hy])
    mirrored = np.repeat([0, 1], 40)
    kwargs = {"epochs": 5, "batch_size": 80}
    low, high = (_fit(x, y, mirrored, _algorithm("vrex", penalty=p, anneal_steps=0), **kwargs) for p in (0.0, 1e4))
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(low, high, strict=True))
    uneven = np.where(np.arange(80) % 3 == 0, 0, 1)
    low, high = (_fit(x, y, uneven, _algorithm("vrex", penalty=p, anneal_steps=0), **kwargs) for p in (0.0, 1e4))
    assert not np.allclose(low[0], high[0], atol=1e-3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm=groupdro", "algorithm.eta=-1"], "algorithm.eta must be a number >= 0.0 for groupdro"),
        (["algorithm=coral", "algorithm.pairs=collections"], "algorithm.pairs must be one of within_class, all"),
        (["algorithm=coral", "algorithm.gamma=abc"], "algorithm.gamma must be a number >= 0.0 for coral"),
        (["algorithm=mixup", "algorithm.alpha=0"], "algorithm.alpha must be a number > 0.0 for mixup"),
        (["algorithm=vrex", "algorithm.anneal_steps=1.5"], "algorithm.anneal_steps must be an integer >= 0"),
        (["algorithm=vrex", "+algorithm.eta=1"], "algorithm.eta: not a parameter of vrex"),
        (["algorithm=mixup", "augment=standard"], "algorithm.name=mixup trains only the stacked heads"),
    ],
)
def test_bad_hyper_parameters_are_one_line_before_training(overrides, message):
    from covidxray import CovidXrayError
    from covidxray.settings.train import train_settings

    with pytest.raises(CovidXrayError, match=message) as found:
        train_settings(make_cfg(overrides))
    assert "\n" not in str(found.value)


def test_groupdro_trains_through_the_train_stage_with_loco(two_sites, tmp_path):  # noqa: F811
    """algorithm=groupdro chosen like any config group, with LOCO inside the train stage (the
    command line itself, Hydra's app, is covered by the other `covidxray train` tests)."""
    from mlflow.tracking import MlflowClient

    from covidxray.stages import train

    train.main(
        make_cfg(["algorithm=groupdro", *FROZEN, *LOCO_TINY, "cv.final_model=false", *_paths(two_sites, tmp_path)])
    )
    metrics = json.loads((tmp_path / "reports" / "cv" / "metrics.json").read_text())
    assert 0.0 <= metrics["loco_radiography_auc"] <= 1.0

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("covid-xray").experiment_id])
    assert {run.data.params.get("algorithm.name") for run in runs} - {None} == {"groupdro"}
