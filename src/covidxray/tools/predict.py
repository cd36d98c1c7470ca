"""`covidxray predict` (images in the wild) and `covidxray validate` (a labelled external set).

Both load a model from a path (models/model.keras or its folder, model.json beside it) or an
MLflow model URI (models:/covid-xray-detector/<version>, runs:/<run>/<path>), decode every image
with the training pipeline's own preprocessing (images.load_image at the model's image size and
resize policy), and call covid at the threshold saved with the model. validate measures with
report.assess, so an external set gets exactly the test partition's figures and model card.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray import CovidXrayError
from covidxray.modeling import models
from covidxray.evaluation import report as R
from covidxray.modeling.inference import predictions
from covidxray.infra.outputs import check_replaceable, replace_dir

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
URI = re.compile(r"^(models|runs):/")


# -- the model --------------------------------------------------------------------------------------


def resolve_model(spec: str, tracking_uri: str | None = None):
    """(keras model, metadata) from a path or an MLflow model URI."""
    if URI.match(str(spec)):
        return load_mlflow_model(str(spec), tracking_uri)
    return models.load_model(Path(spec))


def load_mlflow_model(uri: str, tracking_uri: str | None = None):
    """Download an MLflow-logged model into a temporary folder (removed afterwards), load its
    .keras file and read its metadata (threshold, classes, image_size, resize) from the MLmodel
    metadata, else from a model.json logged with it or on its run."""
    import mlflow

    from covidxray.infra import tracking

    store = tracking.tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    with tempfile.TemporaryDirectory(prefix="covidxray-model-") as local:
        info, path = _download_model(uri, store, Path(local))
        meta = _mlflow_meta(info, path, Path(local) / "run")
        meta.setdefault("mlflow_run_id", info.run_id)
        meta["model_uri"] = uri
        meta = models.check_meta(meta, uri)
        files = sorted(path.rglob("*.keras"))
        if not files:
            raise CovidXrayError(f"MLflow model {uri} holds no .keras file")
        return models.load(files[0]), meta


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
    found = sorted(path.rglob(models.META_FILE))
    if found:
        return {**json.loads(found[0].read_text()), **meta}
    if info.run_id and any(meta.get(k) is None for k in ("classes", "image_size", "threshold")):
        try:
            run_meta = mlflow.artifacts.download_artifacts(
                run_id=info.run_id, artifact_path=models.META_FILE, dst_path=str(run_dir)
            )
            meta = {**json.loads(Path(run_meta).read_text()), **meta}
        except (MlflowException, OSError):
            pass
    return meta


# -- predict ----------------------------------------------------------------------------------------


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


def overlay_names(paths) -> list[str]:
    """One distinct PNG name per input (stem_gradcam.png, numbered when stems repeat)."""
    names, seen = [], {}
    for p in paths:
        stem = Path(p).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}_gradcam.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}_gradcam.png")
    return names


def predict_table(model, meta: dict, pixels: np.ndarray, paths) -> pd.DataFrame:
    """Per image: path, p_<class> for every class, the predicted label at the saved threshold
    (what the served MLflow model answers, without its threshold column)."""
    table = predictions(model, meta, pixels).drop(columns="threshold")
    table.insert(0, "path", [str(p) for p in paths])
    return table


def predict_cli(argv: list[str]) -> int:
    """`covidxray predict IMAGE... --model M`: p(covid) and the label at the saved threshold."""
    parser = argparse.ArgumentParser(
        prog="covidxray predict",
        description=predict_cli.__doc__,
        epilog="Exit status 1 if any file could not be read (the others are still predicted).",
    )
    parser.add_argument("images", nargs="+", help="JPEG/PNG/... files (any size, RGB, RGBA, 16-bit)")
    parser.add_argument(
        "--model",
        default="models/model.keras",
        help="models/model.keras, its folder, or models:/NAME/VERSION | runs:/RUN/PATH",
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow store for model URIs (default: $MLFLOW_TRACKING_URI or the local mlruns/ store)"
    )
    parser.add_argument("--gradcam", metavar="DIR", help="write a Grad-CAM overlay PNG per image here")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    form.add_argument("--csv", action="store_true", help="CSV instead of an aligned table")
    args = parser.parse_args(argv)

    model, meta = resolve_model(args.model, args.tracking_uri)
    failed = []

    def report(path, message):
        failed.append(path)
        print(f"covidxray predict: error: {message}", file=sys.stderr)

    pixels, ok = load_images(args.images, meta, report)
    paths = [args.images[i] for i in ok]
    table = predict_table(model, meta, pixels, paths)
    if args.gradcam and len(paths):
        from covidxray.evaluation import gradcam

        cams = gradcam.gradcam(model, pixels, class_index=-1)
        out = Path(args.gradcam)
        files = [gradcam.save_overlay(pixels[i], cams[i], out / name) for i, name in enumerate(overlay_names(paths))]
        table["gradcam"] = [str(f) for f in files]
    covid = f"p_{meta['classes'][-1]}"
    if args.json:
        for row in table.to_dict(orient="records"):
            print(json.dumps({**row, "threshold": meta["threshold"]}))
    elif args.csv:
        table.to_csv(sys.stdout, index=False, float_format="%.4f")
    elif len(table):
        shown = table[["path", covid, "label"] + (["gradcam"] if "gradcam" in table else [])].copy()
        shown[covid] = shown[covid].map(lambda v: f"{v:.4f}")
        print(shown.to_string(index=False))
        print(f"(label: {meta['classes'][-1]} iff {covid} >= threshold {meta['threshold']:.4f})")
    return 1 if failed else 0


# -- validate ---------------------------------------------------------------------------------------


def read_external(path: Path) -> pd.DataFrame:
    """The labelled set as rows of path, label, patient_id, image_id: a folder with one sub-folder
    per class, or a CSV with path, label[, patient_id] (paths relative to the CSV)."""
    path = Path(path)
    if path.is_dir():
        rows = [
            {"path": f, "label": sub.name, "image_id": f.relative_to(path).as_posix()}
            for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            for f in sorted(sub.rglob("*"))
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        ]
        frame = pd.DataFrame(rows, columns=["path", "label", "image_id"])
        if frame.empty:
            raise CovidXrayError(f"{path}: no images in class sub-folders (expected {path}/<class>/<image>)")
    elif path.is_file():
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
            raise CovidXrayError(f"{path}: not a readable CSV ({' '.join(str(err).split())[:200]})") from None
        missing = {"path", "label"} - set(table.columns)
        if missing:
            raise CovidXrayError(f"{path}: CSV needs columns path and label (missing: {', '.join(sorted(missing))})")
        if table.empty:
            raise CovidXrayError(f"{path}: the CSV lists no images")
        blank = table["label"].str.strip() == ""
        if blank.any():
            raise CovidXrayError(
                f"{path}: {int(blank.sum())} rows without a label (first: {table.loc[blank, 'path'].iloc[0]})"
            )
        frame = pd.DataFrame(
            {
                "path": [(path.parent / p) for p in table["path"]],
                "label": table["label"].str.strip(),
                "image_id": table["path"].to_numpy(),
            }
        )
        if "patient_id" in table.columns:
            frame["patient_id"] = table["patient_id"].to_numpy()
    else:
        raise CovidXrayError(f"external set not found: {path} (a folder of class sub-folders, or a CSV)")
    if "patient_id" not in frame.columns:
        frame["patient_id"] = frame["image_id"]
    frame["patient_id"] = (
        frame["patient_id"].where(frame["patient_id"].astype(str).str.strip() != "", frame["image_id"]).astype(str)
    )
    return frame.reset_index(drop=True)


def check_labels(labels, classes: list[str]) -> None:
    """Labels the model does not know are an error that lists the known ones."""
    unknown = sorted(set(map(str, labels)) - set(classes))
    if unknown:
        raise CovidXrayError(f"labels unknown to the model: {', '.join(unknown)} (known: {', '.join(classes)})")


def validate(
    set_path: Path,
    model_spec: str,
    out_dir: Path,
    *,
    tracking_uri=None,
    experiment="covid-xray",
    n_resamples=1000,
    ci=0.95,
    seed=42,
    per_group=3,
    n_bins=10,
    log=True,
) -> dict:
    """Assess the model on a labelled external set; write the report folder (replaced whole, only
    once complete, and only if absent, empty or an earlier validate report) and log an MLflow run
    tagged with the model's run. Returns the metrics."""
    set_path, out_dir = Path(set_path), Path(out_dir)
    check_replaceable(out_dir, "validate")  # before any work: never replace a folder validate did not write
    model, meta = resolve_model(model_spec, tracking_uri)
    frame = read_external(set_path)
    check_labels(frame["label"], meta["classes"])
    skipped = []

    def skip(path, message):
        skipped.append(str(path))
        print(f"covidxray validate: warning: skipped: {message}", file=sys.stderr)

    pixels, ok = load_images(frame["path"], meta, skip)
    frame = frame.iloc[ok].reset_index(drop=True)
    if frame.empty:
        raise CovidXrayError(f"{set_path}: none of the images could be read")
    name = out_dir.name
    counts = frame.groupby("label").agg(images=("path", "size"), patients=("patient_id", "nunique"))
    data_lines = [
        f"External set `{set_path}`: {len(frame)} images, {frame.patient_id.nunique()} patients.",
        "",
        "| class | images | patients |",
        "|---|---|---|",
        *[f"| {c} | {r.images} | {r.patients} |" for c, r in counts.iterrows()],
        "",
    ]
    if skipped:
        data_lines += [
            f"**{len(skipped)} files could not be read and were skipped:** "
            + ", ".join(f"`{s}`" for s in skipped[:20])
            + (" ..." if len(skipped) > 20 else ""),
            "",
        ]
    model_yaml = "\n".join(f"{k}: {json.dumps(v)}" for k, v in meta.items())
    context = {
        "title": f"External validation: {name}",
        "data_lines": data_lines,
        "config_yaml": model_yaml + f"\nvalidate: {{bootstrap: {n_resamples}, ci: {ci}, seed: {seed}}}",
        "extra_metrics": {"n_skipped_files": len(skipped)},
    }

    def write(folder: Path) -> dict:
        result = R.assess(
            model,
            meta,
            pixels,
            frame.assign(path=frame["path"].astype(str)),
            folder,
            n_resamples=n_resamples,
            ci=ci,
            seed=seed,
            per_group=per_group,
            n_bins=n_bins,
            partition="external",
            context=context,
        )
        if log:
            tags = {"covidxray.stage": "validate", "external_set": str(set_path), "model_uri": str(model_spec)}
            if meta.get("mlflow_run_id"):
                tags["model_run_id"] = str(meta["mlflow_run_id"])
            result["mlflow_run_id"] = R.log_to_mlflow(
                folder,
                result,
                tracking_uri,
                experiment,
                run_id=None,
                tags=tags,
                run_name=f"validate-{name}",
                artifact_path="validation",
            )
        return result

    result = replace_dir(out_dir, write, by="validate", owned=True)
    return result


