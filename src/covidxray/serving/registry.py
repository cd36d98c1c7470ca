"""The model registry: which trained models are registered, which one is served (@champion), and why.

Only an intended action moves the alias `champion`: the committed default pipeline (`dvc repro`
with params.yaml, conf/ and the code as committed, not a `dvc exp run`; see `committed_default`)
or `covidxray promote VERSION`. Every version is tagged `covidxray.installed`: "false" when it is
registered (inside its training run), "true" once its run installed the model files in models/,
so a version of a run that failed or was killed in between stays "false" and is never promoted
(`promote` refuses it). The registered model and each version carry a description: research use,
and the headline figures as they become known (CV at training, LOCO from the loco stage).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from covidxray import CovidXrayError

CHAMPION = "champion"
INSTALLED_TAG = "covidxray.installed"
MODEL_DESCRIPTION = (
    "COVID-19 vs normal chest X-ray classifier of the covid-xray research repository. Research use "
    "only: not a medical device, not for diagnosis. Internal figures (held-out patients of the training "
    "collections) are near 1.0 and mostly measure collection shortcuts; judge a version by its external "
    "figures (collections it never saw) in its description and model card."
)
# What decides the default model: a pipeline run with any of these changed is an experiment.
COMMITTED_INPUTS = ("params.yaml", "conf", "src", "dvc.yaml", "data.dvc", "manifests", "pyproject.toml")


def committed_default(root: Path | None = None, params: dict | None = None) -> tuple[bool, str]:
    """(whether this process is the committed default pipeline, why not): run by DVC outside an
    experiment, in a git work tree whose model-deciding inputs (COMMITTED_INPUTS) match HEAD, on
    the parameters of the committed params.yaml (`params`: the resolved config the run used)."""
    from covidxray.infra.tracking import git_output

    if os.environ.get("DVC_EXP_NAME") or os.environ.get("DVC_EXP_BASELINE_REV"):
        return False, f"a DVC experiment ({os.environ.get('DVC_EXP_NAME') or 'unnamed'})"
    root = Path(root or Path.cwd())
    present = [p for p in COMMITTED_INPUTS if (root / p).exists()]
    changed = git_output(["diff", "--name-only", "HEAD", "--", *present], root)
    if changed is None:
        return False, "not a git work tree"
    if changed:
        files = sorted(set(changed.splitlines()))
        return False, f"uncommitted changes to {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}"
    if params is not None:
        import yaml

        try:
            committed = yaml.safe_load((root / "params.yaml").read_text())
        except (OSError, yaml.YAMLError):
            committed = None
        if committed != params:
            return False, "its parameters are not those of the committed params.yaml"
    return True, ""


def description(meta: dict, figures: dict | None = None) -> str:
    """A version's description: what it was trained on, research use, and its headline figures."""
    sources = meta.get("sources") or {}
    train = sources.get("train") if isinstance(sources, dict) else None
    lines = [
        f"{meta.get('model')} ({meta.get('weights')}) at {meta.get('image_size')} px, trained on "
        f"{json.dumps(train) if train else 'the configured collections'}; threshold "
        f"{float(meta.get('threshold', float('nan'))):.3f} ({meta.get('threshold_method')}). Research use only.",
    ]
    for name, value in (figures or {}).items():
        lines.append(f"{name}: {value}")
    return "\n".join(lines)


def next_version(client, name: str) -> str:
    """The version number the registry will give the next version of `name` (1 for a new model)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return "1"
    return str(max((int(v.version) for v in found), default=0) + 1)


def register(model, meta: dict, example, registered_model: str | None, log_model) -> dict:
    """Log the final model to the active run with `log_model(model, meta, registered_name, example)`
    and register it as `registered_model` (None: logged only). The logged metadata names the
    model, its version (the next one, planned under the tracking lock) and its run, so that the
    served answer says which model gave it. The version is tagged not yet installed. Returns
    model.json's registry fields."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from covidxray.infra import tracking

    client = MlflowClient()
    run_id = mlflow.active_run().info.run_id
    logged = {k: v for k, v in meta.items() if k not in ("mlflow_experiment_id",)}
    with tracking.store_lock():
        planned = next_version(client, registered_model) if registered_model else None
        logged.update(registered_model=registered_model, registered_version=planned, mlflow_run_id=run_id)
        info = log_model(model, logged, registered_model, example)
    version = getattr(info, "registered_model_version", None)
    if version:
        version = int(version)
        if str(version) != planned:
            print(f"warning: {registered_model} registered as version {version}, not {planned} as planned")
        client.update_registered_model(registered_model, MODEL_DESCRIPTION)
        client.update_model_version(registered_model, str(version), description(meta, {"run": run_id}))
        tags = {k: str(meta[k]) for k in ("threshold", "threshold_method", "image_size", "resize")}
        tags.update(classes=json.dumps(meta["classes"]), **{INSTALLED_TAG: "false"})
        for key, value in tags.items():
            client.set_model_version_tag(registered_model, str(version), key, value)
        print(f"train: registered {registered_model} version {version}")
    return {
        "registered_model": registered_model if version else None,
        "registered_version": version,
        "model_uri": f"models:/{registered_model}/{version}" if version else info.model_uri,
    }


