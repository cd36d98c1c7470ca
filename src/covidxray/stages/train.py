"""train stage: K-fold cross-validation on the non-test images, then the final model.

For each CV fold k (cv.folds: all | the first n): train on the other folds, validate on fold k
(early stopping on validation AUC, best weights restored), predict fold k: the out-of-fold (OOF)
predictions. The decision threshold is chosen on the OOF predictions (train.threshold: youden |
sensitivity) and saved with the model. Then the final model is trained on all non-test images
with the same config, for the CV's median best epoch when early stopping is on. The test
partition is never read here. `run` is the recipe; the fitting itself is fitting.Trainer's.

Outputs (DVC: paths.models and paths.reports/cv; as a Hydra app: the job's output directory),
installed together (fileset): a reader sees all old files or all new ones, also after a kill.
  models/model.keras       the final model (builders.py layout; loads after `import covidxray.networks.model_file`)
  models/model.json        classes, image_size, resize, threshold, threshold_method, model (the same every run)
  models/feature_stats.npy the training images' pooled-feature mean and std (2, D): what `covidxray adapt` aligns to
  models/model.run.json    MLflow run and registry version, md5 of model.keras (not a DVC output)
  reports/cv/oof.csv       image_id, patient_id, label, y, fold, p_<class>...
  reports/cv/folds.csv     per fold: auc, accuracy, sensitivity, specificity, loss, best_epoch, ...
  reports/cv/metrics.json  cv_<metric>_mean/_std over folds, oof_<metric> at the threshold, threshold
  reports/cv/headline.json the few figures `dvc metrics show` lists (keys shared with the test and LOCO ones)
  reports/cv/history.csv   fold, epoch, loss, val_loss, accuracy, val_accuracy, auc, val_auc, phase

MLflow: one parent run (resolved config as params, aggregate metrics, code/data/run tags, the
config as an artifact, every fold's training curves in one figure, the final model) with one
nested run per fold (per-epoch curves as metrics, confusion matrix figure). The run name says
what differs: the experiment preset, the overrides (a DVC experiment's -S values), the collections
and a short config hash (tags experiment_preset, config_hash). The final model is registered
(mlflow.registered_model) when the pipeline runs the stage (`--params`: dvc repro, dvc exp run), or from anywhere with
mlflow.register=true; only the committed default pipeline moves the alias `champion`
(serving.registry). After the install, the run is tagged with the md5 (as DVC computes it) of
every file it read and wrote (`dvc.md5:<path>`).
`main` returns the value of `optimized_metric` (default cv_auc_mean) for Hydra sweepers; a
`loco_*` figure (e.g. loco_auc_mean) runs leave-one-collection-out after the CV (evaluation/loco.py)
and returns its estimate: model selection on how the recipe does at collections it never saw.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray.infra import config, fileset, tracking
from covidxray.serving import registry
from covidxray.settings.loco import LocoSettings, loco_settings
from covidxray.settings.train import DEFAULT_OPTIMIZED_METRIC, TrainSettings, train_settings
from covidxray.infra.outputs import figures_text, json_safe
from covidxray.training import site_adaptation
from covidxray.training.trainer import Trainer
from covidxray.training import recipe
from covidxray.training.cv_data import CVData, load_cv_data, make_trainer
from covidxray.evaluation.metrics import (
    FOLD_METRICS,
    OOF_METRICS,
    classification_metrics,
    decide,
    finite_metrics,
    fold_metrics,
    headline,
)
from covidxray.evaluation.metrics import threshold_rule as metrics_threshold_rule
from covidxray.evaluation.figures import confusion_figure, training_curves_figure

TIMINGS = ("wall_s", "images_per_s", "seconds", "cache_s")  # key parts of timings: MLflow only, never a file


# -- the stage --------------------------------------------------------------------------------------


def run(cfg) -> dict:
    """Cross-validate, pick the threshold, train and register the final model, write the outputs.
    Returns the metrics (as in metrics.json) plus run ids."""
    s = train_settings(cfg)  # every key checked before anything is read (or TensorFlow loads)
    by_loco = loco_settings(cfg) if s.optimized_metric.startswith("loco_") else None
    data = load_cv_data(s.curated, s.splits, s.inputs, s.roles, s.balance, s.fit.seed, s.cv_folds, s.task)
    trainer = make_trainer(s.fit, data, s.deterministic)
    models_dir, cv_dir = output_dirs(s.models, s.reports)
    pipeline = config.hydra_output_dir() is None  # run on params.yaml by DVC, not as a Hydra app
    register_as = s.registered_model if (pipeline if s.register is None else s.register) else None
    experiment_id = tracking.configure_exclusive(s.tracking_uri, s.experiment)
    wall = time.perf_counter()
    with parent_run(cfg, s.fit.model.name, len(data.folds)) as parent_id:
        cv = cross_validate(trainer, data, parent_id, metrics_threshold_rule(s.threshold, s.target_sensitivity))
        metrics = summarise_folds(cv.folds)
        oof = oof_table(data, cv.oof)
        metrics.update(oof_figures(oof, data.classes, cv.recipe.threshold))
        metrics.update(cv_seconds=time.perf_counter() - wall, feature_cache_s=trainer.cache_seconds)
        log_cv(metrics, s.threshold)
        if by_loco is not None:  # model selection on the leave-one-collection-out estimate
            metrics.update(loco_estimate(by_loco))
        model, epochs = None, cv.recipe.epochs
        if s.final_model:
            model, found = final_model(trainer, cv.recipe, parent_id)
            metrics.update(found)
        log_feature_store(trainer)
        meta = model_meta(s, data, metrics["threshold"], parent_id, experiment_id)
        if model is not None:
            meta.update(
                register(model, meta, data.images[:1], register_as),
                epochs=epochs[0],
                **({"fine_tune_epochs": epochs[1]} if trainer.fine_tunes else {}),
            )
        metrics["train_seconds"] = time.perf_counter() - wall
        stats = site_adaptation.feature_stats(trainer.pooled_features(model)) if model is not None else None
        written = write_outputs(models_dir, cv_dir, cv, oof, metrics, model, meta, stats)
        import mlflow  # the hashes of what this run read and installed, as DVC computes them

        mlflow.set_tags(tracking.content_tags([s.curated, s.splits, *pretrained_file(s), *written]))
        if meta.get("registered_version"):
            crown_if_intended(meta["registered_model"], meta["registered_version"], pipeline, cfg)
    print(
        f"train: wrote {cv_dir}/{{oof.csv,folds.csv,metrics.json,headline.json,history.csv}}"
        + (f" and {models_dir}/model.{{keras,json}}" if model is not None else "")
        + f"; MLflow run {parent_id} ({metrics['train_seconds']:.0f}s)"
    )
    return {**metrics, "mlflow_run_id": parent_id, "registered_version": meta.get("registered_version")}


def pretrained_file(s: TrainSettings) -> list[Path]:
    """The ImageNet weights file training read, where it read one."""
    path = s.fit.model.imagenet_file
    return [Path(path)] if s.fit.model.weights == "imagenet" and path and Path(path).is_file() else []


def crown_if_intended(name: str, version: str, pipeline: bool, cfg) -> None:
    """The installed version is marked so; @champion moves to it only for the committed default
    pipeline (`dvc repro` of the committed params, conf and code): experiments, presets and
    command-line runs leave it where it is (`covidxray promote VERSION` moves it on purpose)."""
    registry.mark_installed(name, version)
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(cfg, resolve=True)
    intended, why = registry.committed_default(params=params) if pipeline else (False, "not run by dvc repro")
    if intended:
        registry.crown(name, version)
    else:
        print(f"train: {name} version {version} registered; @{registry.CHAMPION} unchanged ({why})")


def main(cfg) -> float:
    """Stage entry (DVC, Hydra app or sweep): returns cfg.optimized_metric (default cv_auc_mean)
    for Hydra sweepers such as Optuna."""
    result = run(cfg)  # checks the config (optimized_metric included) first
    found = result[str(cfg.get("optimized_metric") or DEFAULT_OPTIMIZED_METRIC)]
    return float("nan") if found is None else float(found)  # None: no held-out group has the figure


# -- cross-validation -----------------------------------------------------------------------------


@dataclass
class CVResult:
    recipe: recipe.RecipeResult  # the folds' models, OOF predictions, threshold, final epochs
    oof: np.ndarray  # (N, K) softmax outputs of each image's own validation fold (NaN: fold not run)
    folds: pd.DataFrame  # one row per fold: its figures, best epoch, time
    history: pd.DataFrame  # one row per fold and epoch (HISTORY_COLUMNS)


def cross_validate(trainer: Trainer, data: CVData, parent_id: str, rule) -> CVResult:
    """The recipe's cross-validation (training/recipe.py) over every CV image, each fold recorded
    in its nested MLflow run; the out-of-fold predictions, the threshold and the final epochs."""
    fold = data.rows["fold"].to_numpy()
    sizes = {k: (int((fold != k).sum()), int((fold == k).sum())) for k in data.folds}
    run_ids: dict = {}  # fold -> its run, opened by the trainer as the fold starts

    def open_run(k) -> str:
        run_ids[k] = fold_run(k, parent_id, *sizes[k])
        return run_ids[k]

    positive = data.y == len(data.classes) - 1
    found = recipe.cross_validate(trainer, np.arange(len(data.y)), fold, data.folds, positive, rule, open_run)
    rows = []
    for k, (_, val), (probs, result) in zip(data.folds, found.splits, found.fitted, strict=True):
        rows.append({"fold": k, **record_fold(k, run_ids[k], data.y[val], probs, result, data.classes)})
    history = pd.concat([r.history for _, r in found.fitted], ignore_index=True)
    log_figure(training_curves_figure(history, f"{len(found.splits)}-fold CV"), "training_curves.png")
    return CVResult(found, found.oof, pd.DataFrame(rows), history)


def fold_run(k: int, parent_id: str, n_train: int, n_val: int) -> str:
    """A fold's nested MLflow run, opened as the fold starts and left RUNNING (record_fold ends
    it), so an interrupt or a kill finds it open and ends it as KILLED."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking.context.registry import resolve_tags  # what mlflow.start_run adds: user, source, git
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = mlflow.MlflowClient()
    tags = resolve_tags({MLFLOW_PARENT_RUN_ID: parent_id, "fold": str(k), "parent_run": parent_id, "stage": "train"})
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


