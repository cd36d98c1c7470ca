"""train stage: K-fold cross-validation on the non-test images, then the final model.

For each CV fold k (cv.folds: all | the first n): train on the other folds, validate on fold k
(early stopping on validation AUC, best weights restored), predict fold k: the out-of-fold (OOF)
predictions. The decision threshold is chosen on the OOF predictions (train.threshold: youden |
sensitivity) and saved with the model. Then the final model is trained on all non-test images
with the same config, for the CV's median best epoch when early stopping is on. The test
partition is never read here.

Outputs (DVC: paths.models and paths.reports/cv; as a Hydra app: the job's output directory):
  models/model.keras       the final model (models.py layout; loads after `import covidxray.models`)
  models/model.json        classes, image_size, resize, threshold, threshold_method, model, MLflow ids
  reports/cv/oof.csv       image_id, patient_id, label, y, fold, p_<class>...
  reports/cv/metrics.json  cv_<metric>_mean/_std over folds, oof_<metric> at the threshold, threshold
  reports/cv/history.csv   fold, epoch, loss, val_loss, accuracy, val_accuracy, auc, val_auc, phase

MLflow: one parent run (resolved config as params, aggregate metrics, code/data/run tags, the
config as an artifact, the registered final model) with one nested run per fold (per-epoch
curves, confusion matrix and training-curve figures).

Frozen-feature cache: with a frozen base and no augmentation, the backbone's output does not
change during training, so it is computed once per image (for all folds and the final model) and
only the head is trained on it; the full model then carries the trained head (shared layers).
`main` returns the value of `optimized_metric` (default cv_auc_mean) for Hydra sweepers.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray import CovidXrayError

OPTIMIZERS = ("adam",)
SCHEDULES = ("constant", "inverse_time", "cosine")
AUGMENTS = ("none", "tutorial", "standard")
CLASS_WEIGHTS = ("balanced", "none")
THRESHOLDS = ("youden", "sensitivity")
DISTRIBUTE = ("none", "mirrored")
HISTORY_COLUMNS = ["fold", "epoch", "loss", "val_loss", "accuracy", "val_accuracy", "auc", "val_auc", "phase"]
FOLD_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "loss", "best_epoch", "wall_s", "images_per_s")
OOF_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "pr_auc", "brier", "ece")
DEFAULT_OPTIMIZED_METRIC = "cv_auc_mean"
EVAL_BATCH = 64


# -- configuration checks (before any data is read or model trained) --------------------------------

def _fail(key: str, allowed: str, got) -> None:
    raise CovidXrayError(f"{key} must be {allowed}, got {got!r}")


def _int(cfg, key: str, minimum: int, allowed: str | None = None) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        _fail(key, allowed or f"an integer >= {minimum}", value)
    return int(value)


def _num(cfg, key: str, lo: float, hi: float, lo_open: bool, hi_open: bool, allowed: str) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, allowed, value)
    if (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
        _fail(key, allowed, value)
    return float(value)


def _choice(cfg, key: str, allowed: tuple) -> str:
    value = _get(cfg, key)
    if value not in allowed:
        _fail(key, f"one of {', '.join(allowed)}", value)
    return str(value)


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        if node is None or not hasattr(node, "get"):
            return None
        node = node.get(part)
    return node


def check_config(cfg) -> None:
    """Reject any training config value no run can honour: a CovidXrayError naming the key and
    what is allowed, raised before anything is read or trained."""
    from covidxray import models

    name = _choice(cfg, "model.name", models.MODEL_NAMES)
    size = _int(cfg, "data.image_size", 1, "a positive integer (pixels)")
    weights = _get(cfg, "model.weights")
    weights = "none" if weights is None else str(weights)
    pretrained = models.is_pretrainable(name)
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        _fail("model.weights", "imagenet, none, or the path of an existing weights file", weights)
    if weights == "imagenet" and not pretrained:
        _fail("model.weights", f"none or a weights file path for {name} (it has no ImageNet weights)", weights)
    if not isinstance(_get(cfg, "model.freeze_base"), bool):
        _fail("model.freeze_base", "true or false", _get(cfg, "model.freeze_base"))
    filters = _get(cfg, "model.filters") or [16, 32, 64, 64]
    if name == "small_cnn":
        if not all(isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in filters) or not filters:
            _fail("model.filters", "a non-empty list of positive integers", list(filters))
        fmap = models.feature_map_size(name, size, filters)
        if fmap < 1:
            raise CovidXrayError(
                f"data.image_size={size} is too small for model.filters={list(filters)}: {len(filters)} "
                f"2x2 poolings need at least {2 ** len(filters)} px (allowed: data.image_size >= "
                f"{2 ** len(filters)}, or fewer model.filters)")
    elif size < models.MIN_IMAGENET_SIZE:
        raise CovidXrayError(
            f"data.image_size={size} is too small for model.name={name}: ImageNet backbones take "
            f"inputs of at least {models.MIN_IMAGENET_SIZE} px (allowed: data.image_size >= "
            f"{models.MIN_IMAGENET_SIZE})")
    _int(cfg, "model.head.pool_size", 1)
    _int(cfg, "model.head.dense_units", 1)
    _num(cfg, "model.head.dropout", 0.0, 1.0, False, True, "a number in [0, 1)")
    unfreeze = _int(cfg, "model.fine_tune.unfreeze_top", 0)
    _int(cfg, "model.fine_tune.epochs", 0)
    _num(cfg, "model.fine_tune.lr_factor", 0.0, math.inf, True, True, "a number > 0")
    if unfreeze > 0 and not _get(cfg, "model.freeze_base"):
        raise CovidXrayError("model.fine_tune.unfreeze_top > 0 needs model.freeze_base=true "
                             "(a second phase after training the head on a frozen base)")
    if unfreeze > 0 and not pretrained:
        raise CovidXrayError(f"model.fine_tune.unfreeze_top must be 0 for {name} (nothing pretrained to unfreeze)")

    _choice(cfg, "optimizer.name", OPTIMIZERS)
    _num(cfg, "optimizer.lr", 0.0, math.inf, True, True, "a number > 0")
    _choice(cfg, "optimizer.schedule", SCHEDULES)

    aug = _choice(cfg, "augment.name", AUGMENTS)
    if aug in ("tutorial", "standard"):
        _num(cfg, "augment.rotation_deg", 0.0, 180.0, False, False, "a number of degrees in [0, 180]")
    if aug == "standard":
        for key in ("shift", "zoom", "brightness", "contrast"):
            _num(cfg, f"augment.{key}", 0.0, 1.0, False, True, "a fraction in [0, 1)")
    if _get(cfg, "augment.horizontal_flip") not in (None, False, True):
        _fail("augment.horizontal_flip", "true or false", _get(cfg, "augment.horizontal_flip"))

    _int(cfg, "train.epochs", 1)
    _int(cfg, "train.batch_size", 1)
    if _get(cfg, "train.steps_per_execution") is not None:
        _int(cfg, "train.steps_per_execution", 1)
    if not isinstance(_get(cfg, "train.early_stopping.enabled"), bool):
        _fail("train.early_stopping.enabled", "true or false", _get(cfg, "train.early_stopping.enabled"))
    _int(cfg, "train.early_stopping.patience", 0)
    _choice(cfg, "train.class_weights", CLASS_WEIGHTS)
    _choice(cfg, "train.threshold", THRESHOLDS)
    _num(cfg, "train.target_sensitivity", 0.0, 1.0, True, False, "a number in (0, 1]")
    if not isinstance(_get(cfg, "train.deterministic"), bool):
        _fail("train.deterministic", "true or false", _get(cfg, "train.deterministic"))
    _choice(cfg, "train.distribute", DISTRIBUTE)

    folds = _get(cfg, "cv.folds")
    if folds != "all":
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            _fail("cv.folds", "all or an integer >= 2", folds)
        split_folds = _get(cfg, "split.folds")
        if isinstance(split_folds, int) and folds > split_folds:
            _fail("cv.folds", f"all or an integer in [2, split.folds={split_folds}]", folds)
    if not isinstance(_get(cfg, "cv.final_model"), bool):
        _fail("cv.final_model", "true or false", _get(cfg, "cv.final_model"))
    if _get(cfg, "split.folds") is not None:
        _int(cfg, "split.folds", 2)
    _int(cfg, "seed", 0, "an integer >= 0")
    wanted = cfg.get("optimized_metric") if hasattr(cfg, "get") else None
    if wanted is not None and wanted not in metric_names():
        _fail("optimized_metric", f"one of {', '.join(metric_names())}", wanted)


def metric_names() -> tuple[str, ...]:
    """The metrics a training run reports (metrics.json, the parent MLflow run, sweep objectives)."""
    names = [f"cv_{m}_{s}" for m in FOLD_METRICS for s in ("mean", "std")]
    return tuple(names + [f"oof_{m}" for m in OOF_METRICS] + ["threshold"])


# -- data -------------------------------------------------------------------------------------------

@dataclass
class CVData:
    """The non-test images (uint8 (N, S, S)) with their rows, classes, and fold numbers."""
    images: np.ndarray
    rows: pd.DataFrame            # image_id, patient_id, label, y, fold
    classes: list[str]
    folds: list[int]

    @property
    def y(self) -> np.ndarray:
        return self.rows["y"].to_numpy().astype(int)


def load_cv_data(cfg) -> CVData:
    """The curated images of the CV partition joined with their folds; the test partition is
    dropped here and never seen by training."""
    from covidxray.images import load_curated
    from covidxray.split import load_splits

    images, index, classes = load_curated(cfg.paths.curated)
    splits = load_splits(cfg.paths.splits)
    size = int(cfg.data.image_size)
    if images.ndim != 3 or images.shape[1:] != (size, size):
        raise CovidXrayError(
            f"data.image_size={size} but the curated images in {cfg.paths.curated} are "
            f"{'x'.join(map(str, images.shape[1:]))} px: re-run curate (`dvc repro curate`) or set "
            f"data.image_size={images.shape[1]}")
    missing = set(index["image_id"]) - set(splits["image_id"])
    if missing:
        raise CovidXrayError(f"{len(missing)} curated images are not in {cfg.paths.splits} (re-run split)")
    joined = index[["image_id", "patient_id", "label", "y"]].merge(
        splits[["image_id", "partition", "fold"]], on="image_id", how="left", validate="one_to_one")
    keep = np.flatnonzero((joined["partition"] == "cv").to_numpy())
    rows = joined.iloc[keep].drop(columns="partition").reset_index(drop=True)
    rows["fold"] = rows["fold"].astype(int)
    folds = sorted(rows["fold"].unique().tolist())
    if len(folds) < 2 or folds != list(range(len(folds))):
        raise CovidXrayError(f"{cfg.paths.splits}: CV folds must be 0..K-1 with K >= 2, found {folds}")
    wanted = cfg.cv.folds
    if wanted != "all":
        if int(wanted) > len(folds):
            _fail("cv.folds", f"all or an integer in [2, {len(folds)}] (the folds in {cfg.paths.splits})", wanted)
        folds = folds[: int(wanted)]
    y = rows["y"].to_numpy()
    if len(classes) < 2 or y.min() < 0 or y.max() >= len(classes):
        raise CovidXrayError(f"curated labels y must index the classes {classes}")
    for k in folds:
        present = set(rows.loc[rows["fold"] == k, "y"])
        if len(present) < 2:
            raise CovidXrayError(f"CV fold {k} holds only class {sorted(present)}: cannot validate on it")
    return CVData(np.ascontiguousarray(images[keep]), rows, list(classes), folds)


# -- input pipeline, augmentation, optimizer ----------------------------------------------------------

def _random_affine_layer():
    """RandomAffine: rotation, translation and zoom drawn per image and applied as ONE projective
    warp (bilinear, nearest fill), instead of one warp per Keras layer: the same kinds of change
    at a third of the resampling cost (each warp costs as much as a small CNN's training step on
    a 2-core CPU)."""
    import keras
    import tensorflow as tf

    class RandomAffine(keras.layers.Layer):
        def __init__(self, rotation_deg=0.0, shift=0.0, zoom=0.0, seed=None, **kwargs):
            super().__init__(**kwargs)
            self.rotation = float(rotation_deg) * math.pi / 180.0
            self.shift, self.zoom, self.seed = float(shift), float(zoom), seed

        def call(self, images, training=True):
            if not training:
                return images
            shape = tf.shape(images)
            n, h, w = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)

            def uniform(limit, offset):
                seed = None if self.seed is None else self.seed + offset
                return tf.random.uniform([n], -limit, limit, seed=seed)

            theta = uniform(self.rotation, 0)
            scale = 1.0 / (1.0 + uniform(self.zoom, 1))  # output -> input: > 1 shows more (zoom out)
            tx, ty = uniform(self.shift, 2) * w, uniform(self.shift, 3) * h
            cos, sin = tf.cos(theta) * scale, tf.sin(theta) * scale
            cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
            # input point = A (output point - centre) + centre + shift, A = scale * rotation(theta)
            transforms = tf.stack([cos, -sin, cx - cos * cx + sin * cy + tx,
                                   sin, cos, cy - sin * cx - cos * cy + ty,
                                   tf.zeros([n]), tf.zeros([n])], axis=1)
            return tf.raw_ops.ImageProjectiveTransformV3(
                images=images, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
                interpolation="BILINEAR", fill_mode="NEAREST")

        def compute_output_shape(self, input_shape):
            return input_shape

    return RandomAffine


def build_augmenter(aug_cfg, seed: int):
    """Augmentation layers for augment.name (None for none); they run in the tf.data map, on the
    fly, for training batches only. Fill mode "nearest", as ImageDataGenerator's.

    tutorial: Keras RandomRotation (the tutorial's rotation_range). standard: one fused
    RandomAffine warp (rotation + shift + zoom), then Keras RandomBrightness and RandomContrast."""
    import keras
    from keras import layers

    name = aug_cfg.get("name", "none")
    if name == "none":
        return None
    rotation = float(aug_cfg.get("rotation_deg", 0))
    steps = []
    if name == "tutorial" and rotation > 0:
        steps.append(layers.RandomRotation(rotation / 360.0, fill_mode="nearest", seed=seed, name="rotation"))
    if name == "standard":
        shift, zoom = float(aug_cfg.get("shift", 0)), float(aug_cfg.get("zoom", 0))
        if rotation > 0 or shift > 0 or zoom > 0:
            steps.append(_random_affine_layer()(rotation, shift, zoom, seed=seed, name="affine"))
        if float(aug_cfg.get("brightness", 0)) > 0:
            steps.append(layers.RandomBrightness(float(aug_cfg.brightness), value_range=(0, 255),
                                                 seed=seed + 3, name="brightness"))
        if float(aug_cfg.get("contrast", 0)) > 0:
            steps.append(layers.RandomContrast(float(aug_cfg.contrast), value_range=(0, 255),
                                               seed=seed + 4, name="contrast"))
    if aug_cfg.get("horizontal_flip", False):
        steps.append(layers.RandomFlip("horizontal", seed=seed + 5, name="flip"))
    return keras.Sequential(steps, name="augment") if steps else None


def make_dataset(x: np.ndarray, y_onehot: np.ndarray | None, weights: np.ndarray | None, batch_size: int,
                 shuffle: bool = False, seed: int = 0, augmenter=None):
    """A tf.data pipeline over in-memory arrays: shuffled indices -> batches -> gather (uint8
    images become float32 (B, S, S, 1) raw pixels) -> augmentation -> prefetch.

    x is uint8 images (N, S, S) or cached float features (N, h, w, c). Yields (x, y, w) with
    weights, (x, y) without, or x alone without labels."""
    import tensorflow as tf

    n = len(x)
    data = tf.convert_to_tensor(x)
    labels = None if y_onehot is None else tf.convert_to_tensor(y_onehot.astype(np.float32))
    w = None if weights is None else tf.convert_to_tensor(weights.astype(np.float32))
    is_image = x.dtype == np.uint8

    def load(idx):
        batch = tf.gather(data, idx)
        if is_image:
            batch = tf.cast(batch, tf.float32)[..., None]
        if augmenter is not None:
            batch = augmenter(batch, training=True)
        if labels is None:
            return batch
        if w is None:
            return batch, tf.gather(labels, idx)
        return batch, tf.gather(labels, idx), tf.gather(w, idx)

    ds = tf.data.Dataset.range(n)
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> np.ndarray:
    """Per-sample weights: balanced = n / (K * n_c) (sklearn's), none = ones."""
    if mode == "none":
        return np.ones(len(y), dtype=np.float32)
    counts = np.bincount(y, minlength=n_classes).astype(float)
    per_class = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return per_class[y].astype(np.float32)


def make_schedule(opt_cfg, lr: float, epochs: int, steps_per_epoch: int):
    """The learning rate, per optimizer step: constant; inverse_time = the tutorial's
    Adam(decay=lr/epochs), i.e. lr / (1 + lr/epochs * step); cosine = cosine decay to 0 over all
    steps of the phase."""
    import keras

    schedule = opt_cfg.get("schedule", "constant")
    if schedule == "inverse_time":
        return keras.optimizers.schedules.InverseTimeDecay(lr, decay_steps=1, decay_rate=lr / max(1, epochs))
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, epochs * steps_per_epoch))
    return lr


