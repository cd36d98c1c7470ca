"""model.tflite: the whole classifier (preprocess layer, backbone, head) as a LiteRT flatbuffer, so
that inference (`covidxray predict`, `calibrate`, the served MLflow model) runs without TensorFlow's
start-up: the `ai-edge-litert` runtime imports in a fraction of a second, TensorFlow in 5-12 s.

The train stage converts the final Keras model once (`convert`, which needs TensorFlow) and installs
model.tflite with model.keras and model.json. Its signature has two outputs, `probabilities` and
`features` (the pooled features the out-of-distribution score reads, networks/ood.py): one pass of
the backbone gives both, and one conversion (0.6 s for the smoke CNN, 4.7 s for a MobileNetV2 at
32 px) makes both. `LiteModel` answers `predict(x, batch_size, verbose)` as a Keras model does, so
networks/inference.py runs either.
Keras stays the fallback: a folder
without model.tflite (made before it existed), or a process without ai-edge-litert, loads
model.keras; Grad-CAM and training always need the Keras model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from covidxray import CovidXrayError


PROBABILITIES, FEATURES = "probabilities", "features"  # model.tflite's signature outputs (one: a classifier only)


def available() -> bool:
    """Whether the LiteRT runtime (ai-edge-litert) is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("ai_edge_litert") is not None
    except (ImportError, ValueError):
        return False


def convert(model) -> bytes:
    """A Keras model as a float32 LiteRT flat buffer (TensorFlow's converter, no optimisation: the
    outputs match Keras'; its chatter muted). Its inference call, traced once (no autograph), is
    saved as a SavedModel under TMPDIR and converted from there: Keras's own export
    (from_keras_model) traced and tracked the model over and over (a MobileNetV2 took 7.4 s, this
    4.7 s). Two conversions of the same weights give the same bytes."""
    import tempfile

    import tensorflow as tf

    source = model.inputs[0]
    spec = tf.TensorSpec(source.shape, tf.float32, name=str(getattr(source, "name", "") or "input"))
    module = tf.Module()
    module.weights = [getattr(v, "value", v) for v in model.variables]  # tracked: saved with the graph
    module.call = tf.function(lambda x: model(x, training=False), input_signature=[spec], autograph=False)
    with (
        tempfile.TemporaryDirectory(prefix="covidxray-tflite-") as folder,
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
        quiet_stderr(),
    ):
        warnings.simplefilter("ignore")
        tf.saved_model.save(module, folder, signatures={"serving_default": module.call.get_concrete_function()})
        return bytes(tf.lite.TFLiteConverter.from_saved_model(folder).convert())


def interpreter_class():
    """LiteRT's Interpreter (ai-edge-litert), else the one in TensorFlow's wheel, else None."""
    try:  # the successor package, when installed
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        import tensorflow as tf

        return tf.lite.Interpreter
    except (ImportError, AttributeError):
        return None


def cpu_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def quiet_stderr():
    """Mute file descriptor 2 (the interpreter's native "Created XNNPACK delegate" line) for a moment."""
    try:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):  # pragma: no cover - no real stderr
        yield
        return
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def interpreter(blob: bytes, batch: int, threads: int | None = None):
    """An interpreter (XNNPACK delegate, the default for float models) for inputs of `batch` images."""
    with warnings.catch_warnings(), quiet_stderr():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        found = interpreter_class()(model_content=blob, num_threads=threads or cpu_threads())
        inp = found.get_input_details()[0]
        found.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]])
        found.allocate_tensors()  # the delegate is applied here
    return found


class LiteModel:
    """The classifier's model.tflite in an interpreter, with Keras' `predict`. One image per call
    (on 2 cores XNNPACK keeps both busy with single images; training/extraction.py measured it), so
    the interpreter is planned once. `keras` holds the bytes of the model.keras it was converted
    from where they were at hand (calibrate copies them into its folder). A file with the
    `features` output also answers `features(x)`, and `outputs(x)` gives both from one pass."""

    def __init__(self, content: bytes, source: str, keras: bytes | None = None):
        try:
            self.interpreter = interpreter(content, 1)
            inputs, outputs = self.interpreter.get_input_details(), self._outputs()
        except (ValueError, RuntimeError) as err:
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise CovidXrayError(
                f"cannot load model {source}: not a LiteRT model ({reason}); delete it to use model.keras beside it"
            ) from None
        if len(inputs) != 1 or PROBABILITIES not in outputs:
            raise CovidXrayError(f"cannot load model {source}: a classifier has one input and a probabilities output")
        self.content, self.source, self.keras = content, source, keras
        self._input, self._output, self._features = inputs[0]["index"], outputs[PROBABILITIES], outputs.get(FEATURES)
        self.input_shape = tuple(int(d) for d in inputs[0]["shape_signature"])

    def _outputs(self) -> dict[str, int]:
        """{output name: tensor index}: the signature's names, or PROBABILITIES for a lone output."""
        signatures = self.interpreter.get_signature_list()
        if len(signatures) == 1:
            runner = self.interpreter.get_signature_runner(next(iter(signatures)))
            named = {name: d["index"] for name, d in runner.get_output_details().items()}
            if PROBABILITIES in named:
                return named
        details = self.interpreter.get_output_details()
        return {PROBABILITIES: details[0]["index"]} if len(details) == 1 else {}

    @property
    def has_features(self) -> bool:
        return self._features is not None

    def predict(self, x, batch_size: int = 1, verbose: int = 0) -> np.ndarray:
        """Softmax outputs (N, K) for float32 inputs (N, S, S, 1) (batch_size and verbose: Keras'
        arguments, unused)."""
        return self.outputs(x)[0]

    def features(self, x) -> np.ndarray:
        """The pooled features (N, D) of float32 inputs (N, S, S, 1)."""
        if self._features is None:
            raise CovidXrayError(f"{self.source}: this model.tflite has no features output")
        return self.outputs(x)[1]

    def outputs(self, x) -> tuple[np.ndarray, np.ndarray | None]:
        """(softmax outputs (N, K), pooled features (N, D) or None without that output), one pass."""
        x = np.asarray(x, dtype=np.float32)
        if tuple(x.shape[1:]) != self.input_shape[1:]:
            raise CovidXrayError(f"{self.source}: input shape {x.shape[1:]}, the model takes {self.input_shape[1:]}")
        probs, features = [], []
        for image in x:
            self.interpreter.set_tensor(self._input, np.ascontiguousarray(image[None]))
            self.interpreter.invoke()
            probs.append(np.array(self.interpreter.get_tensor(self._output)[0]))
            if self._features is not None:
                features.append(np.array(self.interpreter.get_tensor(self._features)[0]))
        if not probs:
            return np.zeros((0, 0), np.float32), None
        return np.stack(probs), (np.stack(features) if features else None)


def load(path, keras: bytes | None = None) -> LiteModel:
    """LiteModel from a model.tflite file; an unreadable, truncated or corrupt file is a one-line error."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as err:
        raise CovidXrayError(f"cannot read model {path}: {err.strerror or err}") from None
    return LiteModel(content, str(path), keras)