def oof_table(data: CVData, oof: np.ndarray) -> pd.DataFrame:
    """The OOF predictions of the folds that ran: image_id, patient_id, label, y, fold, p_<class>..."""
    done = np.flatnonzero(data.rows["fold"].isin(data.folds).to_numpy())
    table = data.rows.iloc[done][["image_id", "patient_id", "label", "y", "fold"]].reset_index(drop=True)
    probs = oof[done].astype(np.float64)
    for c, name in enumerate(data.classes):
        table[f"p_{name}"] = probs[:, c]
    return table


def oof_figures(oof: pd.DataFrame, classes: list[str], threshold: float) -> dict:
    """The OOF figures at the recipe's threshold (chosen on these rows, never on test):
    {"threshold", "oof_<metric>"...}."""
    found = classification_metrics(oof["y"].to_numpy(), oof[[f"p_{c}" for c in classes]].to_numpy(), threshold)
    return {**{f"oof_{m}": float(found[m][0]) for m in OOF_METRICS}, "threshold": float(threshold)}


def log_cv(metrics: dict, method: str) -> None:
    """The CV and OOF figures to the parent run, and a line to the log."""
    import mlflow

    mlflow.log_metrics(finite_metrics(metrics))
    print(
        f"train: CV AUC {metrics['cv_auc_mean']:.4f} ± {metrics['cv_auc_std']:.4f}; OOF AUC "
        f"{metrics['oof_auc']:.4f}, threshold ({method}) {metrics['threshold']:.4f}: sensitivity "
        f"{metrics['oof_sensitivity']:.3f}, specificity {metrics['oof_specificity']:.3f}"
    )