def make_optimizer(opt_cfg, lr: float, epochs: int, steps_per_epoch: int):
    """Adam (optimizer.name) with the configured learning-rate schedule."""
    import keras

    return keras.optimizers.Adam(learning_rate=make_schedule(opt_cfg, lr, epochs, steps_per_epoch))


def _compile(model, optimizer, n_classes: int, steps_per_execution: int = 1) -> None:
    """Categorical cross-entropy; accuracy and AUC (macro over classes: for two classes, the
    covid AUC) per epoch. steps_per_execution > 1 runs that many train steps per call into the
    compiled graph (less per-step Python overhead; epoch-level results and callbacks unchanged)."""
    import keras

    model.compile(optimizer=optimizer, loss="categorical_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(multi_label=True, num_labels=n_classes, name="auc")],
                  steps_per_execution=int(steps_per_execution))


# -- training -------------------------------------------------------------------------------------------

def _epoch_logger(run_id: str | None, first_epoch: int = 1, prefix: str = ""):
    """A Keras callback logging each epoch's metrics to one MLflow run (step = epoch number)."""
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if run_id is None:
                return
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            stamp = int(time.time() * 1000)
            metrics = [Metric(f"{prefix}{k}", float(v), stamp, first_epoch + epoch)
                       for k, v in (logs or {}).items()
                       if isinstance(v, (int, float, np.floating)) and math.isfinite(float(v))]
            if metrics:
                MlflowClient().log_batch(run_id, metrics=metrics)

    return EpochLogger()


