"""Heads trained together on fixed features (training/stacked_heads.py): each is the head trained alone,
early stopping keeps the best epoch's weights, and the heads learn."""

from __future__ import annotations

import numpy as np

from covidxray.training import stacked_heads
from covidxray.training.trainer import make_optimizer
from covidxray.training.inputs import class_weights
from covidxray.training.specs import OptimizerSettings

SHAPE = stacked_heads.HeadShape(units=8, dropout=0.5, n_classes=2)


def data(n=240, d=16, signal=1.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = (rng.normal(size=(n, d)) + signal * y[:, None] * (np.arange(d) < 4)).astype(np.float32)
    return x, y


def fit(x, y, splits, epochs=6, patience=None, schedule="constant", shape=SHAPE):
    opt = OptimizerSettings("adam", 1e-2, schedule)
    return stacked_heads.fit_heads(
        x,
        y,
        splits,
        shape,
        epochs=epochs,
        batch_size=8,
        sample_weight=[class_weights(y[train], 2, "balanced") for train, _ in splits],
        make_optimizer=lambda steps: make_optimizer(opt, opt.lr, epochs, steps),
        seed=3,
        patience=patience,
    )


def test_a_head_trained_with_others_is_the_head_trained_alone():
    x, y = data()
    fold = np.arange(len(y)) % 3
    splits = [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(3)]
    together = fit(x, y, splits)
    alone = fit(x, y, splits[1:2])[0]
    for a, b in zip(together[1].weights, alone.weights, strict=True):
        assert np.allclose(a, b, atol=1e-6)
    assert np.allclose(together[1].history.to_numpy(float), alone.history.to_numpy(float), atol=1e-6)
    assert not np.allclose(together[0].weights[0], together[1].weights[0])  # other rows, other head


def test_early_stopping_keeps_the_best_epoch():
    x, y = data(signal=0.0, seed=1)  # no signal: the validation AUC wanders, training stops
    train, val = np.arange(160), np.arange(160, 240)
    (found,) = fit(x, y, [(train, val)], epochs=40, patience=2)
    history = found.history
    assert len(history) < 40 and list(history["epoch"]) == list(range(1, len(history) + 1))
    best = int(np.argmax(history["val_auc"].to_numpy())) + 1  # the first best, as Keras's rule keeps it
    assert found.best_epoch == best and len(history) == best + 2
    _, _, auc = stacked_heads.figures(y[val], stacked_heads.head_probs(found.weights, x[val]), 2)
    assert np.isclose(auc, history["val_auc"].iloc[best - 1])


def test_heads_learn_and_train_without_validation():
    x, y = data(n=400, signal=1.5)
    train, val = np.arange(300), np.arange(300, 400)
    (found,) = fit(x, y, [(train, val)], epochs=8, patience=3, schedule="cosine")
    assert found.history["val_auc"].max() > 0.9
    (final,) = fit(x, y, [(np.arange(400), None)], epochs=3)
    assert final.best_epoch == 3 and len(final.history) == 3 and "val_auc" not in final.history
    probs = stacked_heads.head_probs(final.weights, x)
    assert probs.shape == (400, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