def mark_installed(registered_model: str, version: str) -> None:
    """Tag a version as installed: its run wrote models/ (the files that match it)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_model_version_tag(registered_model, str(version), INSTALLED_TAG, "true")


def note_installed(models_dir: Path) -> str | None:
    """Whoever finishes an install marks it: complete an install into `models_dir` that a killed
    writer committed (fileset), then mark installed the registered version its model.run.json
    names when model.keras is the file that version was saved as (model_md5). So a kill between
    the commit and the tag does not leave every reader serving a version the registry calls never
    installed. Returns the version marked, None when nothing was to mark (or it is in another store)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from covidxray.infra import fileset, tracking
    from covidxray.infra.outputs import read_json
    from covidxray.networks.model_file import MODEL_FILE, RUN_FILE

    models_dir = Path(models_dir)
    fileset.finish_pending(models_dir)
    run = read_json(models_dir / RUN_FILE, required=False)
    run = run if isinstance(run, dict) else {}
    name, version = run.get("registered_model"), run.get("registered_version")
    if not name or not version or not (models_dir / MODEL_FILE).is_file():
        return None
    if tracking.dvc_md5(models_dir / MODEL_FILE) != run.get("model_md5"):
        return None
    client = MlflowClient()
    try:
        found = client.get_model_version(name, str(version))
    except MlflowException:
        return None
    if found.tags.get(INSTALLED_TAG) == "true":
        return None
    mark_installed(name, str(version))
    return str(version)


def crown(registered_model: str, version) -> None:
    """Point the alias `champion` at this version (`models:/NAME@champion`)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_registered_model_alias(registered_model, CHAMPION, str(version))
    print(f"train: {registered_model} version {version} is now @{CHAMPION}")


def add_figures(registered_model: str | None, version, figures: dict) -> None:
    """Append headline figures (e.g. the external AUC with its interval) to a version's description."""
    if not registered_model or not version:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        current = client.get_model_version(registered_model, str(version)).description or ""
    except MlflowException:
        return  # the model.json of another store: nothing to describe here
    kept = [line for line in current.splitlines() if line.split(":", 1)[0] not in figures]
    text = "\n".join([*kept, *(f"{k}: {v}" for k, v in figures.items())])
    client.update_model_version(registered_model, str(version), text)


def tag_figures(registered_model: str | None, version, figures: dict) -> None:
    """Headline figures (e.g. loco_auc_mean) as tags of a version, 4 significant digits: the
    registry's versions table shows tags as columns, so versions compare side by side."""
    if not registered_model or not version:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        for key, value in figures.items():
            client.set_model_version_tag(registered_model, str(version), key, f"{value:.4g}")
    except MlflowException:
        return  # the model.json of another store: nothing to tag here


def figure_tags(registered_model: str, version) -> dict[str, str]:
    """The loco_* figure tags of a version (tag_figures), sorted by name; {} for a version
    without them (trained before the loco stage ran)."""
    from mlflow.tracking import MlflowClient

    tags = MlflowClient().get_model_version(registered_model, str(version)).tags
    return {k: v for k, v in sorted(tags.items()) if k.startswith("loco_")}


def promote(registered_model: str, version: str) -> str:
    """Move @champion to `version` of `registered_model` on purpose; refuses a version that does
    not exist or whose run never installed it. Returns the version @champion pointed at before."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        found = client.get_model_version(registered_model, str(version))
    except MlflowException:
        raise CovidXrayError(f"no version {version} of registered model {registered_model} in this store") from None
    if found.tags.get(INSTALLED_TAG) != "true":
        raise CovidXrayError(
            f"{registered_model} version {version} was never installed (its training run failed or was "
            f"stopped before writing models/; tag {INSTALLED_TAG}={found.tags.get(INSTALLED_TAG)!r}): not promoted"
        )
    try:
        before = client.get_model_version_by_alias(registered_model, CHAMPION).version
    except MlflowException:
        before = None
    client.set_registered_model_alias(registered_model, CHAMPION, str(version))
    return before
