"""`covidxray calibrate SET --model M --out DIR`: a site's own decision threshold.

A threshold chosen on the training collections does not transfer to another hospital (the loco
stage measures by how much). A site labels a few of its own X-rays (SET in `validate`'s format: a
folder with one sub-folder per class, or a CSV with path, label[, patient_id]); this tool scores
them with the model, picks the threshold on them (Youden's J, or the highest threshold whose
one-sided Clopper-Pearson lower bound on sensitivity, at `--confidence`, reaches a target: the
target then holds at the site with that confidence, not just on the few positives seen) and writes
a model folder: the same model.keras (and model.tflite, where the model has one: it is scored with
LiteRT then, no TensorFlow), and a model.json carrying the
site threshold and where it came from (`site_calibration`). predict, validate and the served
model read the threshold from model.json, so they apply it; `--register NAME` also logs the
calibrated model to MLflow as a servable model under NAME.

At least 5 labelled images of every class of the model are needed, and only its labels, and for a
target sensitivity the positives it needs at the confidence (0.9 at 0.95: 29); otherwise one line,
before the model loads, and nothing written. A model adapted to the site (`covidxray adapt`) keeps
its feature statistics in the calibrated folder: adapt first, then calibrate. DIR must be new,
empty, or an earlier calibrate output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from covidxray import CovidXrayError
from covidxray.evaluation.calibration import (
    MIN_PER_CLASS,
    bound_at,
    check_positives,
    operating_point,
    site_threshold,
)
from covidxray.evaluation.metrics import THRESHOLD_METHODS
from covidxray.infra.outputs import check_replaceable, json_safe, replace_dir
from covidxray.evaluation.assess import check_labels
from covidxray.networks import ood
from covidxray.networks.inference import predictions
from covidxray.networks import model_file
from covidxray.networks.model_file import KNOWN_CLASSES, META_FILE
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


def positives_check(labels, target: float, confidence: float | None, where) -> int | None:
    """The positives a target sensitivity needs at `confidence` (None without one); fewer in the
    set is a one-line error naming the number. Every task's positive class is covid (last)."""
    if confidence is None:
        return None
    positives = int((np.asarray(labels) == KNOWN_CLASSES[0][-1]).sum())
    return check_positives(positives, target, confidence, f"{where}: --target-sensitivity at --confidence")