def loco_estimate(ls: LocoSettings) -> dict:
    """The recipe's leave-one-collection-out headline (loco_* figures), logged on the active run."""
    import mlflow

    from covidxray.evaluation import loco

    found = loco.headline(loco.run(ls.train.curated, ls.train.splits, ls.recipe, ls.spec, ls.seed))
    mlflow.log_metrics(finite_metrics(found))
    return found


# -- the final model ------------------------------------------------------------------------------


def final_model(trainer: Trainer, cv: recipe.RecipeResult, parent_id: str):
    """(the recipe's final model trained on all CV images, its metrics: final_epochs,
    final_wall_s, final_images_per_s)."""
    import mlflow

    result = recipe.fit_final(trainer, np.arange(len(trainer.y)), cv, parent_id).final
    found = {
        "final_epochs": int(cv.epochs[0]),
        "final_wall_s": result.seconds,
        "final_images_per_s": result.images_seen / max(result.seconds, 1e-9),
    }
    mlflow.log_metrics(finite_metrics(found))
    print(
        f"train: final model on all {len(trainer.y)} CV images, {cv.epochs[: 1 + trainer.fine_tunes]} epochs, "
        f"{result.seconds:.1f}s"
    )
    return cv.model, found


def log_feature_store(trainer: Trainer) -> None:
    """The feature store's hits and misses of this training, on its MLflow run and in the log."""
    import mlflow

    store = trainer.store
    if not trainer.uses_cache or store is None:
        return
    mlflow.log_params({"features_store": str(store.root), "features_keys": ",".join(sorted(set(store.keys)))})
    mlflow.log_metrics({"features_hits": store.hits, "features_misses": store.misses})
    print(f"train: feature store {store.root}: {store.hits} hits, {store.misses} misses")