def validate_cli(argv: list[str]) -> int:
    """`covidxray validate PATH --model M [--out DIR]`: test-set figures on a labelled external set."""
    from covidxray.infra.config import compose

    parser = argparse.ArgumentParser(prog="covidxray validate", description=validate_cli.__doc__)
    parser.add_argument(
        "path",
        help="a folder with one sub-folder per class, or a CSV with path, label"
        "[, patient_id] (paths relative to the CSV)",
    )
    parser.add_argument(
        "--model",
        default="models/model.keras",
        help="models/model.keras, its folder, or models:/NAME/VERSION | runs:/RUN/PATH",
    )
    parser.add_argument("--out", help="report folder (default: <paths.reports>/validation/<name of PATH>)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or mlruns/)")
    parser.add_argument("--bootstrap", type=int, help="patient resamples (default: evaluate.bootstrap)")
    parser.add_argument("--seed", type=int, help="default: seed of the config")
    args = parser.parse_args(argv)

    cfg = compose()
    set_path = Path(args.path)
    name = set_path.stem if set_path.is_file() else set_path.resolve().name
    out = Path(args.out) if args.out else Path(cfg.paths.reports) / "validation" / name
    result = validate(
        set_path,
        args.model,
        out,
        tracking_uri=args.tracking_uri or cfg.mlflow.tracking_uri,
        experiment=cfg.mlflow.experiment,
        n_resamples=args.bootstrap or cfg.evaluate.bootstrap,
        ci=cfg.evaluate.ci,
        seed=cfg.seed if args.seed is None else args.seed,
        per_group=cfg.evaluate.gradcam_per_group,
        n_bins=cfg.evaluate.get("calibration_bins", 10),
    )
    m = result["external"]
    print(
        f"validate: {result['n_external_images']} images ({result['n_external_patients']} patients): "
        f"AUC {R.fmt(m['auc'])} [{R.fmt(m['auc_ci_low'])}, {R.fmt(m['auc_ci_high'])}], "
        f"sensitivity {R.fmt(m['sensitivity'])}, specificity {R.fmt(m['specificity'])}; wrote {out}"
        + (f"; MLflow run {result['mlflow_run_id']}" if result.get("mlflow_run_id") else "")
    )
    return 1 if result.get("n_skipped_files") else 0