def carry_stats(model_spec, folder: Path) -> None:
    """The feature statistics beside a model folder (training's, and an adapted site's), copied
    into `folder`: the calibrated model stays adaptable and says what it was adapted to."""
    from covidxray.serving.loading import is_model_uri
    from covidxray.training.site_adaptation import SITE_STATS_FILE, STATS_FILE

    if is_model_uri(model_spec):
        return
    source = Path(model_spec) if Path(model_spec).is_dir() else Path(model_spec).parent
    for name in (STATS_FILE, SITE_STATS_FILE):
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def site_meta(meta: dict, threshold: float, provenance: dict) -> dict:
    """The model's metadata with the site threshold, and the threshold it replaces in the
    provenance. The registered name, version and MLflow run of the model it calibrates stay: predict
    and validate report them, marked site-calibrated (inference.identity)."""
    out = {k: v for k, v in meta.items() if k not in ("model_uri", "ood")}  # the folder is not that URI
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
    confidence: float | None = 0.95,
    tracking_uri: str | None = None,
) -> dict:
    """Pick the site threshold on the labelled set and write out_dir (model.keras, model.tflite
    where the model has one, model.json, and the feature statistics of an adapted model); returns
    the new metadata. Nothing is written when the set cannot calibrate. confidence None: the target
    on the positives as found."""
    if method not in THRESHOLD_METHODS:
        raise CovidXrayError(f"--method must be one of {', '.join(THRESHOLD_METHODS)}, got {method!r}")
    if not 0.0 < target_sensitivity <= 1.0:
        raise CovidXrayError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise CovidXrayError(f"--confidence must be in (0, 1), got {confidence}")
    confidence = confidence if method == "sensitivity" else None
    set_path, out_dir = Path(set_path), Path(out_dir)
    check_replaceable(out_dir, "calibrate")
    frame = read_external(set_path)
    needed = positives_check(frame["label"], target_sensitivity, confidence, set_path)  # before the model loads
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
    what = f"{set_path} (readable images)"
    threshold = site_threshold(
        positive, scores, method, target_sensitivity, what, confidence, prefer=float(meta["threshold"])
    )
    bound = {}
    if confidence is not None:
        bound = {
            "confidence": float(confidence),
            "positives": int(positive.sum()),
            "positives_needed": needed,
            "sensitivity_lower_bound": bound_at(positive, scores, threshold, confidence),
        }
    provenance = {
        "set": str(set_path.resolve()),
        "images": int(len(frame)),
        "patients": int(frame["patient_id"].nunique()),
        "per_class": counts,
        "method": method,
        **({"target_sensitivity": float(target_sensitivity)} if method == "sensitivity" else {}),
        **bound,
        "on_the_set": operating_point(positive, scores, threshold),
        "at_the_replaced_threshold": operating_point(positive, scores, float(meta["threshold"])),
        "model": str(model_spec),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    new_meta = json_safe(site_meta(meta, threshold, provenance))

    def write(folder: Path) -> None:
        model_file.write(model, folder)
        (folder / META_FILE).write_text(json.dumps(new_meta, indent=2) + "\n")
        carry_stats(model_spec, folder)
        if meta.get("ood") is not None and not new_meta.get("site_adaptation"):  # same network, same detector
            ood.save(meta["ood"], folder / ood.OOD_FILE)  # (an adapted copy's features moved: none)

    replace_dir(out_dir, write, by="calibrate", owned=True)
    return new_meta


def register(out_dir: Path, name: str, tracking_uri: str | None, experiment: str, by: str = "calibrate") -> str:
    """Log a calibrated or adapted model folder as a servable MLflow model registered as `name`
    (its site_calibration / site_adaptation and feature statistics beside it on the run); its URI."""
    import mlflow

    from covidxray.infra import tracking
    from covidxray.networks.model_file import load_model
    from covidxray.serving import pyfunc
    from covidxray.training.site_adaptation import SITE_STATS_FILE, STATS_FILE

    model, meta = load_model(out_dir)
    meta["ood"] = ood.load(out_dir / ood.OOD_FILE)  # served with the copy when it has one
    tracking.configure(tracking_uri, experiment)
    with mlflow.start_run(run_name=by, tags={"covidxray.stage": by, **tracking.process_tags()}):
        for key in ("site_calibration", "site_adaptation"):
            if meta.get(key):
                mlflow.log_dict(meta[key], f"{key}.json")
        for stats in (STATS_FILE, SITE_STATS_FILE):
            if (Path(out_dir) / stats).is_file():
                mlflow.log_artifact(str(Path(out_dir) / stats))
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
    parser.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="for --method sensitivity: the target must hold for the one-sided Clopper-Pearson lower bound "
        "at this confidence (default 0.95)",
    )
    parser.add_argument("--register", metavar="NAME", help="also log it to MLflow, registered as NAME")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or mlruns/)")
    args = parser.parse_args(argv)
    meta = calibrate(
        Path(args.path),
        args.model,
        Path(args.out),
        method=args.method,
        target_sensitivity=args.target_sensitivity,
        confidence=args.confidence,
        tracking_uri=args.tracking_uri,
    )
    cal = meta["site_calibration"]
    point = cal["on_the_set"]
    if cal.get("confidence") is not None:
        print(
            f"calibrate: sensitivity {cal['target_sensitivity']:g} at {cal['confidence']:g} confidence needs at "
            f"least {cal['positives_needed']} positive images; the set has {cal['positives']}: lower bound "
            f"{cal['sensitivity_lower_bound']:.3f} at the threshold"
        )
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
