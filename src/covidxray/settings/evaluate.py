"""What measuring a model on a labelled set reads: the evaluate stage and `covidxray validate`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from covidxray.data import sources
from covidxray.evaluation.assess import AssessOptions
from covidxray.evaluation.metrics import THRESHOLD_METHODS
from covidxray.infra.config import choice, integer, number, text, value


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