@dataclass
class FitResult:
    history: pd.DataFrame
    best_epochs: list[int]          # per phase, 1-based within the phase
    epochs_run: int
    seconds: float
    images_seen: int


@dataclass
class Trainer:
    """Builds and trains models of one config; holds the frozen-feature cache."""
    cfg: object
    data: CVData
    strategy: object = None
    cache: dict = field(default_factory=dict)
    verbose: int = 2
    feature_cache: bool = True    # False: always train the full model on images (for comparison)
    cache_seconds: float = 0.0    # time spent computing cached features

    def __post_init__(self):
        import tensorflow as tf

        if self.cfg.train.distribute == "mirrored":
            self.strategy = tf.distribute.MirroredStrategy()
        else:
            self.strategy = tf.distribute.get_strategy()

    # configuration shortcuts
    @property
    def n_classes(self) -> int:
        return len(self.data.classes)

    @property
    def global_batch(self) -> int:
        return int(self.cfg.train.batch_size) * int(self.strategy.num_replicas_in_sync)

    @property
    def uses_cache(self) -> bool:
        """Frozen base + no augmentation: the base's output is fixed, train the head on it."""
        return self.feature_cache and bool(self.cfg.model.freeze_base) and self.cfg.augment.name == "none"

    @property
    def fine_tunes(self) -> bool:
        ft = self.cfg.model.fine_tune
        return bool(self.cfg.model.freeze_base) and int(ft.unfreeze_top) > 0 and int(ft.epochs) > 0

    def new_model(self):
        """A freshly built model, seeded: every fold starts from the same initial weights."""
        import keras

        from covidxray import models

        keras.utils.set_random_seed(int(self.cfg.seed))
        with self.strategy.scope():
            return models.build_model(self.cfg.model, int(self.cfg.data.image_size), self.n_classes)

    def features(self, model) -> np.ndarray:
        """The backbone's output for every CV image, computed once per distinct backbone."""
        import keras

        from covidxray import models

        preprocess, backbone, _ = models.split_at_backbone(model)
        digest = hashlib.sha1()
        for w in backbone.get_weights():
            digest.update(np.ascontiguousarray(w).tobytes())
        key = digest.hexdigest()
        if key not in self.cache:
            inputs = keras.Input(model.input.shape[1:])
            extractor = keras.Model(inputs, backbone(preprocess(inputs), training=False))
            start = time.perf_counter()
            ds = make_dataset(self.data.images, None, None, EVAL_BATCH)
            self.cache[key] = np.asarray(extractor.predict(ds, verbose=0), dtype=np.float32)
            took = time.perf_counter() - start
            self.cache_seconds += took
            print(f"train: frozen-feature cache: backbone run once over {len(self.data.images)} images "
                  f"-> {self.cache[key].shape[1:]} in {took:.1f}s")
        return self.cache[key]

    def fit(self, model, train_idx: np.ndarray, val_idx: np.ndarray | None, epochs: list[int],
            run_id: str | None = None, fold_label="final", log_prefix: str = "") -> FitResult:
        """Train model on rows train_idx (validating on val_idx if given) for epochs[0] epochs,
        then, when fine-tuning, epochs[1] more with the top of the base unfrozen."""
        import keras

        from covidxray import models

        cfg, n_cls = self.cfg, self.n_classes
        y = self.data.y
        onehot = np.eye(n_cls, dtype=np.float32)
        w = class_weights(y[train_idx], n_cls, cfg.train.class_weights)
        seed = int(cfg.seed)
        es_on = bool(cfg.train.early_stopping.enabled) and val_idx is not None
        steps = math.ceil(len(train_idx) / self.global_batch)
        histories, best, seen, run, start = [], [], 0, 0, time.perf_counter()
        cache_before = self.cache_seconds

        phases = [("head" if self.uses_cache else "train", epochs[0], float(cfg.optimizer.lr))]
        if self.fine_tunes and len(epochs) > 1 and epochs[1] > 0:
            phases.append(("fine_tune", epochs[1], float(cfg.optimizer.lr) * float(cfg.model.fine_tune.lr_factor)))
        for phase, n_epochs, lr in phases:
            cached = phase == "head"
            if cached:
                source = self.features(model)
                target = models.split_at_backbone(model)[2]
                augmenter = None
            else:
                source = self.data.images
                target = model
                augmenter = build_augmenter(cfg.augment, seed)
                if phase == "fine_tune":
                    models.set_fine_tune(model, int(cfg.model.fine_tune.unfreeze_top))
            keras.utils.set_random_seed(seed + len(histories))
            with self.strategy.scope():
                _compile(target, make_optimizer(cfg.optimizer, lr, n_epochs, steps), n_cls,
                         int(cfg.train.get("steps_per_execution", 1)))
            train_ds = make_dataset(source[train_idx], onehot[y[train_idx]], w, self.global_batch,
                                    shuffle=True, seed=seed, augmenter=augmenter)
            val_ds = None
            if val_idx is not None:
                val_ds = make_dataset(source[val_idx], onehot[y[val_idx]], None, EVAL_BATCH)
            callbacks = [_epoch_logger(run_id, first_epoch=run + 1, prefix=log_prefix)]
            stopper = None
            if es_on:
                stopper = keras.callbacks.EarlyStopping(
                    monitor="val_auc", mode="max", patience=int(cfg.train.early_stopping.patience),
                    restore_best_weights=True, verbose=0)
                callbacks.append(stopper)
            hist = target.fit(train_ds, validation_data=val_ds, epochs=int(n_epochs), callbacks=callbacks,
                              shuffle=False, verbose=self.verbose)  # the dataset shuffles (seeded)
            frame = pd.DataFrame(hist.history)
            done = len(frame)
            frame.insert(0, "epoch", np.arange(run + 1, run + done + 1))
            frame["phase"] = phase
            histories.append(frame)
            best.append(int(stopper.best_epoch) + 1 if stopper is not None else done)
            seen += done * len(train_idx)
            run += done
        history = pd.concat(histories, ignore_index=True)
        history.insert(0, "fold", fold_label)
        for column in HISTORY_COLUMNS:
            if column not in history.columns:
                history[column] = np.nan
        seconds = time.perf_counter() - start - (self.cache_seconds - cache_before)  # training only
        return FitResult(history[HISTORY_COLUMNS], best, run, seconds, seen)

    def predict(self, model, idx: np.ndarray) -> np.ndarray:
        """Softmax outputs for rows idx (through the cache when the model was trained on it)."""
        from covidxray import models

        if self.uses_cache and not self.fine_tunes:
            head = models.split_at_backbone(model)[2]
            source = self.features(model)
            return np.asarray(head.predict(make_dataset(source[idx], None, None, EVAL_BATCH), verbose=0))
        return np.asarray(model.predict(make_dataset(self.data.images[idx], None, None, EVAL_BATCH), verbose=0))


