"""Serving: the final model as an MLflow pyfunc model, so that `mlflow models serve` and
`mlflow.pyfunc.load_model` run it in a fresh process with nothing but MLflow and LiteRT (or
TensorFlow, for a model logged without model.tflite).

The logged model carries the .keras file, the .tflite file beside it where there is one (what the
served model runs, networks/litert.py) and its metadata (model.json: classes, image_size,
resize, threshold) as artifacts and this package as code (code_paths); MLflow builds it from a
two-line entry file ("models from code", no pickle). Input: a DataFrame with one row per image,
either `image` (the encoded file: PNG, JPEG, ...; base64 in the scoring server's JSON) or `pixels`
(a 2-D grayscale array of integers 0..255). Every image goes through training's input steps
(images.decode_grayscale, images.resize to the store size, images.prepare). Output per row:
p_<class> (covid first), the label at the saved threshold, that threshold, and which model answered
(model_name, model_version, model_run_id; inference.py, as `covidxray predict`).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.infra.outputs import naming_writes
from covidxray.networks import ood
from covidxray.networks.inference import IDENTITY, OOD_COLUMNS, decode_rows, png_bytes, predictions

MODEL_ARTIFACT = "model"
META_ARTIFACT = "meta"
TFLITE_ARTIFACT = "tflite"  # downloaded beside the model.keras artifact: model_file.load_for finds it
OOD_ARTIFACT = "ood"
ENTRY = '''"""MLflow models-from-code entry: the covid-xray detector (see covidxray.serving.pyfunc)."""
from covidxray.infra import quiet

quiet.install()  # before TensorFlow loads in the serving process

import mlflow  # noqa: E402

from covidxray.serving.pyfunc import CovidXrayModel  # noqa: E402

mlflow.models.set_model(CovidXrayModel())
'''


class CovidXrayModel(mlflow.pyfunc.PythonModel):
    """The LiteRT (or Keras) model with its metadata: images in, p(class) and the label at the
    threshold out."""

    def load_context(self, context):
        from covidxray.infra.outputs import read_json
        from covidxray.networks.model_file import check_meta, load_for

        self.meta = check_meta(read_json(Path(context.artifacts[META_ARTIFACT])), META_ARTIFACT)
        self.model = load_for(Path(context.artifacts[MODEL_ARTIFACT]))
        if context.artifacts.get(OOD_ARTIFACT):  # models logged before the flag have none
            self.meta["ood"] = ood.load(Path(context.artifacts[OOD_ARTIFACT]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """One output row per input row; a row that is no usable image is a 400 for the server."""
        from mlflow.exceptions import MlflowException

        try:
            pixels = decode_rows(model_input, self.meta)
        except CovidXrayError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from None
        return predictions(self.model, self.meta, pixels)


def signature(classes: list[str]):
    """Input: optional `image` (binary) and `pixels` (2-D integer array) columns; output: the
    columns of inference.predictions."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema(
        [ColSpec("binary", "image", required=False), ColSpec(Array(Array("long")), "pixels", required=False)]
    )
    outputs = [ColSpec("double", f"p_{name}") for name in [classes[-1], *classes[:-1]]]
    identity = [ColSpec("string", column) for column in IDENTITY]
    flags = [ColSpec(kind, column, required=False) for column, kind in OOD_COLUMNS.items()]
    return ModelSignature(
        inputs, Schema([*outputs, ColSpec("string", "label"), ColSpec("double", "threshold"), *identity, *flags])
    )


# -- logging ------------------------------------------------------------------------------------------


def pip_requirements() -> list[str]:
    """What the model needs beside MLflow, at the versions it was trained with."""
    from importlib import metadata

    reqs = []
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "ai-edge-litert", "pillow", "numpy", "pandas"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def log_model(
    model,
    meta: dict,
    registered_name: str | None = None,
    example: np.ndarray | None = None,
    name: str = "model",
    tflite: bytes | None = None,
    detector: ood.Detector | None = None,
):
    """Log a trained Keras model (or a LiteRT model with its model.keras bytes) with its metadata
    (classes, image_size, resize, threshold, ...) and its model.tflite (`tflite`, or the LiteRT
    model's own) as a pyfunc model on the active run, register it under `registered_name` if
    given, and return the ModelInfo. `example`: one 2-D uint8 image, saved as the input example."""
    from covidxray.networks import model_file

    for key in ("classes", "image_size", "threshold"):
        if meta.get(key) is None:
            raise CovidXrayError(f"model metadata lacks {key}: cannot log a servable model")
    # A full disk (TMPDIR, where this and MLflow stage the model, or the artifact store): one line
    # naming the file, not shutil's list of every file of a copied folder.
    with (
        naming_writes(Path(tempfile.gettempdir()), "the servable model (MLflow pyfunc)"),
        tempfile.TemporaryDirectory(prefix="covidxray-pyfunc-") as tmp,
    ):
        tmp = Path(tmp)
        files = model_file.write(model, tmp, tflite)
        detector = detector if detector is not None else meta.get("ood")  # a loaded model's, when given none
        meta = {k: v for k, v in meta.items() if k != "ood"}
        (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        artifacts = {MODEL_ARTIFACT: str(files[0]), META_ARTIFACT: str(tmp / "model.json")}
        artifacts |= {TFLITE_ARTIFACT: str(files[1])} if len(files) > 1 else {}
        if detector is not None:
            artifacts[OOD_ARTIFACT] = str(ood.save(detector, tmp / ood.OOD_FILE))
        code = tmp / "covidxray"
        shutil.copytree(
            Path(__file__).resolve().parents[1], code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        entry = tmp / "covidxray_model.py"
        entry.write_text(ENTRY)
        example_frame = None if example is None else pd.DataFrame({"image": [png_bytes(example)]})
        path = list(sys.path)
        try:  # MLflow loads the model once to check the example, putting its code first on sys.path
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=str(entry),
                code_paths=[str(code)],
                artifacts=artifacts,
                signature=signature(list(meta["classes"])),
                input_example=example_frame,
                registered_model_name=registered_name or None,
                metadata=meta,
                pip_requirements=pip_requirements(),
            )
        finally:
            sys.path[:] = path
