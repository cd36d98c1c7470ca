"""The model file on disk: models/model.keras (saved without time stamps, so the same weights give
the same bytes), model.tflite (the same classifier for LiteRT, networks/litert.py), model.json
beside them (classes, input steps, threshold: checked field by field) and model.run.json (which
MLflow run and registry version made it). Loading reads them as one set, finishing an install that
train committed but did not finish (infra/fileset). Inference loads model.tflite with LiteRT where
it is present and the runtime installed (no TensorFlow start-up), else model.keras with Keras.
Keras is imported by the functions that need it (loading registers the custom preprocess layer of
networks/builders.py), so the file names here cost nothing to import: settings checks use them
before TensorFlow loads.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from covidxray import CovidXrayError
from covidxray.infra import fileset
from covidxray.infra.outputs import read_json

MODEL_FILE = "model.keras"  # what train writes and every consumer loads
TFLITE_FILE = "model.tflite"  # beside it, where train wrote one: what inference runs (LiteRT)
META_FILE = "model.json"  # beside it: classes, image_size, resize, threshold, how it was trained
# Which run and registry version made the model: beside it too, but not a DVC output (it differs on
# every run, model.keras and model.json do not); read only while its md5 of model.keras matches.
RUN_FILE = "model.run.json"
RUN_KEYS = ("registered_model", "registered_version", "model_uri", "mlflow_run_id", "mlflow_experiment_id")


def load(path):
    """Load a saved .keras model of this project (compile state not needed); this module
    registers the custom preprocess layer it uses. A missing, truncated or corrupt file is a
    one-line CovidXrayError naming it (Keras would say "File not found" for a file that exists,
    or raise a zipfile traceback)."""
    path = Path(path)
    if not path.is_file():
        raise CovidXrayError(f"model not found: {path}" + (" (a folder, not a model file)" if path.is_dir() else ""))
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise CovidXrayError(
            f"cannot load model {path}: not a .keras archive (a .keras model is a zip file; this "
            f"one, {path.stat().st_size} bytes, is truncated, corrupt or another kind of file)"
        )
    import keras

    from covidxray.networks import builders  # noqa: F401 - registers GrayscalePreprocess for load_model

    try:
        return keras.models.load_model(path, compile=False)
    except (ValueError, OSError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise CovidXrayError(
            f"cannot load model {path}: corrupt or not a model of this project ({type(err).__name__}: {reason})"
        ) from None


# -- saved models and their metadata ----------------------------------------------------------------


KNOWN_CLASSES = (("normal", "covid"), ("normal", "pneumonia", "covid"))  # the tasks' classes, covid last
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: what every saved archive member carries
SAVED_DATE = "1980-01-01@00:00:00"  # metadata.json's date_saved, fixed: the file's bytes follow its weights


def save(model, path) -> Path:
    """Save a .keras model with no time stamps inside (Keras writes the save time into
    metadata.json and every zip member's date): the same weights give the same bytes, so DVC and
    git see a rerun as unchanged."""
    path = Path(path)
    model.save(path)
    members = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename == "metadata.json":
                found = json.loads(data)
                found["date_saved"] = SAVED_DATE
                data = json.dumps(found).encode()
            elif info.filename == "config.json":
                data = _renumber_shared_objects(data)
            members.append((info.filename, info.compress_type, data))
    draft = path.with_name(f".{path.name}.draft")
    with zipfile.ZipFile(draft, "w") as archive:
        for name, compress_type, data in members:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = compress_type
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    os.replace(draft, path)
    return path


def _renumber_shared_objects(config: bytes) -> bytes:
    """Keras names objects shared between layers (a dtype policy) by their Python id(), a memory
    address that differs on every run: number them 1, 2, ... in order of appearance instead (the
    same id, the same number, so the sharing is kept)."""
    import re

    numbers: dict[bytes, bytes] = {}

    def number(match):
        return b'"shared_object_id": ' + numbers.setdefault(match.group(1), str(len(numbers) + 1).encode())

    return re.sub(rb'"shared_object_id": (\d+)', number, config)


def _meta_fail(source: str, key: str, expected: str, got) -> None:
    raise CovidXrayError(f"{source}: model metadata field {key} must be {expected}, got {got!r}")


def check_meta(meta: dict, source: str) -> dict:
    """The model metadata predictions need, checked field by field with one-line errors: classes
    (a known task's, covid last), image_size and store_size (integers >= 8), resize, normalize,
    crop_border, and threshold (a finite number in [0, 1])."""
    import math

    if not isinstance(meta, dict):
        raise CovidXrayError(f"{source}: model metadata must be a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("classes", "image_size", "threshold") if meta.get(k) is None]
    if missing:
        raise CovidXrayError(f"{source}: model metadata lacks {', '.join(missing)}")
    classes = meta["classes"]
    if not isinstance(classes, list) or tuple(classes) not in KNOWN_CLASSES:
        _meta_fail(source, "classes", " or ".join(str(list(c)) for c in KNOWN_CLASSES), classes)
    threshold = meta["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        _meta_fail(source, "threshold", "a finite number in [0, 1]", threshold)
    if not 0.0 <= threshold <= 1.0:
        _meta_fail(source, "threshold", "a finite number in [0, 1]", threshold)
    for key in ("image_size", "store_size"):
        size = meta.get(key)
        if (key == "image_size" or size is not None) and (
            isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096
        ):
            _meta_fail(source, key, "an integer number of pixels in [8, 4096]", size)
    from covidxray.data.images import input_spec

    try:  # models saved before store_size/normalize/crop_border existed: plain resize to image_size
        spec = input_spec(
            meta["image_size"],
            meta.get("resize") or "stretch",
            meta.get("store_size"),
            meta.get("normalize") or "none",
            meta.get("crop_border") or 0.0,
        )
    except CovidXrayError as err:
        raise CovidXrayError(f"{source}: {err}") from None
    return {**meta, **spec, "classes": [str(c) for c in classes], "threshold": float(threshold)}


def load_model(path: Path, engine: str = "auto"):
    """(model, checked metadata) from models/model.keras (or the folder holding it) and model.json
    beside it, read as one set: an install that train committed but did not finish is finished
    first (fileset), and a set replaced while it was being read is read again. engine "auto": the
    LiteRT model (litert.LiteModel) where model.tflite is beside model.keras and LiteRT is
    installed, else the Keras model; "keras": always the Keras model (Grad-CAM, training)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    fileset.finish_pending(path.parent)
    for _ in range(3):
        before = _stamp(path)
        model, meta = _load_pair(path, engine)
        if _stamp(path) == before:
            return model, meta
    raise CovidXrayError(
        f"{path.parent}: the model files changed while being read three times "
        "(a training is installing new ones): try again"
    )


def _stamp(path: Path) -> tuple:
    """What changes when model.keras, model.tflite or model.json is replaced: inode, mtime, size."""
    stats = []
    for item in (path, path.with_name(TFLITE_FILE), path.with_name(META_FILE)):
        try:
            found = item.stat()
            stats.append((found.st_ino, found.st_mtime_ns, found.st_size))
        except OSError:
            stats.append(None)
    return tuple(stats)


def _load_pair(path: Path, engine: str = "auto"):
    """model.keras (or model.tflite beside it, per `engine`) and its model.json, each checked."""
    if not path.is_file():
        raise CovidXrayError(f"model not found: {path} (run `dvc repro train`)")
    meta = check_meta(read_meta(path), str(path.with_name(META_FILE)))  # before the model: fails fast
    return load_for(path, engine), meta


def load_for(path: Path, engine: str = "auto"):
    """The model of a model.keras file for `engine` (load_model): the LiteRT model of model.tflite
    beside it when there is one and LiteRT is installed (a corrupt one is a one-line error naming
    it), else the Keras model. No model.tflite (folders made before it existed): Keras."""
    from covidxray.networks import litert

    if engine not in ("auto", "keras"):
        raise ValueError(f"engine must be auto or keras, got {engine!r}")
    lite = Path(path).with_name(TFLITE_FILE)
    if engine == "auto" and lite.is_file() and litert.available():
        return litert.load(lite, keras=Path(path).read_bytes())
    return load(path)


def write(model, folder: Path, tflite: bytes | None = None) -> list[Path]:
    """model.keras (and model.tflite, given or the LiteRT model's own) of a Keras model or of a
    LiteRT model that carries its model.keras bytes, into `folder`; the files written."""
    from covidxray.networks.litert import LiteModel

    folder = Path(folder)
    if isinstance(model, LiteModel):
        if model.keras is None:
            raise CovidXrayError(f"{model.source}: its model.keras is not at hand to write beside it")
        (folder / MODEL_FILE).write_bytes(model.keras)
        tflite = model.content
    else:
        save(model, folder / MODEL_FILE)
    if tflite is not None:
        (folder / TFLITE_FILE).write_bytes(tflite)
    return [folder / MODEL_FILE] + ([folder / TFLITE_FILE] if tflite is not None else [])


def read_meta(path: Path) -> dict:
    """model.json beside models/model.keras (unchecked), with the run and registry fields of
    model.run.json where that file belongs to this model.keras (its model_md5 matches: after a
    `dvc checkout` of another revision it does not, and the model's run is then unknown here)."""
    path = Path(path)
    meta_path = path.with_name(META_FILE)
    if not meta_path.is_file():
        raise CovidXrayError(f"model metadata not found: {meta_path} (written by the train stage)")
    meta = read_json(meta_path)
    run_path = path.with_name(RUN_FILE)
    run = read_json(run_path, required=False)
    if isinstance(meta, dict) and isinstance(run, dict) and run.get("model_md5") and path.is_file():
        from covidxray.infra.tracking import dvc_md5

        if run["model_md5"] == dvc_md5(path):
            meta.update({k: run[k] for k in RUN_KEYS if k in run})
    return meta