# -- metrics ----------------------------------------------------------------------------------------------

def fold_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """A fold's validation figures: covid-vs-rest AUC, and accuracy/sensitivity/specificity at
    the default decision (covid iff p_covid >= 0.5), plus the log loss."""
    from sklearn.metrics import log_loss

    from covidxray.metrics import classification_metrics

    found = classification_metrics(y, probs, 0.5)
    out = {m: float(found[m][0]) for m in ("auc", "accuracy", "sensitivity", "specificity")}
    out["loss"] = float(log_loss(y, np.clip(probs, 1e-7, 1.0), labels=list(range(probs.shape[1]))))
    return out


def _finite(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# -- figures ------------------------------------------------------------------------------------------------

def _figures(history: pd.DataFrame, y: np.ndarray, probs: np.ndarray, classes: list[str], title: str):
    """(confusion matrix, training curves) matplotlib figures for one fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from covidxray.metrics import confusion_figure, decide

    k = len(classes)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, decide(probs, 0.5)), 1)
    fig_cm = confusion_figure(cm, classes, f"{title}: confusion matrix",
                              xlabel="predicted (covid iff p >= 0.5)")

    fig_tc, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, metric in zip(axes, ("loss", "accuracy", "auc")):
        ax.plot(history["epoch"], history[metric], "o-", label="train")
        if history[f"val_{metric}"].notna().any():
            ax.plot(history["epoch"], history[f"val_{metric}"], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig_tc.suptitle(f"{title}: training curves")
    fig_tc.tight_layout()
    return fig_cm, fig_tc


# -- outputs ------------------------------------------------------------------------------------------------

def output_dirs(cfg) -> tuple[Path, Path]:
    """(models dir, CV reports dir): the Hydra job's output dir when run as a Hydra app (so sweep
    jobs never clobber each other), else paths.models and paths.reports/cv (DVC)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            base = Path(HydraConfig.get().runtime.output_dir)
            return base / "models", base / "reports" / "cv"
    except (ImportError, ValueError):
        pass
    return Path(cfg.paths.models), Path(cfg.paths.reports) / "cv"