# -- outputs ------------------------------------------------------------------------------------------------


def output_dirs(models: Path, reports: Path) -> tuple[Path, Path]:
    """(models dir, CV reports dir): the Hydra job's output dir when run as a Hydra app (so sweep
    jobs never clobber each other), else `models` and `reports`/cv (DVC)."""
    base = config.hydra_output_dir()
    if base is not None:
        return base / "models", base / "reports" / "cv"
    return Path(models), Path(reports) / "cv"


def model_meta(s: TrainSettings, data: CVData, threshold: float, run_id: str, experiment_id: str) -> dict:
    """What model.json says of the model: classes, input steps (from the store it was trained on),
    the threshold and where it was tracked."""
    classes = data.classes
    return {
        "model": s.fit.model.name,
        "weights": s.fit.model.weights,
        "classes": classes,
        "positive_class": classes[-1],
        "task": s.task,
        **s.inputs,
        "store_size": data.store_size,
        "sources": s.roles,
        "input": "float32 (N, S, S, 1) grayscale, raw 0..255 pixels",
        "threshold": float(threshold),
        "threshold_method": s.threshold,
        "target_sensitivity": s.target_sensitivity,
        "mlflow_run_id": run_id,
        "mlflow_experiment_id": experiment_id,
    }


def write_outputs(
    models_dir: Path, cv_dir: Path, cv: CVResult, oof: pd.DataFrame, metrics: dict, model, meta: dict, stats=None
) -> None:
    """Write reports/cv/* and (with a final model) model.keras, model.json and the training
    images' pooled-feature statistics (`stats`, for site adaptation) into staging folders, log
    them to the MLflow run, then install them together (fileset). Without a final model, an
    earlier model.keras/model.json goes in the same switch: it would not match these
    CV results. Timings (TIMINGS) go to the run only, so that a rerun writes the same bytes: the
    files hold figures, metrics.json all of them, headline.json the few `dvc metrics show` lists.
    Returns the installed files."""
    import mlflow

    from covidxray.networks import model_file
    from covidxray.networks.model_file import META_FILE, MODEL_FILE

    timings = {k: v for k, v in metrics.items() if any(t in k for t in TIMINGS)}
    same_every_run = {k: v for k, v in meta.items() if k not in model_file.RUN_KEYS}
    figures = {k: v for k, v in metrics.items() if k not in timings}
    n_images = int(len(oof))
    model_files = (MODEL_FILE, META_FILE, model_file.RUN_FILE, site_adaptation.STATS_FILE)
    remove = [] if model is not None else [models_dir / name for name in model_files]
    with fileset.install_together([models_dir, cv_dir], remove=remove) as (new_models, new_cv):
        oof.to_csv(new_cv / "oof.csv", index=False)
        cv.history.to_csv(new_cv / "history.csv", index=False)
        cv.folds.drop(columns=[c for c in cv.folds if any(t in c for t in TIMINGS)]).to_csv(
            new_cv / "folds.csv", index=False
        )
        (new_cv / "metrics.json").write_text(figures_text(figures, sort_keys=True))
        (new_cv / "headline.json").write_text(figures_text(cv_headline(figures, n_images)))
        for name in CV_FILES:
            mlflow.log_artifact(str(new_cv / name), "cv")
        if model is not None:
            model_file.save(model, new_models / MODEL_FILE)
            (new_models / META_FILE).write_text(json.dumps(json_safe(same_every_run), indent=2) + "\n")
            site_adaptation.write_stats(new_models / site_adaptation.STATS_FILE, stats)
            run = {k: meta.get(k) for k in model_file.RUN_KEYS} | {
                "model_md5": tracking.dvc_md5(new_models / MODEL_FILE)
            }
            (new_models / model_file.RUN_FILE).write_text(json.dumps(json_safe(run), indent=2) + "\n")
            mlflow.log_artifact(str(new_models / META_FILE))
            mlflow.log_artifact(str(new_models / model_file.RUN_FILE))
        mlflow.log_metrics(finite_metrics(timings))
    written = [cv_dir / name for name in CV_FILES]
    installed = [models_dir / name for name in (MODEL_FILE, META_FILE, site_adaptation.STATS_FILE)]
    return written + (installed if model is not None else [])


