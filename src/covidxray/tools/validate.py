"""`covidxray validate PATH --model M`: the test partition's figures on a labelled external set
(a hospital's own images), in a report folder of its own and an MLflow run tagged with the model's.

The set (a folder of class sub-folders, or a CSV), the report folder and the model path are checked
before TensorFlow loads. The measuring, figures, logging and installing are evaluation.publish's,
shared with the evaluate stage, so every set gets exactly the same report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from covidxray import CovidXrayError
from covidxray.evaluation.assess import AssessOptions, check_labels
from covidxray.evaluation.publish import LogTo, publish
from covidxray.evaluation.report import headline
from covidxray.infra.config import compose
from covidxray.infra.outputs import check_replaceable
from covidxray.networks.inference import describe_model, identity
from covidxray.serving.loading import check_model_path
from covidxray.settings.evaluate import validate_settings

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


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


def data_lines(set_path: Path, frame: pd.DataFrame, skipped: list[str]) -> list[str]:
    """The report's data section: images and patients per class, and the files skipped."""
    counts = frame.groupby("label").agg(images=("path", "size"), patients=("patient_id", "nunique"))
    lines = [
        f"External set `{set_path}`: {len(frame)} images, {frame.patient_id.nunique()} patients.",
        "",
        "| class | images | patients |",
        "|---|---|---|",
        *[f"| {c} | {r.images} | {r.patients} |" for c, r in counts.iterrows()],
        "",
    ]
    if skipped:
        shown = ", ".join(f"`{s}`" for s in skipped[:20]) + (" ..." if len(skipped) > 20 else "")
        lines += [f"**{len(skipped)} files could not be read and were skipped:** {shown}", ""]
    return lines


def validate(
    set_path: Path,
    model_spec: str,
    out_dir: Path,
    options: AssessOptions,
    *,
    tracking_uri: str | None = None,
    experiment: str = "covid-xray",
    log: bool = True,
) -> dict:
    """Assess the model on a labelled external set; write the report folder (replaced whole, only
    once complete, and only if absent, empty or an earlier validate report) and log an MLflow run
    tagged with the model's run. Returns the metrics. The set, the folder and a model path are
    checked before the model loads."""
    set_path, out_dir = Path(set_path), Path(out_dir)
    check_replaceable(out_dir, "validate")  # before any work: never replace a folder validate did not write
    frame = read_external(set_path)
    check_model_path(model_spec)
    from covidxray.serving.loading import load_after, load_images

    skipped = []

    def skip(path, message):
        if str(path) not in skipped:
            skipped.append(str(path))
            print(f"covidxray validate: warning: skipped: {message}", file=sys.stderr)

    def decode(meta):  # before the model loads where model.json can be read alone
        check_labels(frame["label"], meta["classes"])
        pixels, ok = load_images(frame["path"], meta, skip)
        if not ok:
            raise CovidXrayError(f"{set_path}: none of the images could be read")
        return pixels, frame.iloc[ok].reset_index(drop=True)

    # Keras, not model.tflite: the report draws Grad-CAM (and reuses a frozen backbone's stored
    # features), both of which need the Keras model, so TensorFlow loads here anyway.
    model, meta, (pixels, frame) = load_after(model_spec, tracking_uri, decode, engine="keras")
    name = out_dir.name
    model_yaml = "\n".join(f"{k}: {json.dumps(v)}" for k, v in meta.items() if k != "ood")
    o = options
    context = {
        "title": f"External validation: {name}",
        "set_name": f"external set {name}",
        "data_lines": data_lines(set_path, frame, skipped),
        "config_yaml": model_yaml + f"\nvalidate: {{bootstrap: {o.n_resamples}, ci: {o.ci}, seed: {o.seed}}}",
        "extra_metrics": {"n_skipped_files": len(skipped)},
    }
    frame = flag_ood(model, meta, pixels, frame, context["extra_metrics"])
    tags = {"covidxray.stage": "validate", "external_set": str(set_path), "model_uri": str(model_spec)}
    tags.update({tag: value for tag, value in identity(meta).items() if value})  # which model: name, version, run
    to = LogTo(tracking_uri, experiment, tags=tags, run_name=f"validate-{name}", artifact_path="validation")
    frame = frame.assign(path=frame["path"].astype(str))
    result = publish(
        model,
        meta,
        pixels,
        frame,
        out_dir,
        options=options,
        by="validate",
        partition="external",
        context=context,
        log=to if log else None,
        names=None,
        owned=True,
    )
    return {**result, "model": describe_model(meta)}


def flag_ood(model, meta: dict, pixels, frame: pd.DataFrame, figures: dict) -> pd.DataFrame:
    """The set's images scored for being out-of-distribution (networks/ood.py), when the model has a
    detector: ood_score and ood per row of `frame`, and the count and share flagged in `figures`
    (the figures themselves are over every image: the flag is reported, not a filter)."""
    from covidxray.networks import ood

    if meta.get("ood") is None:
        return frame
    scores, flagged = ood.flag(meta["ood"], model, pixels)
    figures.update(
        n_external_ood=int(sum(flagged)),
        external_ood_share=float(sum(flagged) / max(len(flagged), 1)),
        ood_threshold=float(meta["ood"].threshold),
    )
    return frame.assign(ood_score=scores, ood=flagged)


def validate_cli(argv: list[str]) -> int:
    """`covidxray validate PATH --model M [--out DIR]`: test-set figures on a labelled external set."""
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

    overrides = [f"evaluate.bootstrap={args.bootstrap}"] if args.bootstrap is not None else []
    st = validate_settings(compose(overrides + ([f"seed={args.seed}"] if args.seed is not None else [])))
    set_path = Path(args.path)
    name = set_path.stem if set_path.is_file() else set_path.resolve().name
    out = Path(args.out) if args.out else st.reports / "validation" / name
    result = validate(
        set_path,
        args.model,
        out,
        st.assess,
        tracking_uri=args.tracking_uri or st.tracking_uri,
        experiment=st.experiment,
    )
    if result.get("n_external_ood") is not None:
        print(f"validate: {result['n_external_ood']} images flagged out-of-distribution")
    print(
        f"validate: {result['n_external_images']} images ({result['n_external_patients']} patients): "
        f"{headline(result['external'])} ({result['model']}); wrote {out}"
        + (f"; MLflow run {result['mlflow_run_id']}" if result.get("mlflow_run_id") else "")
    )
    return 1 if result.get("n_skipped_files") else 0