def _log_final_model(model, meta: dict, example: np.ndarray, registered: str | None):
    """Log the final model as a servable MLflow pyfunc model (serving.py: images in, p(covid) and
    the label at the saved threshold out) and register it; returns the ModelInfo."""
    from covidxray import serving

    gray = np.clip(np.asarray(example)[0, ..., 0], 0, 255).astype(np.uint8)
    return serving.log_model(model, meta, registered_name=registered, example=gray)


# -- the stage ----------------------------------------------------------------------------------------------

def run(cfg) -> dict:
    """Cross-validate, pick the threshold, train and register the final model, write the outputs.
    Returns the metrics (as in metrics.json) plus run ids."""
    import keras
    import mlflow
    import tensorflow as tf
    from omegaconf import OmegaConf

    from covidxray import models, tracking
    from covidxray.metrics import choose_threshold, classification_metrics

    check_config(cfg)
    data = load_cv_data(cfg)
    if str(cfg.model.weights) == "imagenet":  # fail now, not after the first fold, when offline
        models.build_backbone(cfg.model.name, int(cfg.data.image_size), "imagenet")
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    models_dir, cv_dir = output_dirs(cfg)
    if not cfg.cv.final_model:  # no final model this time: leave no stale one beside these CV results
        for name in ("model.keras", "model.json"):
            (models_dir / name).unlink(missing_ok=True)
    trainer = Trainer(cfg, data)
    classes, n_cls, y = data.classes, len(data.classes), data.y
    epochs = [int(cfg.train.epochs), int(cfg.model.fine_tune.epochs) if trainer.fine_tunes else 0]
    print(f"train: {cfg.model.name} ({cfg.model.weights}, {'frozen' if cfg.model.freeze_base else 'trainable'} "
          f"base), {len(data.images)} CV images at {cfg.data.image_size} px, folds {data.folds}, "
          f"augment {cfg.augment.name}, feature cache {'on' if trainer.uses_cache else 'off'}, "
          f"{trainer.strategy.num_replicas_in_sync} replica(s)")

    experiment_id = tracking.configure_exclusive(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    tags = {**tracking.git_tags(), **tracking.data_version_tags(), **tracking.context_tags(),
            "stage": "train", "model": str(cfg.model.name)}
    run_name = f"{cfg.model.name}-cv{len(data.folds)}"
    if "hydra_job_num" in tags:
        run_name += f"-job{tags['hydra_job_num']}"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    wall = time.perf_counter()
    with mlflow.start_run(run_name=run_name, tags=tags) as parent:
        parent_id = parent.info.run_id
        mlflow.log_params(tracking.flatten_params(resolved))
        mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(resolved)), "config.yaml")

        oof = np.full((len(y), n_cls), np.nan)
        per_fold, histories = [], []
        for k in data.folds:
            val_idx = np.flatnonzero(data.rows["fold"].to_numpy() == k)
            train_idx = np.flatnonzero(data.rows["fold"].to_numpy() != k)  # all other folds
            with mlflow.start_run(run_name=f"fold-{k}", nested=True,
                                  tags={"fold": str(k), "parent_run": parent_id, "stage": "train"}) as child:
                mlflow.log_params({"fold": k, "n_train": len(train_idx), "n_val": len(val_idx)})
                model = trainer.new_model()
                result = trainer.fit(model, train_idx, val_idx, epochs, run_id=child.info.run_id, fold_label=k)
                probs = trainer.predict(model, val_idx)
                oof[val_idx] = probs
                found = fold_metrics(y[val_idx], probs)
                found.update(best_epoch=float(result.best_epochs[0]), wall_s=result.seconds,
                             images_per_s=result.images_seen / max(result.seconds, 1e-9),
                             epochs_run=float(result.epochs_run))
                if len(result.best_epochs) > 1:
                    found["best_epoch_fine_tune"] = float(result.best_epochs[1])
                # the fold's figures at its restored best weights (per-epoch curves are loss, val_auc...)
                mlflow.log_metrics(_finite({f"fold_{m}": v for m, v in found.items()}))
                fig_cm, fig_tc = _figures(result.history, y[val_idx], probs, classes, f"fold {k}")
                mlflow.log_figure(fig_cm, "confusion_matrix.png")
                mlflow.log_figure(fig_tc, "training_curves.png")
                import matplotlib.pyplot as plt

                plt.close(fig_cm)
                plt.close(fig_tc)
            per_fold.append({"fold": k, **found})
            histories.append(result.history)
            print(f"train: fold {k}: AUC {found['auc']:.4f}, accuracy {found['accuracy']:.4f}, best epoch "
                  f"{result.best_epochs}, {result.seconds:.1f}s, {found['images_per_s']:.0f} images/s")
            del model
            keras.backend.clear_session()  # free the fold's graphs; the next model is re-seeded
        summary = pd.DataFrame(per_fold)
        metrics: dict[str, float] = {}
        for m in FOLD_METRICS:
            values = summary[m].to_numpy(dtype=float)
            metrics[f"cv_{m}_mean"] = float(np.nanmean(values))
            metrics[f"cv_{m}_std"] = float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0

        # OOF predictions of the folds that ran; the threshold is chosen on them (never on test).
        done = np.flatnonzero(data.rows["fold"].isin(data.folds).to_numpy())
        oof_frame = data.rows.iloc[done][["image_id", "patient_id", "label", "y", "fold"]].reset_index(drop=True)
        oof_probs = oof[done].astype(np.float64)
        for c, name in enumerate(classes):
            oof_frame[f"p_{name}"] = oof_probs[:, c]
        positive = (oof_frame["label"].astype(str) == classes[-1]).to_numpy()
        threshold = choose_threshold(positive, oof_frame[f"p_{classes[-1]}"].to_numpy(),
                                     cfg.train.threshold, float(cfg.train.target_sensitivity))
        found = classification_metrics(oof_frame["y"].to_numpy(), oof_probs, threshold)
        for m in OOF_METRICS:
            metrics[f"oof_{m}"] = float(found[m][0])
        metrics["threshold"] = float(threshold)
        metrics["cv_seconds"] = time.perf_counter() - wall
        metrics["feature_cache_s"] = trainer.cache_seconds
        mlflow.log_metrics(_finite(metrics))
        print(f"train: CV AUC {metrics['cv_auc_mean']:.4f} ± {metrics['cv_auc_std']:.4f}; OOF AUC "
              f"{metrics['oof_auc']:.4f}, threshold ({cfg.train.threshold}) {threshold:.4f}: sensitivity "
              f"{metrics['oof_sensitivity']:.3f}, specificity {metrics['oof_specificity']:.3f}")

        history = pd.concat(histories, ignore_index=True)
        cv_dir.mkdir(parents=True, exist_ok=True)
        oof_frame.to_csv(cv_dir / "oof.csv", index=False)
        history.to_csv(cv_dir / "history.csv", index=False)
        summary.to_csv(cv_dir / "folds.csv", index=False)
        mlflow.log_artifact(str(cv_dir / "oof.csv"), "cv")
        mlflow.log_artifact(str(cv_dir / "folds.csv"), "cv")

        meta = {
            "model": str(cfg.model.name), "weights": str(cfg.model.weights),
            "classes": classes, "positive_class": classes[-1], "task": str(cfg.data.get("task", "")),
            "image_size": int(cfg.data.image_size), "resize": str(cfg.data.get("resize", "stretch")),
            "input": "float32 (N, S, S, 1) grayscale, raw 0..255 pixels",
            "threshold": float(threshold), "threshold_method": str(cfg.train.threshold),
            "target_sensitivity": float(cfg.train.target_sensitivity),
            "mlflow_run_id": parent_id, "mlflow_experiment_id": experiment_id,
        }
        if cfg.cv.final_model:
            final_epochs = list(epochs)
            if cfg.train.early_stopping.enabled:
                final_epochs[0] = max(1, int(math.ceil(np.median(summary["best_epoch"]))))
                if "best_epoch_fine_tune" in summary:
                    final_epochs[1] = max(1, int(math.ceil(np.median(summary["best_epoch_fine_tune"]))))
            model = trainer.new_model()
            result = trainer.fit(model, np.arange(len(y)), None, final_epochs, run_id=parent_id,
                                 fold_label="final", log_prefix="final_")
            metrics["final_epochs"] = float(final_epochs[0])
            metrics["final_wall_s"] = result.seconds
            metrics["final_images_per_s"] = result.images_seen / max(result.seconds, 1e-9)
            print(f"train: final model on all {len(y)} CV images, {final_epochs[:1 + trainer.fine_tunes]} epochs, "
                  f"{result.seconds:.1f}s")
            models_dir.mkdir(parents=True, exist_ok=True)
            model.save(models_dir / "model.keras")
            mlflow_meta = {k: v for k, v in meta.items() if k not in ("mlflow_run_id", "mlflow_experiment_id")}
            example = data.images[:1].astype(np.float32)[..., None]
            info = _log_final_model(model, mlflow_meta, example, cfg.mlflow.registered_model)
            version = getattr(info, "registered_model_version", None)
            meta.update(registered_model=cfg.mlflow.registered_model, registered_version=version,
                        model_uri=(f"models:/{cfg.mlflow.registered_model}/{version}" if version
                                   else info.model_uri), epochs=final_epochs[0])
            if trainer.fine_tunes:
                meta["fine_tune_epochs"] = final_epochs[1]
            if version:
                from mlflow.tracking import MlflowClient

                client = MlflowClient()
                for key in ("threshold", "threshold_method", "image_size", "resize"):
                    client.set_model_version_tag(cfg.mlflow.registered_model, str(version), key, str(meta[key]))
                client.set_model_version_tag(cfg.mlflow.registered_model, str(version), "classes",
                                             json.dumps(classes))
            (models_dir / "model.json").write_text(json.dumps(_json_safe(meta), indent=2) + "\n")
            mlflow.log_artifact(str(models_dir / "model.json"))
            mlflow.log_metrics(_finite({k: metrics[k] for k in ("final_epochs", "final_wall_s",
                                                                 "final_images_per_s")}))
        metrics["train_seconds"] = time.perf_counter() - wall
        mlflow.log_metric("train_seconds", metrics["train_seconds"])
        (cv_dir / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2, sort_keys=True) + "\n")
        mlflow.log_artifact(str(cv_dir / "metrics.json"), "cv")
        mlflow.log_artifact(str(cv_dir / "history.csv"), "cv")
    print(f"train: wrote {cv_dir}/{{oof.csv,metrics.json,history.csv}}"
          + (f" and {models_dir}/model.{{keras,json}}" if cfg.cv.final_model else "")
          + f"; MLflow run {parent_id} ({metrics['train_seconds']:.0f}s)")
    return {**metrics, "mlflow_run_id": parent_id, "registered_version": meta.get("registered_version")}


def main(cfg) -> float:
    """Stage entry (DVC, Hydra app or sweep): returns cfg.optimized_metric (default cv_auc_mean)
    for Hydra sweepers such as Optuna."""
    wanted = str(cfg.get("optimized_metric") or DEFAULT_OPTIMIZED_METRIC)
    result = run(cfg)  # checks the config (optimized_metric included) first
    return float(result[wanted])
