"""MLflow tracking: where runs go, and what every run records about code and data versions.

Default store: SQLite at mlruns/mlflow.db with artifacts under mlruns/artifacts (no server);
MLFLOW_TRACKING_URI (or mlflow.tracking_uri in the config) selects a team server instead.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORE = Path("mlruns")


def tracking_uri(configured: str | None = None) -> str:
    """The tracking URI: the config's value, else $MLFLOW_TRACKING_URI, else the local SQLite store."""
    if configured:
        return str(configured)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a local SQLite store (mlruns/artifacts); a server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()


def configure(configured_uri: str | None, experiment: str) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    import mlflow

    uri = tracking_uri(configured_uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        experiment_id = mlflow.create_experiment(experiment, artifact_location=_artifact_root(uri))
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
