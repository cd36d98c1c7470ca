"""The head of many models trained at once on fixed backbone features.

With a frozen backbone and no augmentation the backbone's output never changes, so the K heads of
a cross-validation (and the final model's) are small independent networks on the same feature
table: their weights are stacked along a first axis and each optimizer step updates all K in one
TensorFlow call. Per step, each head gets its own batch from its own rows, its own dropout mask
and its own sample weights, drawn from its own random stream; Adam acts elementwise, so the heads
do not interact: a head trained with others is the head trained alone. On a 2-core CPU a
step costs about as much for five heads as for one, and far less than a step of Keras's `fit`
(benchmarks/bench_head_sweep.py).

The recipe is the train stage's: the model's head (pooling, Dense + ReLU, Dropout, Dense +
softmax; or, for the linear head, pooling, Dropout, Dense + softmax), an L2 penalty on the kernels
(`l2` * sum of squares, Keras's L2 regularizer), optionally on features standardized with the mean
and standard deviation of each head's own training rows (folded into the first Dense layer when
training ends, so the saved model takes the raw features), Adam at the configured learning-rate
schedule, batches of `batch_size` rows drawn without replacement and reshuffled every epoch
(seeded), class-weighted cross-entropy, and early stopping on the validation AUC with the best
epoch's weights restored (keras.callbacks.EarlyStopping's rule). An epoch is ceil(largest head's
rows / batch_size) steps; a head with fewer rows tops its last batches up with rows of its next
shuffle. Training figures (loss, accuracy, AUC) are over the epoch's own predictions, as Keras
reports them; validation figures at the epoch's end.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidxray.training.algorithms.base import EPSILON, Algorithm
from covidxray.training.algorithms.erm import ERM


@dataclass(frozen=True)
class HeadShape:
    """A head's trainable part after pooling: Dense(units, ReLU), Dropout(dropout), Dense(classes);
    units 0: the linear head, Dropout(dropout) on the pooled features, Dense(classes). l2: the
    kernels' penalty; standardize: train on standardized features (see fold_standardization)."""

    units: int
    dropout: float
    n_classes: int
    l2: float = 0.0
    standardize: bool = False


DENSE_LAYERS = ("head_dense", "predictions")  # the linear head has "predictions" only
LAYOUTS = {
    ("head_pool", "head_flatten", "head_dense", "head_dropout", "predictions"): "mlp",
    ("head_pool", "head_flatten", "head_dropout", "predictions"): "linear",
}


@dataclass
class HeadFit:
    """One trained head: its weights [kernel, bias, kernel, bias] (the best epoch's, when early
    stopping), its history (epoch, loss, accuracy, auc, val_loss, val_accuracy, val_auc) and the
    best epoch (1-based)."""

    weights: list[np.ndarray]
    history: pd.DataFrame
    best_epoch: int


def head_shape(model, l2: float = 0.0, standardize: bool = False) -> HeadShape | None:
    """The HeadShape of a model of the structure contract (builders.py) with the training options
    l2 and standardize, or None when its head is neither the standard nor the linear one (then it
    trains with Keras's fit)."""
    from covidxray.networks import builders

    layers = {layer.name: layer for layer in builders.model_parts(model)[2]}
    kind = LAYOUTS.get(tuple(layers))
    if kind is None or layers["predictions"].activation.__name__ != "softmax":
        return None
    if kind == "mlp" and layers["head_dense"].activation.__name__ != "relu":
        return None
    units = int(layers["head_dense"].units) if kind == "mlp" else 0
    return HeadShape(units, float(layers["head_dropout"].rate), int(layers["predictions"].units), l2, standardize)


