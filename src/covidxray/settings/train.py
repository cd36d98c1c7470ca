"""The train stage's settings: data, model, optimizer, augment, train, cv and mlflow keys, checked
before anything is read or TensorFlow loads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from covidxray import CovidXrayError
from covidxray.data import collections, sources
from covidxray.data.images import INPUT_KEYS, input_spec
from covidxray.training import loco_groups
from covidxray.evaluation.metrics import THRESHOLD_METHODS, training_metric_names
from covidxray.infra.config import choice, fail, flag, integer, number, text, value
from covidxray.networks import catalogue
from covidxray.training.specs import (
    AlgorithmSettings,
    AugmentSettings,
    FineTune,
    FitSettings,
    Head,
    ModelSettings,
    OptimizerSettings,
)


TASKS = {task: tuple(classes) for task, classes in collections.TASKS.items()}  # covid last
OPTIMIZERS = ("adam",)
SCHEDULES = ("constant", "inverse_time", "cosine")
AUGMENTS = ("none", "tutorial", "standard")
CLASS_WEIGHTS = ("balanced", "none")
DISTRIBUTE = ("none", "mirrored")
DEFAULT_OPTIMIZED_METRIC = "cv_auc_mean"


@dataclass(frozen=True)
class TrainSettings:
    """Everything the train stage reads, checked."""

    fit: FitSettings
    task: str
    inputs: dict  # images.input_spec: image_size, resize, store_size, normalize, crop_border
    roles: dict  # sources.as_roles: the collections that train and those held out
    balance: str  # none | undersample (training images)
    threshold: str
    target_sensitivity: float
    ood_false_alarm: float  # the OOD flag's rate on held-out training images (networks/ood.py)
    deterministic: bool
    cv_folds: int | None  # None: all folds of the splits
    final_model: bool
    curated: Path
    splits: Path
    models: Path
    reports: Path
    tracking_uri: str | None
    experiment: str
    registered_model: str | None
    register: bool | None  # None (auto): register when run by the pipeline (--params)
    optimized_metric: str


def model_settings(cfg, image_size: int) -> ModelSettings:
    """The checked `model` group for images of image_size px."""
    name = choice(cfg, "model.name", catalogue.MODEL_NAMES)
    found = value(cfg, "model.weights")
    weights = "none" if found is None else str(found)
    pretrained = catalogue.is_pretrainable(name)
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        fail("model.weights", "imagenet, none, or the path of an existing weights file", weights)
    if weights == "imagenet" and not pretrained:
        fail("model.weights", f"none or a weights file path for {name} (it has no ImageNet weights)", weights)
    freeze = flag(cfg, "model.freeze_base")
    filters = _filters(cfg, name, image_size)
    head = Head(
        integer(cfg, "model.head.pool_size", 1),
        integer(cfg, "model.head.dense_units", 1),
        number(cfg, "model.head.dropout", 0.0, 1.0, False, True, "a number in [0, 1)"),
        choice(cfg, "model.head.type", catalogue.HEAD_TYPES),
        number(cfg, "model.head.l2", 0.0, math.inf, False, True, "a number >= 0"),
        flag(cfg, "model.head.standardize"),
    )
    fine_tune = FineTune(
        integer(cfg, "model.fine_tune.unfreeze_top", 0),
        integer(cfg, "model.fine_tune.epochs", 0),
        number(cfg, "model.fine_tune.lr_factor", 0.0, math.inf, True, True, "a number > 0"),
    )
    if fine_tune.unfreeze_top > 0 and not freeze:
        raise CovidXrayError(
            "model.fine_tune.unfreeze_top > 0 needs model.freeze_base=true "
            "(a second phase after training the head on a frozen base)"
        )
    if fine_tune.unfreeze_top > 0 and not pretrained:
        raise CovidXrayError(f"model.fine_tune.unfreeze_top must be 0 for {name} (nothing pretrained to unfreeze)")
    imagenet_file = text(cfg, "model.imagenet_file", optional=True)
    return ModelSettings(name, weights, freeze, filters, head, fine_tune, imagenet_file, _features(cfg, name))


def _features(cfg, name: str) -> str:
    """model.features (absent: last); blocks only for a backbone whose catalogue entry names blocks."""
    found = "last" if value(cfg, "model.features") is None else choice(cfg, "model.features", catalogue.FEATURE_SOURCES)
    if found == "blocks" and not catalogue.BACKBONES[name].blocks:
        with_blocks = ", ".join(n for n, spec in catalogue.BACKBONES.items() if spec.blocks)
        fail("model.features", f"last for model.name={name} (blocks needs one of {with_blocks})", found)
    return found


def _filters(cfg, name: str, size: int) -> tuple[int, ...]:
    """small_cnn's conv widths (checked against the image size); the input size ImageNet
    backbones need otherwise."""
    filters = value(cfg, "model.filters") or catalogue.DEFAULT_FILTERS
    if name != "small_cnn":
        if size < catalogue.MIN_IMAGENET_SIZE:
            raise CovidXrayError(
                f"data.image_size={size} is too small for model.name={name}: ImageNet backbones take "
                f"inputs of at least {catalogue.MIN_IMAGENET_SIZE} px (allowed: data.image_size >= "
                f"{catalogue.MIN_IMAGENET_SIZE})"
            )
        return tuple(catalogue.DEFAULT_FILTERS)
    if not filters or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in filters):
        fail("model.filters", "a non-empty list of positive integers", list(filters))
    if catalogue.feature_map_size(name, size, filters) < 1:
        raise CovidXrayError(
            f"data.image_size={size} is too small for model.filters={list(filters)}: {len(filters)} "
            f"2x2 poolings need at least {2 ** len(filters)} px (allowed: data.image_size >= "
            f"{2 ** len(filters)}, or fewer model.filters)"
        )
    return tuple(int(f) for f in filters)


def augment_settings(cfg) -> AugmentSettings:
    """The checked `augment` group."""
    name = choice(cfg, "augment.name", AUGMENTS)
    amounts = {}
    if name in ("tutorial", "standard"):
        amounts["rotation_deg"] = number(
            cfg, "augment.rotation_deg", 0.0, 180.0, False, False, "a number of degrees in [0, 180]"
        )
    if name == "standard":
        for key in ("shift", "zoom", "brightness", "contrast"):
            amounts[key] = number(cfg, f"augment.{key}", 0.0, 1.0, False, True, "a fraction in [0, 1)")
    flip = value(cfg, "augment.horizontal_flip")
    if flip not in (None, False, True):
        fail("augment.horizontal_flip", "true or false", flip)
    return AugmentSettings(name, **amounts, horizontal_flip=bool(flip))


def algorithm_settings(cfg, model: ModelSettings, augment: AugmentSettings) -> AlgorithmSettings:
    """The checked `algorithm` group: a known algorithm (training/algorithms) with valid
    hyper-parameters, and one that can train this model (an algorithm without a Keras loss needs
    the stacked heads: frozen base, no augmentation, no fine-tuning)."""
    found = value(cfg, "algorithm") or {"name": "erm"}
    if not hasattr(found, "items"):
        fail("algorithm", "a mapping with a name (conf/algorithm/<name>.yaml)", found)
    params = {str(k): v for k, v in found.items() if k != "name"}
    chosen = AlgorithmSettings(str(found.get("name")), tuple(sorted(params.items())))
    algorithm = chosen.build()  # unknown names, parameters and bad values: one line
    stacked = model.freeze_base and augment.name == "none" and model.fine_tune.unfreeze_top == 0
    if algorithm.keras_loss() is None and not stacked:
        raise CovidXrayError(
            f"algorithm.name={chosen.name} trains only the stacked heads on frozen features: it needs "
            "model.freeze_base=true, augment=none and model.fine_tune.unfreeze_top=0, or add algorithm=erm"
        )
    return chosen


def fit_settings(cfg) -> FitSettings:
    """The checked keys that say how one model is built and fitted."""
    size = integer(cfg, "data.image_size", 1, "a positive integer (pixels)")
    model = model_settings(cfg, size)
    optimizer = OptimizerSettings(
        choice(cfg, "optimizer.name", OPTIMIZERS),
        number(cfg, "optimizer.lr", 0.0, math.inf, True, True, "a number > 0"),
        choice(cfg, "optimizer.schedule", SCHEDULES),
    )
    augment = augment_settings(cfg)
    check_standardize(model, augment)
    epochs, batch = integer(cfg, "train.epochs", 1), integer(cfg, "train.batch_size", 1)
    per_call = 1 if value(cfg, "train.steps_per_execution") is None else integer(cfg, "train.steps_per_execution", 1)
    return FitSettings(
        seed=integer(cfg, "seed", 0, "an integer >= 0"),
        image_size=size,
        model=model,
        optimizer=optimizer,
        augment=augment,
        epochs=epochs,
        batch_size=batch,
        steps_per_execution=per_call,
        run_eagerly=flag(cfg, "train.run_eagerly"),
        early_stopping=flag(cfg, "train.early_stopping.enabled"),
        patience=integer(cfg, "train.early_stopping.patience", 0),
        class_weights=choice(cfg, "train.class_weights", CLASS_WEIGHTS),
        distribute=choice(cfg, "train.distribute", DISTRIBUTE),
        feature_store=None if value(cfg, "paths.features") in (None, "") else str(value(cfg, "paths.features")),
        algorithm=algorithm_settings(cfg, model, augment),
    )


def check_standardize(model: ModelSettings, augment: AugmentSettings) -> None:
    """model.head.standardize needs a head trained on fixed features (the stacked-heads trainer):
    a frozen base, no augmentation, no fine-tuning; a head that trains from pixels cannot have it."""
    fine_tunes = model.fine_tune.unfreeze_top > 0 and model.fine_tune.epochs > 0
    if model.head.standardize and (not model.freeze_base or augment.name != "none" or fine_tunes):
        raise CovidXrayError(
            "model.head.standardize=true: standardization requested for a head that trains from pixels "
            f"(model.freeze_base={str(model.freeze_base).lower()}, augment={augment.name}, "
            f"model.fine_tune.unfreeze_top={model.fine_tune.unfreeze_top}); allowed: false, or true with "
            "model.freeze_base=true, augment=none and model.fine_tune.unfreeze_top=0"
        )


def cv_folds(cfg) -> int | None:
    """cv.folds (None for all) and split.folds, which bounds it."""
    split_folds = None if value(cfg, "split.folds") is None else integer(cfg, "split.folds", 2)
    folds = value(cfg, "cv.folds")
    if folds == "all":
        return None
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        fail("cv.folds", "all or an integer >= 2", folds)
    if split_folds is not None and folds > split_folds:
        fail("cv.folds", f"all or an integer in [2, split.folds={split_folds}]", folds)
    return folds


def train_settings(cfg) -> TrainSettings:
    """Check every key the train stage reads (before anything is read or trained) and return
    them as one frozen TrainSettings."""
    task = choice(cfg, "data.task", TASKS)
    inputs = input_spec(*(value(cfg, f"data.{k}") for k in INPUT_KEYS))
    roles = sources.as_roles(value(cfg, "data.sources"))
    sources.check_roles(roles, list(TASKS[task]), collections.provides(value(cfg, "data.collections")))
    balance = choice(cfg, "data.balance", sources.BALANCE)
    fit = fit_settings(cfg)
    threshold = choice(cfg, "train.threshold", THRESHOLD_METHODS)
    target = number(cfg, "train.target_sensitivity", 0.0, 1.0, True, False, "a number in (0, 1]")
    ood_rate = number(cfg, "train.ood.false_alarm", 0.0, 1.0, True, True, "a number in (0, 1)")
    deterministic = flag(cfg, "train.deterministic")
    folds, final_model = cv_folds(cfg), flag(cfg, "cv.final_model")
    register = value(cfg, "mlflow.register")
    if register not in (None, "auto", True, False):
        fail("mlflow.register", "auto (only the pipeline, run with --params, registers), true or false", register)
    wanted = value(cfg, "optimized_metric")
    if wanted is not None and wanted not in training_metric_names() + loco_groups.metric_names():
        fail("optimized_metric", f"one of {', '.join(training_metric_names() + loco_groups.metric_names())}", wanted)
    paths = {key: Path(text(cfg, f"paths.{key}")) for key in ("curated", "splits", "models", "reports")}
    return TrainSettings(
        fit=fit,
        task=task,
        inputs=inputs,
        roles=roles,
        balance=balance,
        threshold=threshold,
        target_sensitivity=target,
        ood_false_alarm=ood_rate,
        deterministic=deterministic,
        cv_folds=folds,
        final_model=final_model,
        **paths,
        tracking_uri=text(cfg, "mlflow.tracking_uri", optional=True),
        experiment=text(cfg, "mlflow.experiment"),
        registered_model=text(cfg, "mlflow.registered_model", optional=True),
        register=None if register in (None, "auto") else register,
        optimized_metric=str(wanted or DEFAULT_OPTIMIZED_METRIC),
    )
