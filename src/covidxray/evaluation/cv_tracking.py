"""What a cross-validated training records in MLflow: the parent run (named for what differs, with
the resolved config, code, data and context tags), one nested run per fold (opened as the fold
starts, left RUNNING until its figures are recorded, so an interrupt or a kill ends it KILLED),
the fold and CV figures, the confusion matrices and the feature store's hits and misses.
Used by the train stage; MLflow is imported inside the functions."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd

from covidxray.evaluation.figures import confusion_figure
from covidxray.evaluation.metrics import FOLD_METRICS, decide, finite_metrics, fold_metrics
from covidxray.infra import tracking
from covidxray.training.trainer import Trainer


def fold_run(k: int, parent_id: str, n_train: int, n_val: int) -> str:
    """A fold's nested MLflow run, opened as the fold starts and left RUNNING (record_fold ends
    it), so an interrupt or a kill finds it open and ends it as KILLED."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking.context.registry import resolve_tags  # what mlflow.start_run adds: user, source, git
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = mlflow.MlflowClient()
    own = {MLFLOW_PARENT_RUN_ID: parent_id, "fold": str(k), "parent_run": parent_id, "stage": "train"}
    tags = resolve_tags({**own, **tracking.process_tags()})  # host/pid: a later run ends it if this process dies
    # the parent's code version: MLflow finds a commit only for a script inside the repository,
    # and `covidxray` (the venv's entry point) is not
    tags.update(tracking.git_tags())
    run = client.create_run(mlflow.active_run().info.experiment_id, tags=tags, run_name=f"fold-{k}")
    params = {"fold": k, "n_train": n_train, "n_val": n_val}
    client.log_batch(run.info.run_id, params=[Param(key, str(value)) for key, value in params.items()])
    return run.info.run_id


def record_fold(k: int, run_id: str, y: np.ndarray, probs: np.ndarray, result, classes: list[str]) -> dict:
    """A fold's figures at its restored best weights, on its MLflow run with its confusion matrix
    (its per-epoch curves are metrics there: loss, val_auc...), and a line to the log."""
    import mlflow

    found = fold_metrics(y, probs)
    found.update(
        best_epoch=float(result.best_epochs[0]),
        wall_s=result.seconds,
        images_per_s=result.images_seen / max(result.seconds, 1e-9),
        epochs_run=float(result.epochs_run),
    )
    if len(result.best_epochs) > 1:
        found["best_epoch_fine_tune"] = float(result.best_epochs[1])
    with mlflow.start_run(run_id=run_id, nested=True):
        mlflow.log_metrics(finite_metrics({f"fold_{m}": v for m, v in found.items()}))
        log_confusion(y, probs, classes, f"fold {k}")
    print(
        f"train: fold {k}: AUC {found['auc']:.4f}, accuracy {found['accuracy']:.4f}, best epoch "
        f"{result.best_epochs}, {result.seconds:.1f}s, {found['images_per_s']:.0f} images/s"
    )
    return found


def summarise_folds(folds: pd.DataFrame) -> dict[str, float]:
    """cv_<metric>_mean and _std (sample sd, 0 for one fold) of each FOLD_METRICS column."""
    metrics: dict[str, float] = {}
    for m in FOLD_METRICS:
        values = folds[m].to_numpy(dtype=float)
        metrics[f"cv_{m}_mean"] = float(np.nanmean(values))
        metrics[f"cv_{m}_std"] = float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0
    return metrics


def log_cv(metrics: dict, method: str) -> None:
    """The CV and OOF figures to the parent run, and a line to the log."""
    import mlflow

    mlflow.log_metrics(finite_metrics(metrics))
    print(
        f"train: CV AUC {metrics['cv_auc_mean']:.4f} ± {metrics['cv_auc_std']:.4f}; OOF AUC "
        f"{metrics['oof_auc']:.4f}, threshold ({method}) {metrics['threshold']:.4f}: sensitivity "
        f"{metrics['oof_sensitivity']:.3f}, specificity {metrics['oof_specificity']:.3f}"
    )


def log_feature_store(trainer: Trainer) -> None:
    """The feature store's hits and misses of this training, on its MLflow run and in the log."""
    import mlflow

    store = trainer.store
    if not trainer.uses_cache or store is None:
        return
    mlflow.log_params({"features_store": str(store.root), "features_keys": ",".join(sorted(set(store.keys)))})
    mlflow.log_metrics({"features_hits": store.hits, "features_misses": store.misses})
    print(f"train: feature store {store.root}: {store.hits} hits, {store.misses} misses")


@contextmanager
def parent_run(cfg, model_name: str, n_folds: int):
    """The training's MLflow parent run (yields its id), named for what differs, with the
    resolved config as params and as config.yaml, and the code, data and context tags."""
    import mlflow
    from omegaconf import OmegaConf

    tags = {
        **tracking.git_tags(),
        **tracking.data_version_tags(),  # the pinned inputs (data.dvc); what this run read: content_tags
        **tracking.context_tags(),
        "stage": "train",
        "model": model_name,
    }
    resolved = OmegaConf.to_container(cfg, resolve=True)
    preset, overrides = tracking.preset_and_overrides(resolved)
    digest = tracking.config_hash(resolved)
    tags.update({"config_hash": digest, "experiment_preset": preset})
    collections = list((resolved.get("data") or {}).get("collections") or {})
    name = tracking.run_name(f"{model_name}-cv{n_folds}", preset, overrides, collections, digest)
    with mlflow.start_run(run_name=name, tags=tags) as parent:
        try:
            mlflow.log_params(tracking.flatten_params(resolved))
            mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(resolved)), "config.yaml")
            yield parent.info.run_id
        except BaseException:  # the parent ends FAILED (KILLED after an interrupt): its open folds with it
            tracking.end_open_children(parent.info.run_id, "FAILED")
            raise


def log_figure(fig, name: str) -> None:
    """A figure to the active MLflow run, then closed."""
    import mlflow

    from covidxray.evaluation.figures import pyplot

    mlflow.log_figure(fig, name)
    pyplot().close(fig)


def log_confusion(y: np.ndarray, probs: np.ndarray, classes: list[str], title: str) -> None:
    """A fold's confusion matrix (at p >= 0.5) as a figure of the active run."""
    k = len(classes)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, decide(probs, 0.5)), 1)
    xlabel = "predicted (covid iff p >= 0.5)"
    log_figure(confusion_figure(cm, classes, f"{title}: confusion matrix", xlabel=xlabel), "confusion_matrix.png")
