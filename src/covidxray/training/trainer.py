"""Fitting one model: optimizer and schedule, compilation, per-epoch MLflow logging, and the
Trainer that builds, fits and predicts models of one FitSettings on in-memory images.

Frozen-feature cache: with a frozen base and no augmentation, the backbone's output does not
change during training, so the Trainer reads it from the feature store (feature_store.py: computed once
per image and key, shared by every training, sweep point, evaluation and validation) and trains
only the head on it; the full model then carries the trained head (shared layers). TensorFlow is
imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.training import stacked_heads
from covidxray.training.feature_store import FeatureStore, open_store
from covidxray.training.specs import FitSettings, OptimizerSettings
from covidxray.training.inputs import build_augmenter, class_weights, make_dataset

HISTORY_COLUMNS = ["fold", "epoch", "loss", "val_loss", "accuracy", "val_accuracy", "auc", "val_auc", "phase"]
EVAL_BATCH = 64


def make_schedule(schedule: str, lr: float, epochs: int, steps_per_epoch: int):
    """The learning rate, per optimizer step: constant; inverse_time = the tutorial's
    Adam(decay=lr/epochs), i.e. lr / (1 + lr/epochs * step); cosine = cosine decay to 0 over all
    steps of the phase."""
    import keras

    if schedule == "inverse_time":
        return keras.optimizers.schedules.InverseTimeDecay(lr, decay_steps=1, decay_rate=lr / max(1, epochs))
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, epochs * steps_per_epoch))
    return lr


def make_optimizer(optimizer: OptimizerSettings, lr: float, epochs: int, steps_per_epoch: int):
    """Adam (optimizer.name) at lr with the configured learning-rate schedule."""
    import keras

    return keras.optimizers.Adam(learning_rate=make_schedule(optimizer.schedule, lr, epochs, steps_per_epoch))


def compile_model(
    model,
    optimizer,
    n_classes: int,
    steps_per_execution: int = 1,
    loss="categorical_crossentropy",
    run_eagerly: bool = False,
) -> None:
    """Categorical cross-entropy; accuracy and AUC (macro over classes: for two classes, the
    covid AUC) per epoch. steps_per_execution > 1 runs that many train steps per call into the
    compiled graph (less per-step Python overhead; epoch-level results and callbacks unchanged);
    run_eagerly: no graph at all (no tracing: cheaper where a fit is a few steps)."""
    import keras

    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=["accuracy", keras.metrics.AUC(multi_label=True, num_labels=n_classes, name="auc")],
        steps_per_execution=int(steps_per_execution),
        run_eagerly=bool(run_eagerly),
    )


def epoch_logger(run_id: str | None, first_epoch: int = 1, prefix: str = ""):
    """A Keras callback logging each epoch's metrics to one MLflow run (step = epoch number)."""
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if run_id is None:
                return
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            stamp = int(time.time() * 1000)
            metrics = [
                Metric(f"{prefix}{k}", float(v), stamp, first_epoch + epoch)
                for k, v in (logs or {}).items()
                if isinstance(v, (int, float, np.floating)) and math.isfinite(float(v))
            ]
            if metrics:
                MlflowClient().log_batch(run_id, metrics=metrics)

    return EpochLogger()


def log_history(run_id: str | None, history: pd.DataFrame, prefix: str = "") -> None:
    """A finished training's per-epoch figures to one MLflow run (step = epoch), in one call."""
    if run_id is None:
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    stamp, names = int(time.time() * 1000), [c for c in HISTORY_COLUMNS if c not in ("fold", "epoch", "phase")]
    metrics = [
        Metric(f"{prefix}{name}", float(row[name]), stamp, int(row["epoch"]))
        for _, row in history.iterrows()
        for name in names
        if name in row and math.isfinite(float(row[name]))
    ]
    if metrics:
        MlflowClient().log_batch(run_id, metrics=metrics)


@dataclass
class FitResult:
    history: pd.DataFrame
    best_epochs: list[int]  # per phase, 1-based within the phase
    epochs_run: int
    seconds: float
    images_seen: int


