"""train stage: K-fold cross-validation on the non-test images, then the final model.

For each CV fold k (cv.folds: all | the first n): train on the other folds, validate on fold k
(early stopping on validation AUC, best weights restored), predict fold k: the out-of-fold (OOF)
predictions. The decision threshold is chosen on the OOF predictions (train.threshold: youden |
sensitivity) and saved with the model. Then the final model is trained on all non-test images
with the same config, for the CV's median best epoch when early stopping is on. The test
partition is never read here. `run` is the recipe; the fitting itself is fitting.Trainer's.

Outputs (DVC: paths.models and paths.reports/cv; as a Hydra app: the job's output directory),
installed together (fileset): a reader sees all old files or all new ones, also after a kill.
  models/model.keras       the final model (networks/builders.py layout; networks/model_file.py loads it)
  models/model.tflite      the same classifier for LiteRT, its pooled features a second output: what inference runs
  models/ood.npz           the out-of-distribution detector (networks/ood.py: mean, precision, threshold, rate)
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray.infra import config, fileset, tracking
from covidxray.networks import litert, ood
from covidxray.serving import registry
from covidxray.settings.loco import LocoSettings, loco_settings
from covidxray.settings.train import DEFAULT_OPTIMIZED_METRIC, TrainSettings, train_settings
from covidxray.infra.outputs import figures_text, json_safe
from covidxray.training import site_adaptation
from covidxray.training.trainer import Trainer
from covidxray.training import recipe
from covidxray.training.cv_data import CVData, load_cv_data, make_trainer
from covidxray.evaluation.metrics import (
    OOF_METRICS,
    classification_metrics,
    finite_metrics,
    headline,
)
from covidxray.evaluation.metrics import threshold_rule as metrics_threshold_rule
from covidxray.evaluation import cv_tracking
from covidxray.evaluation.figures import training_curves_figure

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
    registry.note_installed(models_dir)  # an install a killed training committed: finished and marked
    wall = time.perf_counter()
    with cv_tracking.parent_run(cfg, s.fit.model.name, len(data.folds)) as parent_id:
        cv = cross_validate(trainer, data, parent_id, metrics_threshold_rule(s.threshold, s.target_sensitivity))
        metrics = cv_tracking.summarise_folds(cv.folds)
        oof = oof_table(data, cv.oof)
        metrics.update(oof_figures(oof, data.classes, cv.recipe.threshold))
        metrics.update(cv_seconds=time.perf_counter() - wall, feature_cache_s=trainer.cache_seconds)
        cv_tracking.log_cv(metrics, s.threshold)
        if by_loco is not None:  # model selection on the leave-one-collection-out estimate
            metrics.update(loco_estimate(by_loco))
        model, epochs, detector = None, cv.recipe.epochs, None
        if s.final_model:
            model, found = final_model(trainer, cv.recipe, parent_id)
            metrics.update(found)
            detector = ood_detector(trainer, data, model, s.ood_false_alarm)
        cv_tracking.log_feature_store(trainer)
        meta = model_meta(s, data, metrics["threshold"], parent_id, experiment_id)
        lite = None if model is None else litert.convert(ood.with_features(model))  # inference without TensorFlow
        if model is not None:
            meta.update(
                register(model, meta, data.images[:1], register_as, lite, detector),
                epochs=epochs[0],
                **({"fine_tune_epochs": epochs[1]} if trainer.fine_tunes else {}),
            )
        metrics["train_seconds"] = time.perf_counter() - wall
        stats = site_adaptation.feature_stats(trainer.pooled_features(model)) if model is not None else None
        written = write_outputs(models_dir, cv_dir, cv, oof, metrics, model, meta, lite, stats, detector)
        import mlflow  # the hashes of what this run read and installed, as DVC computes them

        mlflow.set_tags(tracking.content_tags([s.curated, s.splits, *pretrained_file(s), *written]))
        if meta.get("registered_version"):
            crown_if_intended(meta["registered_model"], meta["registered_version"], pipeline, cfg)
    print(
        f"train: wrote {cv_dir}/{{oof.csv,folds.csv,metrics.json,headline.json,history.csv}}"
        + (f" and {models_dir}/model.{{keras,tflite,json}}" if model is not None else "")
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
        run_ids[k] = cv_tracking.fold_run(k, parent_id, *sizes[k])
        return run_ids[k]

    positive = data.y == len(data.classes) - 1
    found = recipe.cross_validate(trainer, np.arange(len(data.y)), fold, data.folds, positive, rule, open_run)
    rows = []
    for k, (_, val), (probs, result) in zip(data.folds, found.splits, found.fitted, strict=True):
        rows.append({"fold": k, **cv_tracking.record_fold(k, run_ids[k], data.y[val], probs, result, data.classes)})
    history = pd.concat([r.history for _, r in found.fitted], ignore_index=True)
    cv_tracking.log_figure(training_curves_figure(history, f"{len(found.splits)}-fold CV"), "training_curves.png")
    return CVResult(found, found.oof, pd.DataFrame(rows), history)


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


def loco_estimate(settings: LocoSettings) -> dict:
    """The recipe's leave-one-collection-out headline (loco_* figures), logged on the active run."""
    import mlflow

    from covidxray.evaluation import loco

    found = loco.headline(
        loco.run(settings.train.curated, settings.train.splits, settings.recipe, settings.spec, settings.seed)
    )
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


