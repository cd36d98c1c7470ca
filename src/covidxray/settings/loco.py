"""Leave-one-collection-out's settings: the loco stage, and train when optimized_metric is a loco_ figure."""

from __future__ import annotations

from dataclasses import dataclass

from covidxray.training import loco_groups
from covidxray.evaluation.calibration import positives_needed
from covidxray.evaluation.metrics import THRESHOLD_METHODS
from covidxray.infra.config import choice, fail, integer, number, value

from covidxray.settings.evaluate import assess_options, reporting, Reporting
from covidxray.settings.train import TASKS, TrainSettings, train_settings


# -- leave-one-collection-out (the loco stage, and train when optimized_metric is a loco_ figure) --


@dataclass(frozen=True)
class LocoSettings:
    """Everything the loco stage reads, checked: the recipe it repeats per held-out group (the
    train settings) and how the groups are chosen and measured."""

    train: TrainSettings
    recipe: loco_groups.Recipe
    spec: loco_groups.LocoSpec
    seed: int
    out: Reporting  # the MLflow store and experiment the figures are logged to


def loco_spec(cfg, roles: dict, classes) -> loco_groups.LocoSpec:
    """The checked `loco` group (groups against `data.sources`) and evaluate's bootstrap."""
    from omegaconf import OmegaConf

    found = value(cfg, "loco.groups")
    found = OmegaConf.to_container(found) if OmegaConf.is_config(found) else found
    groups = (
        loco_groups.default_groups(roles, classes)
        if found in (None, "auto")
        else loco_groups.check_groups(found, roles, classes)
    )
    if not groups:
        fail("loco.groups", "auto with a collection that can be held out, or a list of groups of collections", found)
    k = integer(cfg, "loco.calibration.k", 2, "an integer >= 2 (labelled images, half of each class)")
    method = choice(cfg, "loco.calibration.method", THRESHOLD_METHODS)
    target = number(cfg, "loco.calibration.target_sensitivity", 0.0, 1.0, True, False, "a number in (0, 1]")
    confidence = calibration_confidence(cfg, k, target) if method == "sensitivity" else None
    return loco_groups.LocoSpec(
        groups=groups,
        provides=loco_groups.collections_of(roles),
        calibration_k=k,
        calibration_draws=integer(cfg, "loco.calibration.draws", 1),
        calibration_method=method,
        calibration_target=target,
        calibration_confidence=confidence,
        n_resamples=assess_options(cfg).n_resamples,
        ci=assess_options(cfg).ci,
        max_shortcut_auc=number(cfg, "loco.objective.max_shortcut_auc", 0.5, 1.0, True, False, "a number in (0.5, 1]"),
        min_images=integer(cfg, "loco.objective.min_images", 1, "an integer >= 1 (held-out images)"),
    )


def calibration_confidence(cfg, k: int, target: float) -> float | None:
    """The checked `loco.calibration.confidence` (null: the target taken on the positives as found),
    and a K whose K/2 positives can show the target at that confidence."""
    if value(cfg, "loco.calibration.confidence") is None:
        return None
    confidence = number(cfg, "loco.calibration.confidence", 0.0, 1.0, True, True, "null or a number in (0, 1)")
    needed = positives_needed(target, confidence)
    if needed is None:
        fail("loco.calibration.target_sensitivity", f"below 1 with loco.calibration.confidence {confidence:g}", target)
    if k // 2 < needed:
        fail(
            "loco.calibration.k",
            f"an integer >= {2 * needed}: half of K are positives, and sensitivity {target:g} at confidence "
            f"{confidence:g} (loco.calibration.confidence) needs {needed} positives",
            k,
        )
    return confidence


def loco_settings(cfg) -> LocoSettings:
    """Check the train settings and the `loco` group before anything is read or trained."""
    train = train_settings(cfg)
    spec = loco_spec(cfg, train.roles, TASKS[train.task])
    recipe = loco_groups.Recipe(
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
