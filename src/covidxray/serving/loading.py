"""Loading a model for inference: from a path (models/model.keras or its folder, model.json beside
it) or an MLflow model URI (models:/covid-xray-detector/<version>, runs:/<run>/<path>), and the
images it is to score, decoded with training's own input steps (images.load_image).

`check_model_path` and `missing_files` need no TensorFlow, so the tools check their inputs in a
second before any model code loads; the loaders import it when they run.
"""

from __future__ import annotations

import re
import os
import tempfile
from pathlib import Path

import numpy as np

from covidxray import CovidXrayError
from covidxray.infra.outputs import read_json
from covidxray.infra import fileset
from covidxray.networks.model_file import META_FILE, MODEL_FILE, check_meta, read_meta

URI = re.compile(r"^(models|runs):/")


def is_model_uri(spec) -> bool:
    """Whether `spec` names an MLflow model (models:/..., runs:/...) rather than a path."""
    return bool(URI.match(str(spec)))


def check_model_path(spec) -> None:
    """A path model (not an MLflow URI) must exist with its model.json: checked without loading
    anything, so a wrong --model is a one-line error before TensorFlow starts."""
    if is_model_uri(spec):
        return
    path = Path(spec)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CovidXrayError(f"model not found: {path} (run `dvc repro train`)")
    if not path.with_name(META_FILE).is_file():
        raise CovidXrayError(f"model metadata not found: {path.with_name(META_FILE)} (written by the train stage)")


def missing_files(paths) -> list[str]:
    """A one-line error for each of `paths` that is no file (absent, or a folder), in order."""
    return [
        f"image not found: {p}" if not Path(p).exists() else f"not an image file: {p}"
        for p in paths
        if not Path(p).is_file()
    ]


INPUT_FIELDS = ("classes", "image_size", "resize", "store_size", "normalize", "crop_border")


def path_meta(spec) -> dict | None:
    """A path model's checked metadata, read without TensorFlow (an install a killed writer had
    committed is finished first, as load_model does); None for an MLflow model URI."""
    if is_model_uri(spec):
        return None
    path = Path(spec)
    if path.is_dir():
        path = path / MODEL_FILE
    fileset.finish_pending(path.parent)
    return check_meta(read_meta(path), str(path.with_name(META_FILE)))


def load_after(spec: str, tracking_uri: str | None, prepare, engine: str = "auto"):
    """(model, metadata, prepare(metadata)): `prepare` is the work that needs only the metadata
    (checking labels, decoding the images); for a path model it runs before the model loads, so
    its errors (a too-small image, an unknown label, a bad threshold in model.json) come in a
    second, not after a model load. An MLflow model's metadata comes with its download."""
    early = path_meta(spec)
    prepared = prepare(early) if early is not None else None
    model, meta = resolve_model(spec, tracking_uri, engine)
    if early is None or any(early.get(k) != meta.get(k) for k in INPUT_FIELDS):  # replaced meanwhile
        prepared = prepare(meta)
    return model, meta, prepared


def resolve_model(spec: str, tracking_uri: str | None = None, engine: str = "auto"):
    """(model, metadata) from a path or an MLflow model URI: the LiteRT model where the model has a
    model.tflite (engine "auto"), else the Keras model (model_file.load_model)."""
    if is_model_uri(spec):
        return load_mlflow_model(str(spec), tracking_uri, engine)
    from covidxray.networks import model_file, ood

    model, meta = model_file.load_model(Path(spec), engine)
    folder = Path(spec) if Path(spec).is_dir() else Path(spec).parent
    return model, {**meta, "ood": ood.load(folder / ood.OOD_FILE)}  # None for a model without one


def load_mlflow_model(uri: str, tracking_uri: str | None = None, engine: str = "auto"):
    """Download an MLflow-logged model into a temporary folder (removed afterwards), load its
    .keras file (or the .tflite beside it: model_file.load_for) and read its metadata (threshold,
    classes, image_size, resize) from the MLmodel metadata, else from a model.json logged with it
    or on its run."""
    from covidxray.infra import tracking
    from covidxray.networks import model_file, ood

    # a command's output is its result: no per-file download bars (set the variable to see them)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    store = tracking.use_store(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="covidxray-model-") as local:
        info, path = _download_model(uri, store, Path(local))
        meta = _mlflow_meta(info, path, Path(local) / "run")
        meta.setdefault("mlflow_run_id", info.run_id)
        meta["model_uri"] = uri
        meta = model_file.check_meta(meta, uri)
        files = sorted(path.rglob("*.keras"))
        if not files:
            raise CovidXrayError(f"MLflow model {uri} holds no .keras file")
        found = sorted(path.rglob(ood.OOD_FILE))
        return model_file.load_for(files[0], engine), {**meta, "ood": ood.load(found[0]) if found else None}


def _download_model(uri: str, store: str, local: Path):
    """(ModelInfo, local copy of the model folder), or a one-line error naming the URI and store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        info = mlflow.models.get_model_info(uri)
        return info, Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(local)))
    except (MlflowException, OSError) as err:
        message = " ".join(str(getattr(err, "message", err)).split())[:300]
        raise CovidXrayError(f"cannot load MLflow model {uri} from {store}: {message}") from None


def _mlflow_meta(info, path: Path, run_dir: Path) -> dict:
    """The model's metadata: MLmodel metadata over a model.json in the model (pyfunc artifacts),
    else over the model.json logged on its run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    meta = dict(info.metadata or {})
    found = sorted(path.rglob(META_FILE))
    if found:
        return {**read_json(found[0]), **meta}
    if info.run_id and any(meta.get(k) is None for k in ("classes", "image_size", "threshold")):
        try:
            run_meta = mlflow.artifacts.download_artifacts(
                run_id=info.run_id, artifact_path=META_FILE, dst_path=str(run_dir)
            )
            meta = {**read_json(Path(run_meta)), **meta}
        except (MlflowException, OSError):
            pass
    return meta


def load_images(paths, meta: dict, on_error) -> tuple[np.ndarray, list[int]]:
    """Decode each file like training does (the input steps saved in the model's metadata);
    on_error(path, message) for those that fail. Returns the (n_ok, size, size) uint8 stack and
    the positions of the files that worked."""
    from covidxray.data.images import load_image

    size = meta["image_size"]
    steps = (meta["resize"], meta["store_size"], meta["normalize"], meta["crop_border"])
    pixels, ok = [], []
    for i, path in enumerate(paths):
        try:
            pixels.append(load_image(Path(path), size, *steps))
            ok.append(i)
        except CovidXrayError as err:
            on_error(path, str(err))
    stack = np.stack(pixels) if pixels else np.zeros((0, size, size), np.uint8)
    return stack, ok
