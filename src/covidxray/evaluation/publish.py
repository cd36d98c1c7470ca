"""The one ending of the evaluate stage and of `covidxray validate`: assess a set,
draw its plots and figures, write its report, log it to MLflow and install it, all or nothing.

    publish(...)  =  assess -> plots/ + figures/ -> report.md + metrics.json -> MLflow -> install

The report folder is built in a scratch folder and swapped into place only once complete and
logged (infra.outputs.replace_dir), so a failure or a kill leaves the previous outputs as they were.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray.evaluation import figures, metrics
from covidxray.evaluation.assess import AssessOptions, assess
from covidxray.evaluation.report import set_report
from covidxray.infra.outputs import figures_text, replace_dir
from covidxray.training import extraction
from covidxray.training.feature_store import open_store

OUTPUTS = ("metrics.json", "headline.json", "plots", "figures", "report.md")  # what publish writes


@dataclass(frozen=True)
class LogTo:
    """Where a report is logged: the store and experiment, the run to resume (None: a new run named
    run_name), tags, the artifact folder, and a prefix for the metric names."""

    tracking_uri: str | None
    experiment: str
    run_id: str | None = None
    run_name: str | None = None
    tags: dict = field(default_factory=dict)
    artifact_path: str = "evaluation"
    metric_prefix: str = ""


def write_assessment(
    model,
    meta: dict,
    images: np.ndarray,
    frame: pd.DataFrame,
    folder: Path,
    options: AssessOptions,
    partition: str = "test",
    context: dict | None = None,
) -> dict:
    """Assess `images` (rows of `frame`: label, patient_id, image_id) and write metrics.json,
    plots/, figures/ (with Grad-CAM) and report.md into `folder`. Returns the result."""
    context = context or {}
    store = open_store(options.features)  # a frozen backbone's features, computed once per image
    found = assess(model, meta, images, frame, options, partition, partial(extraction.probabilities, store=store))
    result, y, probs, pred = found.result, found.y, found.probs, found.pred
    result.update(context.get("extra_metrics") or {})
    classes, folder = meta["classes"], Path(folder)
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    tables = figures.write_plots(folder / "plots", frame, y, probs, pred, classes, options.n_bins)
    about = (
        f"{context.get('set_name') or partition + ' set'}: {len(frame)} images, "
        f"{frame['patient_id'].nunique()} patients"
    )
    figures.write_figures(
        folder / "figures", y, probs, pred, classes, meta["threshold"], tables, options.n_bins, result[partition], about
    )
    figures.gradcam_figure(
        model,
        images,
        frame,
        y,
        probs,
        pred,
        classes,
        options.per_group,
        options.seed,
        folder / "figures" / "gradcam.png",
    )
    (folder / "metrics.json").write_text(figures_text(result))
    from sklearn.metrics import classification_report

    labels = list(range(len(classes)))
    text = classification_report(y, pred, labels=labels, target_names=classes, digits=3, zero_division=0)
    (folder / "report.md").write_text(set_report(result, meta, text, partition, context))
    return result


def write_headline(folder: Path, result: dict, partition: str) -> dict:
    """headline.json: the few figures of metrics.json that `dvc metrics show` lists, under the keys
    every stage shares (metrics.headline); with probes, the share of the same-source probe called covid."""
    m = result[partition]
    probe = ((result.get("probes") or {}).get("same_source_other_finding") or {}).get("share_labelled_covid")
    found = metrics.headline(
        result[f"n_{partition}_images"],
        m["auc"],
        auc_low=m.get("auc_ci_low"),
        auc_high=m.get("auc_ci_high"),
        sensitivity=m.get("sensitivity"),
        specificity=m.get("specificity"),
        **({"probe_covid": probe} if probe is not None else {}),
    )
    (Path(folder) / "headline.json").write_text(figures_text(found))
    return found


def log_to_mlflow(out_dir: Path, result: dict, to: LogTo) -> str:
    """Log the metrics (names prefixed with `to.metric_prefix` where they do not start with it) and
    every file of out_dir to `to.run_id` (resumed), or to a new run when it is None or not in this
    store. Returns the run id used."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from covidxray.infra import tracking

    tracking.configure(to.tracking_uri, to.experiment)
    run_id, tags = to.run_id, {**to.tags, **tracking.process_tags()}  # a later run ends it if this process dies
    if run_id:
        try:
            mlflow.get_run(run_id)
        except MlflowException:
            print(f"warning: MLflow run {run_id} (model.json) not in this store; logging to a new run", file=sys.stderr)
            tags["model_run_id"] = run_id
            run_id = None
    prefix = to.metric_prefix
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else to.run_name) as run:
        if tags:
            mlflow.set_tags(tags)
        mlflow.log_metrics(
            {
                (k if k.startswith(prefix) else prefix + k): v
                for k, v in metrics.finite_metrics(result).items()
                if not k.startswith("bootstrap_")
            }
        )
        mlflow.log_artifacts(str(out_dir), artifact_path=to.artifact_path)
        return run.info.run_id


def publish(
    model,
    meta: dict,
    images: np.ndarray,
    frame: pd.DataFrame,
    dest: Path,
    *,
    options: AssessOptions,
    by: str,
    partition: str = "test",
    context: dict | None = None,
    log: LogTo | None = None,
    names=OUTPUTS,
    owned: bool = False,
) -> dict:
    """Assess a set and install its report (write_assessment) into `dest`, logged to MLflow when
    `log` is given; returns the result, with `mlflow_run_id` when logged.

    names: the entries of `dest` replaced (None: `dest` whole; see outputs.replace_dir), built in
    a scratch folder. by, owned: as replace_dir's.
    """

    def write(work: Path) -> dict:
        result = write_assessment(model, meta, images, frame, work, options, partition, context)
        write_headline(work, result, partition)
        if log is not None:
            result["mlflow_run_id"] = log_to_mlflow(work, result, log)
        return result

    return replace_dir(dest, write, by=by, names=names, owned=owned)