def pooled(model, features: np.ndarray, batch: int = 256) -> np.ndarray:
    """The model's parameter-free head layers (pooling, flatten) on backbone features: (N, D)."""
    from covidxray.networks import builders

    pool, flatten = builders.model_parts(model)[2][:2]
    parts = [np.asarray(flatten(pool(features[i : i + batch]))) for i in range(0, len(features), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _dense_names(model) -> list[str]:
    names = {layer.name for layer in model.layers}
    return [name for name in DENSE_LAYERS if name in names]


def set_head(model, weights: list[np.ndarray]) -> None:
    """Put a trained head's weights into the model's Dense layers (head_dense if any, predictions)."""
    for i, name in enumerate(_dense_names(model)):
        model.get_layer(name).set_weights(weights[2 * i : 2 * i + 2])


def head_weights(model) -> list[np.ndarray]:
    """The model's trained head weights [kernel, bias, ...] (head_dense if any, predictions)."""
    return [w for name in _dense_names(model) for w in model.get_layer(name).get_weights()]


def hidden(weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """The head's representation of pooled features: its hidden layer (head_dense, ReLU), or the
    pooled features themselves for the linear head (weights [kernel, bias])."""
    x = np.asarray(x, np.float32)
    return x if len(weights) == 2 else np.maximum(x @ weights[0] + weights[1], 0.0)


def head_probs(weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Softmax outputs of a trained head on pooled features (inference: no dropout): weights
    [kernel, bias, kernel, bias] (ReLU between) or [kernel, bias] (the linear head)."""
    logits = hidden(weights, x) @ weights[-2] + weights[-1]
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def figures(y: np.ndarray, probs: np.ndarray, n_classes: int) -> tuple[float, float, float]:
    """(cross-entropy, accuracy, AUC) of softmax outputs: AUC macro over the classes one-vs-rest
    (Keras's AUC(multi_label=True)); NaN when a class is absent."""
    from sklearn.metrics import roc_auc_score

    p = np.clip(probs, EPSILON, 1 - EPSILON)
    loss = float(-np.mean(np.log(p[np.arange(len(y)), y])))
    accuracy = float(np.mean(probs.argmax(axis=1) == y))
    onehot = np.eye(n_classes)[y]
    if onehot.min(axis=0).max() == 1 or onehot.max(axis=0).min() == 0:
        return loss, accuracy, float("nan")
    return loss, accuracy, float(roc_auc_score(onehot, probs, average="macro"))


def batches(rows: list[np.ndarray], batch_size: int, rngs: list[np.random.Generator]) -> np.ndarray:
    """One epoch's row indices (steps, K, batch_size): head k's rows shuffled by rngs[k], topped up
    from a second shuffle to the longest head's whole batches."""
    steps = max(math.ceil(len(r) / batch_size) for r in rows)
    out = np.empty((steps, len(rows), batch_size), dtype=np.int32)
    for k, (r, rng) in enumerate(zip(rows, rngs, strict=True)):
        order = rng.permutation(r)
        while len(order) < steps * batch_size:
            order = np.concatenate([order, rng.permutation(r)])
        out[:, k, :] = order[: steps * batch_size].reshape(steps, batch_size)
    return out


def dropout_scale(shape: tuple, rate: float, rngs: list[np.random.Generator]) -> np.ndarray:
    """Inverted-dropout multipliers (steps, K, batch, units): 0 or 1 / (1 - rate), head k's from rngs[k]."""
    keep = np.stack([rng.random((shape[0], *shape[2:])) >= rate for rng in rngs], axis=1)
    return keep.astype(np.float32) / np.float32(1.0 - rate)


def fit_heads(
    x: np.ndarray,
    y: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray | None]],
    shape: HeadShape,
    *,
    epochs: int,
    batch_size: int,
    sample_weight: list[np.ndarray],
    make_optimizer,
    seed: int,
    patience: int | None = None,
    algorithm: Algorithm | None = None,
    groups: np.ndarray | None = None,
    eager: bool = False,
) -> list[HeadFit]:
    """Train one head per (train rows, validation rows or None) of `splits` on pooled features x
    (N, D) with class indices y, all at once, from the same seeded initial weights.
    sample_weight[k]: the weights of split k's training rows; make_optimizer(steps_per_epoch): a
    Keras optimizer; patience: early stopping on each head's validation AUC (None: off);
    algorithm: the loss (training/algorithms; default ERM), fed each row's group (class x
    collection, ints in [0, n_groups); default: its class). With shape.standardize, head k trains
    on (x - mean) / std of its training rows and its returned weights take the raw x
    (fold_standardization). eager: each epoch's steps run eagerly, not as one XLA program (no
    compilation: cheaper for a few steps, slower beyond)."""
    import tensorflow as tf

    algorithm = algorithm or ERM()
    groups = np.asarray(y if groups is None else groups, np.int32)
    variables = initial_weights(len(splits), x.shape[1], shape, seed)
    optimizer = make_optimizer(max(math.ceil(len(train) / batch_size) for train, _ in splits))
    optimizer.build(variables)
    n_groups = int(groups.max()) + 1 if len(groups) else 1
    moments = standardization(x, [train for train, _ in splits]) if shape.standardize else None
    state = algorithm.initial_state(len(splits), n_groups)
    epoch_fn = _epoch_function(variables, optimizer, algorithm, state, n_groups, shape, moments, eager)
    weights = np.zeros((len(splits), len(x)), np.float32)
    for k, (train, _) in enumerate(splits):
        weights[k, train] = sample_weight[k]
    onehot = np.eye(shape.n_classes, dtype=np.float32)[y]
    tensors = [tf.constant(np.asarray(x, np.float32)), tf.constant(onehot), tf.constant(weights), tf.constant(groups)]
    # a head's random stream follows from its training rows, not from its place among the heads
    rngs = [np.random.default_rng([seed, zlib.crc32(np.asarray(t, np.int64).tobytes())]) for t, _ in splits]
    tracks = [_Track(patience if val is not None else None) for _, val in splits]
    for epoch in range(1, int(epochs) + 1):
        idx = batches([train for train, _ in splits], batch_size, rngs)
        scale = dropout_scale((*idx.shape, shape.units or x.shape[1]), shape.dropout, rngs) if _drops(shape) else 0
        extra = tf.constant(algorithm_draws(algorithm, idx.shape, rngs))
        probs, losses = (t.numpy() for t in epoch_fn(*tensors, tf.constant(idx), tf.constant(scale), extra))
        current = [v.numpy() for v in variables]
        for k, (_, val) in enumerate(splits):
            if not tracks[k].stopped:
                row = {"epoch": epoch, "loss": float(losses[:, k].mean())}
                fit = figures(y[idx[:, k].ravel()], probs[:, k].reshape(-1, shape.n_classes), shape.n_classes)
                row.update(accuracy=fit[1], auc=fit[2])
                if val is not None:
                    head = fold_standardization([w[k] for w in current], moments, k)
                    found = figures(y[val], head_probs(head, x[val]), shape.n_classes)
                    row.update(val_loss=found[0], val_accuracy=found[1], val_auc=found[2])
                tracks[k].update(row, [w[k].copy() for w in current])
        if all(t.stopped for t in tracks):
            break
    fits = [t.result() for t in tracks]
    return [HeadFit(fold_standardization(f.weights, moments, k), f.history, f.best_epoch) for k, f in enumerate(fits)]


def standardization(x: np.ndarray, rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), each (K, D) float32: of x's rows rows[k] per feature (a constant feature: std 1)."""
    parts = [np.asarray(x[r], np.float64) for r in rows]
    mean = np.stack([p.mean(axis=0) for p in parts])
    std = np.stack([p.std(axis=0) for p in parts])
    return mean.astype(np.float32), np.where(std > 1e-12, std, 1.0).astype(np.float32)


def fold_standardization(weights: list[np.ndarray], moments, k: int) -> list[np.ndarray]:
    """Head k's weights, trained on standardized features, as weights on the raw features: the
    first Dense layer's W' = W / std, b' = b - (mean / std) @ W (no change when moments is None)."""
    if moments is None:
        return weights
    mean, std = (np.asarray(m[k], np.float64) for m in moments)
    kernel = np.asarray(weights[0], np.float64)
    folded = [kernel / std[:, None], np.asarray(weights[1], np.float64) - (mean / std) @ kernel]
    return [w.astype(np.float32) for w in folded] + list(weights[2:])


def algorithm_draws(algorithm: Algorithm, shape: tuple, rngs: list[np.random.Generator]) -> np.ndarray:
    """The algorithm's random numbers for one epoch (steps, K, batch, m), head k's from a child of
    rngs[k] (spawning leaves the head's own stream, its batches and dropout, as ERM's); m = 0
    when it needs none (Algorithm.draws)."""
    found = [algorithm.draws(rng.spawn(1)[0], shape[0], shape[2]) for rng in rngs]
    if found[0] is None:
        return np.zeros((shape[0], shape[1], shape[2], 0), np.float32)
    return np.stack(found, axis=1).astype(np.float32)


def initial_weights(n_heads: int, d: int, shape: HeadShape, seed: int) -> list:
    """The heads' stacked weights as Keras variables, every head starting from the same seeded
    draw (Keras Dense's defaults: Glorot-uniform kernels, zero biases); [kernel, bias] only for
    the linear head."""
    import keras

    init = keras.initializers.GlorotUniform(seed=seed)
    if shape.units:
        first = [init((d, shape.units)), np.zeros(shape.units), init((shape.units, shape.n_classes))]
    else:
        first = [init((d, shape.n_classes))]
    first.append(np.zeros(shape.n_classes))
    return [keras.Variable(np.repeat(np.asarray(w, np.float32)[None], n_heads, axis=0)) for w in first]


class _Track:
    """One head's history and early stopping (keras.callbacks.EarlyStopping's rule: stop when
    `patience` epochs in a row did not beat the best validation AUC; keep the best epoch's weights)."""

    def __init__(self, patience: int | None):
        self.patience, self.rows, self.stopped = patience, [], False
        self.best, self.best_epoch, self.wait, self.weights = -np.inf, 0, 0, None

    def update(self, row: dict, weights: list[np.ndarray]) -> None:
        self.rows.append(row)
        if self.patience is None:
            self.weights, self.best_epoch = weights, row["epoch"]
            return
        if self.weights is None:
            self.weights, self.best_epoch = weights, row["epoch"]
        self.wait += 1
        if row["val_auc"] > self.best:
            self.best, self.best_epoch, self.weights, self.wait = row["val_auc"], row["epoch"], weights, 0
        elif self.wait >= self.patience and row["epoch"] > 1:
            self.stopped = True

    def result(self) -> HeadFit:
        return HeadFit(self.weights, pd.DataFrame(self.rows), int(self.best_epoch))


def _drops(shape: HeadShape) -> bool:
    """Whether a head draws dropout masks: the mlp head always (as it always has, also at rate 0),
    the linear head at a rate above 0 (its masks are as wide as the pooled features)."""
    return bool(shape.units) or shape.dropout > 0


def _epoch_function(
    variables,
    optimizer,
    algorithm: Algorithm,
    state: list,
    n_groups: int,
    shape: HeadShape,
    moments=None,
    eager: bool = False,
):
    """A tf.function (eager: the plain function) running one epoch of steps for all heads, the
    loss from `algorithm` (Algorithm.objective, with its `draws`) plus the kernels' L2 penalty;
    returns the softmax outputs of each step (steps, K, B, C) and each head's loss per step
    (steps, K). moments: (mean, std) (K, D) of standardization() when the heads train on
    standardized features."""
    import tensorflow as tf

    kernels = variables[::2]
    center, spread = (None, None) if moments is None else (tf.constant(m[:, None, :]) for m in moments)

    def forward(xb, scale):
        """(logits, the representation the output layer reads: the hidden units after dropout, or
        for the linear head the (standardized) features after dropout)."""
        if center is not None:
            xb = (xb - center) / spread
        if not shape.units:  # the linear head: dropout on the pooled features
            h = xb if scale is None else xb * scale
            return tf.einsum("kbd,kdc->kbc", h, variables[0]) + variables[1][:, None], h
        w1, b1, w2, b2 = variables
        h = tf.nn.relu(tf.einsum("kbd,kdh->kbh", xb, w1) + b1[:, None, :])
        h = h * scale
        return tf.einsum("kbh,khc->kbc", h, w2) + b2[:, None, :], h

    def probabilities(xb, scale):
        """(softmax outputs, representation) of forward: what Algorithm.objective's forward gives."""
        logits, h = forward(xb, scale)
        return tf.nn.softmax(logits), h

    def epoch(x, onehot, sample_weight, groups, idx, dropout_scale, draws):
        steps = tf.shape(idx)[0]
        probs = tf.TensorArray(tf.float32, size=steps)
        losses = tf.TensorArray(tf.float32, size=steps)
        for s in tf.range(steps):
            rows = idx[s]
            with tf.GradientTape() as tape:
                step_scale = dropout_scale[s] if _drops(shape) else None
                p, per_head = algorithm.objective(
                    lambda inputs: probabilities(inputs, step_scale),  # noqa: B023 (called in this step)
                    tf.gather(x, rows),
                    tf.gather(onehot, rows),
                    tf.gather(sample_weight, rows, batch_dims=1),
                    tf.gather(groups, rows),
                    draws[s],
                    state,
                    n_groups,
                )
                if shape.l2:  # Keras's L2 regularizer on each kernel, per head
                    per_head += shape.l2 * tf.add_n([tf.reduce_sum(tf.square(w), axis=[1, 2]) for w in kernels])
                loss = tf.reduce_sum(per_head)
            optimizer.apply(tape.gradient(loss, variables), variables)
            probs = probs.write(s, p)
            losses = losses.write(s, per_head)
        return probs.stack(), losses.stack()

    if eager:
        return epoch
    return tf.function(epoch, jit_compile=True)  # XLA: one fused program per epoch, ~2.5x faster on CPU