CV_FILES = ("oof.csv", "folds.csv", "metrics.json", "headline.json", "history.csv")


def cv_headline(figures: dict, n_images: int) -> dict:
    """The CV's headline figures under the keys every headline.json shares (metrics.headline):
    mean fold AUC with its spread, OOF sensitivity and specificity at the chosen threshold."""
    return headline(
        n_images,
        figures["cv_auc_mean"],
        sensitivity=figures.get("oof_sensitivity"),
        specificity=figures.get("oof_specificity"),
        threshold=figures.get("threshold"),
        auc_sd=figures.get("cv_auc_std"),
    )


# -- MLflow ---------------------------------------------------------------------------------------------


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
        mlflow.log_params(tracking.flatten_params(resolved))
        mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(resolved)), "config.yaml")
        yield parent.info.run_id


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


def register(model, meta: dict, images: np.ndarray, registered_model: str | None) -> dict:
    """Log the final model to the run as a servable pyfunc model (serving.pyfunc), registered as
    `registered_model` (None: not registered; serving.registry). Returns model.json's registry fields."""
    return registry.register(model, meta, images.astype(np.float32)[..., None], registered_model, _log_final_model)


def _log_final_model(model, meta: dict, registered: str | None, example: np.ndarray):
    """Log the final model as a servable MLflow pyfunc model (serving/pyfunc.py: images in, p(covid) and
    the label at the saved threshold out) and register it; returns the ModelInfo."""
    from covidxray.serving import pyfunc as serving

    gray = np.clip(np.asarray(example)[0, ..., 0], 0, 255).astype(np.uint8)
    return serving.log_model(model, meta, registered_name=registered, example=gray)
