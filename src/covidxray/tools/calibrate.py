"""`covidxray calibrate SET --model M --out DIR`: a site's own decision threshold.

A threshold chosen on the training collections does not transfer to another hospital (the loco
stage measures by how much). A site labels a few of its own X-rays (SET in `validate`'s format: a
folder with one sub-folder per class, or a CSV with path, label[, patient_id]); this tool scores
them with the model, picks the threshold on them (Youden's J, or the highest threshold reaching a
target sensitivity) and writes a model folder: the same model.keras (and model.tflite, where the
model has one: it is scored with LiteRT then, no TensorFlow), and a model.json carrying the
site threshold and where it came from (`site_calibration`). predict, validate and the served
model read the threshold from model.json, so they apply it; `--register NAME` also logs the
calibrated model to MLflow as a servable model under NAME.

At least 5 labelled images of every class of the model are needed, and only its labels; otherwise
one line and nothing written. DIR must be new, empty, or an earlier calibrate output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

from covidxray import CovidXrayError
from covidxray.evaluation.calibration import MIN_PER_CLASS, operating_point, site_threshold
from covidxray.evaluation.metrics import THRESHOLD_METHODS
from covidxray.infra.outputs import check_replaceable, json_safe, replace_dir
from covidxray.evaluation.assess import check_labels
from covidxray.networks.inference import predictions
from covidxray.networks import model_file
from covidxray.networks.model_file import META_FILE
from covidxray.serving.loading import check_model_path, load_after, load_images
from covidxray.tools.validate import read_external


def check_counts(labels, classes: list[str], where) -> dict[str, int]:
    """Images per class of the model; fewer than MIN_PER_CLASS of any is a one-line error."""
    counts = {c: int((np.asarray(labels) == c).sum()) for c in classes}
    short = {c: n for c, n in counts.items() if n < MIN_PER_CLASS}
    if short:
        listed = ", ".join(f"{c}: {n}" for c, n in short.items())
        raise CovidXrayError(
            f"{where}: too few labelled images to calibrate ({listed}); at least {MIN_PER_CLASS} of each "
            f"class ({', '.join(classes)}) are needed"
        )
    return counts


def site_meta(meta: dict, threshold: float, provenance: dict) -> dict:
    """The model's metadata with the site threshold, and the threshold it replaces in the
    provenance. The registered name, version and MLflow run of the model it calibrates stay: predict
    and validate report them, marked site-calibrated (inference.identity)."""
    out = {k: v for k, v in meta.items() if k != "model_uri"}  # the folder is not that URI
    provenance = {
        **provenance,
        "replaces_threshold": meta["threshold"],
        "replaces_threshold_method": meta.get("threshold_method"),
    }
    return {
        **out,
        "threshold": float(threshold),
        "threshold_method": provenance["method"],
        "site_calibration": provenance,
    }


def calibrate(
    set_path: Path,
    model_spec: str,
    out_dir: Path,
    *,
    method: str = "youden",
    target_sensitivity: float = 0.9,
    tracking_uri: str | None = None,
) -> dict:
    """Pick the site threshold on the labelled set and write out_dir (model.keras, model.tflite
    where the model has one, model.json);
    returns the new metadata. Nothing is written when the set cannot calibrate."""
    if method not in THRESHOLD_METHODS:
        raise CovidXrayError(f"--method must be one of {', '.join(THRESHOLD_METHODS)}, got {method!r}")
    if not 0.0 < target_sensitivity <= 1.0:
        raise CovidXrayError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")
    set_path, out_dir = Path(set_path), Path(out_dir)
    check_replaceable(out_dir, "calibrate")
    frame = read_external(set_path)
    check_model_path(model_spec)

    def skip(path, message):
        print(f"covidxray calibrate: warning: skipped: {message}", file=sys.stderr)

    def decode(meta):  # before the model loads where model.json can be read alone
        check_labels(frame["label"], meta["classes"])
        check_counts(frame["label"], meta["classes"], set_path)  # before decoding: fail fast
        pixels, ok = load_images(frame["path"], meta, skip)
        readable = frame.iloc[ok].reset_index(drop=True)
        return pixels, readable, check_counts(readable["label"], meta["classes"], f"{set_path} (readable images)")

    model, meta, (pixels, frame, counts) = load_after(model_spec, tracking_uri, decode)
    positive_class = meta["classes"][-1]
    scores = predictions(model, meta, pixels)[f"p_{positive_class}"].to_numpy(dtype=float)
    positive = (frame["label"] == positive_class).to_numpy()
    threshold = site_threshold(positive, scores, method, target_sensitivity, str(set_path), float(meta["threshold"]))
    provenance = {
        "set": str(set_path.resolve()),
        "images": int(len(frame)),
        "patients": int(frame["patient_id"].nunique()),
        "per_class": counts,
        "method": method,
        **({"target_sensitivity": float(target_sensitivity)} if method == "sensitivity" else {}),
        "on_the_set": operating_point(positive, scores, threshold),
        "at_the_replaced_threshold": operating_point(positive, scores, float(meta["threshold"])),
        "model": str(model_spec),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    new_meta = json_safe(site_meta(meta, threshold, provenance))

    def write(folder: Path) -> None:
        model_file.write(model, folder)
        (folder / META_FILE).write_text(json.dumps(new_meta, indent=2) + "\n")

    replace_dir(out_dir, write, by="calibrate", owned=True)
    return new_meta


def register(out_dir: Path, name: str, tracking_uri: str | None, experiment: str) -> str:
    """Log the calibrated model folder as a servable MLflow model registered as `name`; its URI."""
    import mlflow

    from covidxray.infra import tracking
    from covidxray.networks.model_file import load_model
    from covidxray.serving import pyfunc

    model, meta = load_model(out_dir)
    tracking.configure(tracking_uri, experiment)
    with mlflow.start_run(run_name="calibrate", tags={"covidxray.stage": "calibrate", **tracking.process_tags()}):
        mlflow.log_dict(meta["site_calibration"], "site_calibration.json")
        info = pyfunc.log_model(model, meta, registered_name=name)
    version = getattr(info, "registered_model_version", None)
    return f"models:/{name}/{version}" if version else info.model_uri


def calibrate_cli(argv: list[str]) -> int:
    """`covidxray calibrate SET --model M --out DIR [--method youden|sensitivity]`: a site threshold."""
    from covidxray.infra.config import compose

    parser = argparse.ArgumentParser(prog="covidxray calibrate", description=calibrate_cli.__doc__)
    parser.add_argument("path", help="labelled site images: one sub-folder per class, or a CSV with path, label")
    parser.add_argument("--model", default="models/model.keras", help="a model folder or file, or models:/NAME/V")
    parser.add_argument("--out", required=True, help="the calibrated model folder to write (new or empty)")
    parser.add_argument("--method", default="youden", choices=THRESHOLD_METHODS)
    parser.add_argument("--target-sensitivity", type=float, default=0.9, help="for --method sensitivity")
    parser.add_argument("--register", metavar="NAME", help="also log it to MLflow, registered as NAME")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or mlruns/)")
    args = parser.parse_args(argv)
    meta = calibrate(
        Path(args.path),
        args.model,
        Path(args.out),
        method=args.method,
        target_sensitivity=args.target_sensitivity,
        tracking_uri=args.tracking_uri,
    )
    cal = meta["site_calibration"]
    point = cal["on_the_set"]
    print(
        f"calibrate: {cal['images']} images; threshold {meta['threshold']:.4f} ({args.method}; was "
        f"{cal['replaces_threshold']:.4f}): sensitivity {point['sensitivity']:.3f}, specificity "
        f"{point['specificity']:.3f} on the set; wrote {args.out}"
    )
    if args.register:
        cfg = compose()
        uri = register(
            Path(args.out), args.register, args.tracking_uri or cfg.mlflow.tracking_uri, cfg.mlflow.experiment
        )
        print(f"calibrate: registered {uri}")
    return 0
