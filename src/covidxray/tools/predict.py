"""`covidxray predict IMAGE... --model M`: p(covid) and the label at the saved threshold, for
images as found in the wild.

The model comes from a path or an MLflow model URI (serving.loading), run by LiteRT where it has a
model.tflite (no TensorFlow start-up), by Keras for --gradcam or without one; every image is decoded with
the training pipeline's own input steps, as the served model does (inference.predictions). The
files and the model path are checked before TensorFlow loads, so a typo costs a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray.networks.inference import describe_model
from covidxray.serving.loading import check_model_path, missing_files


class NoImages(Exception):
    """None of the files could be read (each already reported)."""


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
    from covidxray.networks.inference import predictions

    table = predictions(model, meta, pixels).drop(columns="threshold")
    table.insert(0, "path", [str(p) for p in paths])
    return table


def write_gradcams(model, meta: dict, pixels: np.ndarray, table: pd.DataFrame, out: Path) -> list[str]:
    """A Grad-CAM figure per image in out/: the overlay titled with the file, its score, the
    threshold and the label called, with a colour bar. Returns the files' paths."""
    from covidxray.evaluation import gradcam
    from covidxray.evaluation.figures import gradcam_single

    cams = gradcam.gradcam(model, pixels, class_index=-1)
    positive = meta["classes"][-1]
    score = f"p({positive})"
    files = []
    for i, name in enumerate(overlay_names(table["path"])):
        row = table.iloc[i]
        title = (
            f"{Path(row['path']).name}\n{score} = {row[f'p_{positive}']:.3f} "
            f"(threshold {meta['threshold']:.3f}): {row['label']}"
        )
        files.append(str(gradcam_single(pixels[i], cams[i], title, score, out / name)))
    return files


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
    check_model_path(args.model)  # the cheap checks first: no TensorFlow for a wrong path
    failed = missing_files(args.images)
    for message in failed:
        print(f"covidxray predict: error: {message}", file=sys.stderr)
    present = [p for p in args.images if Path(p).is_file()]
    if not present:
        return 1
    from covidxray.serving.loading import load_after, load_images

    def report(path, message):
        if path not in failed:
            failed.append(path)
            print(f"covidxray predict: error: {message}", file=sys.stderr)

    def decode(meta):
        pixels, ok = load_images(present, meta, report)
        if not ok:
            raise NoImages
        return pixels, ok

    try:
        model, meta, (pixels, ok) = load_after(
            args.model, args.tracking_uri, decode, engine="keras" if args.gradcam else "auto"
        )
    except NoImages:  # every file failed its checks: no model loaded for nothing
        return 1
    paths = [present[i] for i in ok]
    table = predict_table(model, meta, pixels, paths)
    covid = f"p_{meta['classes'][-1]}"
    if args.gradcam and len(paths):
        table["gradcam"] = write_gradcams(model, meta, pixels, table, Path(args.gradcam))
    if args.json:
        for row in table.to_dict(orient="records"):
            print(json.dumps({**row, "threshold": meta["threshold"]}))
    elif args.csv:
        table.to_csv(sys.stdout, index=False, float_format="%.4f")
    elif len(table):
        scored = meta.get("ood") is not None  # models from before the flag have no ood_score
        shown = table[["path", covid, "label"] + ["ood_score"] * scored + ["gradcam"] * ("gradcam" in table)].copy()
        shown[covid] = shown[covid].map(lambda v: f"{v:.4f}")
        if scored:
            shown["ood_score"] = shown["ood_score"].map(lambda v: f"{v:.1f}")
        print(shown.to_string(index=False))
        print(
            f"(label: {meta['classes'][-1]} iff {covid} >= threshold {meta['threshold']:.4f}; {describe_model(meta)})"
        )
        if scored:
            print(f"(out-of-distribution iff ood_score > {meta['ood'].threshold:.1f}: unlike the training X-rays)")
    return 1 if failed else 0