@dataclass
class Trainer:
    """Builds and trains models of one FitSettings on uint8 images (N, S, S) with class indices
    y. With a frozen base and no augmentation it trains the head on the backbone's features,
    read from (or computed into) the feature store `store` (default: settings.feature_store;
    memory only when that is None) and kept in `cache` for all folds and the final model."""

    settings: FitSettings
    images: np.ndarray
    y: np.ndarray
    n_classes: int
    strategy: object = None
    cache: dict = field(default_factory=dict)
    verbose: int = 2
    feature_cache: bool = True  # False: always train the full model on images (for comparison)
    cache_seconds: float = 0.0  # time spent obtaining features (store reads and misses)
    store: FeatureStore | None = None
    groups: np.ndarray | None = None  # each row's class x collection group (algorithms that use domains)
    reused: dict | None = None  # a dict: new_model hands out again the models it built (see there)

    def __post_init__(self):
        import tensorflow as tf

        self.y = np.asarray(self.y).astype(int)
        if self.settings.distribute == "mirrored":
            self.strategy = tf.distribute.MirroredStrategy()
        else:
            self.strategy = tf.distribute.get_strategy()
        if self.store is None:
            self.store = open_store(self.settings.feature_store)

    @property
    def global_batch(self) -> int:
        return self.settings.batch_size * int(self.strategy.num_replicas_in_sync)

    @property
    def uses_cache(self) -> bool:
        """Frozen base + no augmentation: the base's output is fixed, train the head on it."""
        return self.feature_cache and self.settings.model.freeze_base and self.settings.augment.name == "none"

    @property
    def fine_tunes(self) -> bool:
        ft = self.settings.model.fine_tune
        return self.settings.model.freeze_base and ft.unfreeze_top > 0 and ft.epochs > 0

    def new_model(self):
        """A freshly built model, seeded: every fold starts from the same initial weights.

        With `reused` (a dict; LOCO and studies, which free each model before asking for the next),
        a model whose head trains as a stacked head is built once per configuration and handed out
        again, its head weights reset to the built ones: its backbone is frozen and never trained, and
        the stacked heads start from their own seeded weights (stacked_heads.initial_weights), so it
        only carries the backbone and the head's shape. Building the backbone is most of the time a
        head-only recipe spends besides training."""
        import keras

        from covidxray.networks import builders

        keras.utils.set_random_seed(self.settings.seed)
        config = self.settings.model.as_config()
        key = ("model", repr(config), self.settings.image_size, self.n_classes, self.settings.seed)
        if self.reused is not None and key in self.reused:
            model, head = self.reused[key]
            stacked_heads.set_head(model, head)
            return model
        with self.strategy.scope():
            model = builders.build_model(config, self.settings.image_size, self.n_classes)
        if self.reused is not None and self._stacked_shape(model) is not None:
            self.reused[key] = (model, stacked_heads.head_weights(model))
        return model

    def features(self, model) -> np.ndarray:
        """The backbone's output for every image: from the feature store, once per distinct backbone."""
        from covidxray.training.extraction import backbone_features

        key = _backbone_key(model)
        if key not in self.cache:
            start = time.perf_counter()
            self.cache[key] = backbone_features(model, self.images, self.store, label="train")
            self.cache_seconds += time.perf_counter() - start
        return self.cache[key]

    def pooled_features(self, model) -> np.ndarray:
        """features() through the model's pooling and flatten layers, (N, D): what the head's
        trainable layers see; from the feature store, which keeps this table too."""
        from covidxray.training.extraction import pooled_features

        key = ("pooled", *_backbone_key(model), model.get_layer("head_pool").pool_size)
        if key not in self.cache:
            start = time.perf_counter()
            self.cache[key] = pooled_features(model, self.images, self.store, label="train")
            self.cache_seconds += time.perf_counter() - start
        return self.cache[key]

    def stacked_head(self, model) -> stacked_heads.HeadShape | None:
        """The head's shape when it trains on pooled features with the other heads of a
        cross-validation (stacked_heads.py): frozen base, no augmentation, no fine-tuning, the standard
        head. None: the model trains with Keras's fit."""
        shape = self._stacked_shape(model)
        if shape is None and self.settings.model.head.standardize:
            raise CovidXrayError(
                "model.head.standardize=true: standardization requested for a head that trains from pixels "
                "or is not a standard head (allowed: false, or a frozen base, augment=none, no fine-tuning)"
            )
        return shape

    def _stacked_shape(self, model) -> stacked_heads.HeadShape | None:
        head = self.settings.model.head
        if not self.uses_cache or self.fine_tunes:
            return None
        return stacked_heads.head_shape(model, head.l2, head.standardize)

    def cross_validate(self, splits: list, epochs: list[int], labels=None, open_run=None) -> list:
        """One model per (train rows, validation rows) of `splits`: [(softmax outputs on its
        validation rows, FitResult)]. Heads on cached features train together (stacked_heads.py), other
        models one after the other. open_run(label), when given, is called as a fold starts and
        returns the run its per-epoch figures go to."""
        import keras

        labels = list(range(len(splits))) if labels is None else list(labels)
        open_run = open_run or (lambda label: None)
        model = self.new_model()
        shape = self.stacked_head(model)
        if shape is not None:
            run_ids = [open_run(label) for label in labels]
            fits, results = self._fit_heads(model, shape, splits, epochs[0], labels)
            x = self.pooled_features(model)
            for result, run_id in zip(results, run_ids, strict=True):
                log_history(run_id, result.history)
            return [(stacked_heads.head_probs(f.weights, x[val]), r) for f, r, (_, val) in zip(fits, results, splits)]
        out = []
        for k, ((train, val), label) in enumerate(zip(splits, labels, strict=True)):
            model = model if k == 0 else self.new_model()
            result = self.fit(model, train, val, epochs, run_id=open_run(label), fold_label=label)
            out.append((self.predict(model, val), result))
            del model
            keras.backend.clear_session()  # free the fold's graphs; the next model is re-seeded
        return out

    def _fit_heads(self, model, shape: stacked_heads.HeadShape, splits: list, n_epochs: int, labels: list):
        """stacked_heads.fit_heads on the pooled features with this recipe: ([HeadFit], [FitResult]);
        each result's seconds are its share of the joint training."""
        s, x = self.settings, self.pooled_features(model)
        start = time.perf_counter()
        fits = stacked_heads.fit_heads(
            x,
            self.y,
            splits,
            shape,
            epochs=n_epochs,
            batch_size=self.global_batch,
            sample_weight=[class_weights(self.y[train], self.n_classes, s.class_weights) for train, _ in splits],
            make_optimizer=lambda steps: make_optimizer(s.optimizer, s.optimizer.lr, n_epochs, steps),
            seed=s.seed,
            patience=s.patience if s.early_stopping else None,
            algorithm=s.algorithm.build(),
            groups=self.groups,
            eager=s.run_eagerly,
        )
        seconds = (time.perf_counter() - start) / len(splits)
        results = []
        for fit, (train, _), label in zip(fits, splits, labels, strict=True):
            history = fit.history.assign(phase="head", fold=label)
            history = history.reindex(columns=HISTORY_COLUMNS)
            results.append(FitResult(history, [fit.best_epoch], len(history), seconds, len(history) * len(train)))
        return fits, results

    def phases(self, epochs: list[int]) -> list[tuple[str, int, float]]:
        """(phase, epochs, learning rate): the head on cached features or the whole model, then,
        when fine-tuning, epochs[1] more with the top of the base unfrozen."""
        lr = self.settings.optimizer.lr
        phases = [("head" if self.uses_cache else "train", epochs[0], lr)]
        if self.fine_tunes and len(epochs) > 1 and epochs[1] > 0:
            phases.append(("fine_tune", epochs[1], lr * self.settings.model.fine_tune.lr_factor))
        return phases

    def fit(
        self,
        model,
        train_idx: np.ndarray,
        val_idx: np.ndarray | None,
        epochs: list[int],
        run_id: str | None = None,
        fold_label="final",
        log_prefix: str = "",
    ) -> FitResult:
        """Train model on rows train_idx (validating on val_idx if given, with early stopping when
        it is on) phase by phase; the history has one row per epoch, numbered across phases.
        A standard head on cached features trains as stacked_heads.py does (see cross_validate)."""
        shape = self.stacked_head(model)
        if shape is not None:
            fits, results = self._fit_heads(model, shape, [(train_idx, val_idx)], epochs[0], [fold_label])
            stacked_heads.set_head(model, fits[0].weights)
            log_history(run_id, results[0].history, log_prefix)
            return results[0]
        histories, best, start, cache_before = [], [], time.perf_counter(), self.cache_seconds
        for phase, n_epochs, lr in self.phases(epochs):
            done = sum(len(h) for h in histories)
            logger = epoch_logger(run_id, first_epoch=done + 1, prefix=log_prefix)
            frame, best_epoch = self._fit_phase(model, phase, n_epochs, lr, train_idx, val_idx, logger, len(histories))
            frame.insert(0, "epoch", np.arange(done + 1, done + len(frame) + 1))
            histories.append(frame)
            best.append(best_epoch)
        history = pd.concat(histories, ignore_index=True)
        history.insert(0, "fold", fold_label)
        for column in HISTORY_COLUMNS:
            if column not in history.columns:
                history[column] = np.nan
        seconds = time.perf_counter() - start - (self.cache_seconds - cache_before)  # training only
        run = len(history)
        return FitResult(history[HISTORY_COLUMNS], best, run, seconds, run * len(train_idx))

    def _phase_target(self, model, phase: str):
        """(inputs, the model to fit, augmenter) of a phase: the head on features, or the whole model."""
        from covidxray.networks import builders

        if phase == "head":
            source = self.features(model)
            with self.strategy.scope():  # Keras fits a model under the strategy it was made in
                return source, builders.split_at_backbone(model)[2], None
        if phase == "fine_tune":
            builders.set_fine_tune(model, self.settings.model.fine_tune.unfreeze_top)
        return self.images, model, build_augmenter(self.settings.augment, self.settings.seed)

    def _datasets(self, source: np.ndarray, train_idx, val_idx, augmenter):
        """(training dataset: shuffled, weighted, augmented; validation dataset or None)."""
        s, onehot = self.settings, np.eye(self.n_classes, dtype=np.float32)
        w = class_weights(self.y[train_idx], self.n_classes, s.class_weights)
        train_ds = make_dataset(
            source[train_idx], onehot[self.y[train_idx]], w, self.global_batch, True, s.seed, augmenter
        )
        if val_idx is None:
            return train_ds, None
        return train_ds, make_dataset(source[val_idx], onehot[self.y[val_idx]], None, EVAL_BATCH)

    def _fit_phase(
        self, model, phase: str, n_epochs: int, lr: float, train_idx, val_idx, logger, seed_offset: int
    ) -> tuple[pd.DataFrame, int]:
        """One phase of fit: (per-epoch history with its phase, best epoch within the phase)."""
        import keras

        s = self.settings
        source, target, augmenter = self._phase_target(model, phase)
        keras.utils.set_random_seed(s.seed + seed_offset)
        steps = math.ceil(len(train_idx) / self.global_batch)
        with self.strategy.scope():
            optimizer = make_optimizer(s.optimizer, lr, n_epochs, steps)
            compile_model(target, optimizer, self.n_classes, s.steps_per_execution, self._keras_loss(), s.run_eagerly)
        train_ds, val_ds = self._datasets(source, train_idx, val_idx, augmenter)
        callbacks, stopper = [logger], None
        if s.early_stopping and val_idx is not None:
            stopper = keras.callbacks.EarlyStopping(
                monitor="val_auc", mode="max", patience=s.patience, restore_best_weights=True, verbose=0
            )
            callbacks.append(stopper)
        # the dataset shuffles (seeded), not fit
        hist = target.fit(
            train_ds,
            validation_data=val_ds,
            epochs=int(n_epochs),
            callbacks=callbacks,
            shuffle=False,
            verbose=self.verbose,
        )
        frame = pd.DataFrame(hist.history)
        frame["phase"] = phase
        return frame, int(stopper.best_epoch) + 1 if stopper is not None else len(frame)

    def _keras_loss(self):
        """The algorithm's loss for Keras's fit; one line where it has none."""
        loss = self.settings.algorithm.build().keras_loss()
        if loss is None:
            raise CovidXrayError(
                f"algorithm.name={self.settings.algorithm.name} trains only the stacked heads on frozen features "
                "(model.freeze_base=true, augment=none, no fine-tuning): use algorithm=erm for this model"
            )
        return loss

    def predict(self, model, idx: np.ndarray) -> np.ndarray:
        """Softmax outputs for rows idx (through the cache when the model was trained on it)."""
        from covidxray.training.extraction import head_outputs

        if self.stacked_head(model) is not None:
            return stacked_heads.head_probs(stacked_heads.head_weights(model), self.pooled_features(model)[idx])
        if self.uses_cache and not self.fine_tunes:
            return head_outputs(model, self.features(model)[idx])
        return np.asarray(model.predict(make_dataset(self.images[idx], None, None, EVAL_BATCH), verbose=0))


def _backbone_key(model) -> tuple[str, str]:
    """What decides a model's backbone features besides the pixels: its weights and its feature
    source (a backbone built with model.features=blocks has the same weights as with last)."""
    from covidxray.networks.builders import feature_source
    from covidxray.training.extraction import weights_digest

    backbone = model.get_layer("backbone")
    return weights_digest(backbone), feature_source(backbone)