def ood_detector(trainer: Trainer, data: CVData, model, rate: float) -> ood.Detector:
    """The final model's out-of-distribution detector (networks/ood.py): its pooled features of
    every training image (the feature store's table when the backbone stayed frozen), the
    threshold at `rate` false alarms on the CV folds' held-out rows."""
    import mlflow

    frozen = trainer.uses_cache and not trainer.fine_tunes
    features = trainer.pooled_features(model) if frozen else ood.features(model, data.images)
    detector = ood.fit(features, data.rows["fold"].to_numpy(), data.folds, rate)
    mlflow.log_metrics({"ood_threshold": detector.threshold, "ood_false_alarm": rate})
    print(f"train: out-of-distribution threshold {detector.threshold:.2f} ({rate:.1%} of held-out training images)")
    return detector


# -- outputs ------------------------------------------------------------------------------------------------


def output_dirs(models: Path, reports: Path) -> tuple[Path, Path]:
    """(models dir, CV reports dir): the Hydra job's output dir when run as a Hydra app (so sweep
    jobs never clobber each other), else `models` and `reports`/cv (DVC)."""
    base = config.hydra_output_dir()
    if base is not None:
        for root in config.hydra_output_roots():  # installs of killed runs there: nobody else revisits them
            fileset.recover_under(root)
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
    models_dir: Path,
    cv_dir: Path,
    cv: CVResult,
    oof: pd.DataFrame,
    metrics: dict,
    model,
    meta: dict,
    tflite: bytes | None = None,
    stats=None,
    detector: ood.Detector | None = None,
) -> None:
    """Write reports/cv/* and (with a final model) model.keras, model.tflite, model.json and the
    training images' pooled-feature statistics (`stats`, for site adaptation) into staging folders,
    log them to the MLflow run, then install them together (fileset). Without a final model, an
    earlier model.keras/model.json goes in the same switch: it would not match these
    CV results. Timings (TIMINGS) go to the run only, so that a rerun writes the same bytes: the
    files hold figures, metrics.json all of them, headline.json the few `dvc metrics show` lists.
    Returns the installed files."""
    import mlflow

    from covidxray.networks import model_file
    from covidxray.networks.model_file import META_FILE, MODEL_FILE, TFLITE_FILE

    timings = {k: v for k, v in metrics.items() if any(t in k for t in TIMINGS)}
    same_every_run = {k: v for k, v in meta.items() if k not in model_file.RUN_KEYS}
    figures = {k: v for k, v in metrics.items() if k not in timings}
    n_images = int(len(oof))
    remove = [
        models_dir / name
        for name in (MODEL_FILE, TFLITE_FILE, META_FILE, model_file.RUN_FILE, site_adaptation.STATS_FILE, ood.OOD_FILE)
        if model is None or (name == TFLITE_FILE and tflite is None) or (name == ood.OOD_FILE and detector is None)
    ]
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
            model_file.write(model, new_models, tflite)
            if detector is not None:
                ood.save(detector, new_models / ood.OOD_FILE)
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
    installed = [MODEL_FILE, META_FILE, site_adaptation.STATS_FILE] + ([TFLITE_FILE] if tflite is not None else [])
    installed += [ood.OOD_FILE] if detector is not None else []
    return written + ([models_dir / name for name in installed] if model is not None else [])


CV_FILES = ("oof.csv", "folds.csv", "metrics.json", "headline.json", "history.csv")


def cv_headline(figures: dict, n_images: int) -> dict:
    """The CV's headline figures under the keys every headline.json shares (metrics.headline):
    mean fold AUC with its spread, OOF sensitivity and specificity at the chosen threshold."""
    return headline(
        n_images,
        figures["cv_auc_mean"],
        sensitivity=figures.get("oof_sensitivity"),
        specificity=figures.get("oof_specificity"),
        auc_sd=figures.get("cv_auc_std"),
    )


def register(
    model, meta: dict, images: np.ndarray, registered_model: str | None, tflite: bytes | None = None, detector=None
) -> dict:
    """Log the final model (with its model.tflite and OOD detector) to the run as a servable pyfunc model
    (serving.pyfunc), registered as `registered_model` (None: not registered; serving.registry).
    Returns model.json's registry fields."""
    from functools import partial

    log = partial(_log_final_model, tflite=tflite, detector=detector)
    return registry.register(model, meta, images.astype(np.float32)[..., None], registered_model, log)


def _log_final_model(model, meta: dict, registered: str | None, example: np.ndarray, tflite=None, detector=None):
    """Log the final model as a servable MLflow pyfunc model (serving/pyfunc.py: images in, p(covid) and
    the label at the saved threshold out) and register it; returns the ModelInfo."""
    from covidxray.serving import pyfunc as serving

    gray = np.clip(np.asarray(example)[0, ..., 0], 0, 255).astype(np.uint8)
    return serving.log_model(model, meta, registered_name=registered, example=gray, tflite=tflite, detector=detector)
