"""`covidxray adapt FOLDER --model M --out DIR`: a model adapted to a site from its unlabeled X-rays.

A hospital has many unlabeled images and few labelled ones. This tool reads a folder of the site's
X-rays (any layout: every image file under it, no labels), computes the mean and std of their
pooled features (what the head reads) and writes a model folder whose head reads them aligned to
the training images' statistics (training/site_adaptation.py: test-time feature alignment in the
spirit of AdaBN). The folder holds model.keras (the alignment folded into the head), model.json
(`site_adaptation`: the folder, images, when, from which model), the training statistics and the
site's (feature_stats.npy, site_feature_stats.npy), installed together. predict, validate, the
served model (`--register NAME`) and `covidxray calibrate` read it like any model folder.

Order: adapt, then calibrate (a threshold is chosen on the adapted scores); a calibrated or an
already adapted model is refused. The model must be a folder or file from `dvc repro train` (with
feature_stats.npy beside it). An empty folder, fewer than MIN_IMAGES readable images, or a model
without training statistics: one line, before the model loads where it can be, nothing written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from covidxray import CovidXrayError
from covidxray.infra.outputs import check_replaceable, json_safe, read_json, replace_dir
from covidxray.networks.model_file import META_FILE, MODEL_FILE
from covidxray.serving.loading import check_model_path, is_model_uri
from covidxray.tools.validate import IMAGE_SUFFIXES
from covidxray.training import site_adaptation as sa

MIN_IMAGES = 10  # fewer cannot estimate a mean and std per feature worth aligning to


def site_images(folder: Path) -> list[Path]:
    """Every image file under `folder` (by suffix, hidden files left out), sorted; a one-line
    error for a missing folder or one without images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CovidXrayError(f"unlabeled site folder not found: {folder}")
    found = sorted(
        f
        for f in folder.rglob("*")
        if f.is_file()
        and f.suffix.lower() in IMAGE_SUFFIXES
        and not any(p.startswith(".") for p in f.relative_to(folder).parts)
    )
    if len(found) < MIN_IMAGES:
        raise CovidXrayError(
            f"{folder}: {len(found)} image file(s) ({', '.join(sorted(IMAGE_SUFFIXES))}); at least {MIN_IMAGES} "
            "unlabeled images of the site are needed to adapt"
        )
    return found


def model_folder(model_spec: str) -> Path:
    """The folder of a path model that can be adapted: its training feature statistics present,
    neither adapted nor calibrated yet (checked on model.json, before the model loads)."""
    if is_model_uri(model_spec):
        raise CovidXrayError(
            f"--model {model_spec}: adapt needs a model folder or file with its {sa.STATS_FILE} "
            "(models/model.keras, or a folder `covidxray adapt` did not write), not an MLflow URI"
        )
    check_model_path(model_spec)
    folder = Path(model_spec) if Path(model_spec).is_dir() else Path(model_spec).parent
    meta = read_json(folder / META_FILE)
    for key, why in (
        ("site_adaptation", "is already adapted to a site: adapt the model it came from"),
        ("site_calibration", "is site-calibrated: adapt first, then calibrate the adapted model"),
    ):
        if isinstance(meta, dict) and meta.get(key):
            raise CovidXrayError(f"--model {model_spec} {why}")
    if not (folder / sa.STATS_FILE).is_file():
        raise CovidXrayError(
            f"--model {model_spec}: no training feature statistics ({folder / sa.STATS_FILE}): a model trained "
            "before site adaptation existed; train it again (`dvc repro train`)"
        )
    return folder


def adapted_meta(meta: dict, provenance: dict) -> dict:
    """The model's metadata with the site adaptation's provenance. The registered name, version
    and run of the model it adapts stay, as calibrate's do: predict and validate report them,
    marked site-adapted (inference.identity)."""
    out = {k: v for k, v in meta.items() if k != "model_uri"}  # the folder is not that URI
    return {**out, "site_adaptation": provenance}


def adapt(folder: Path, model_spec: str, out_dir: Path) -> dict:
    """Align the model to the site's unlabeled images in `folder`; write out_dir (model.keras,
    model.json, feature_stats.npy, site_feature_stats.npy) together. Returns the new metadata."""
    folder, out_dir = Path(folder), Path(out_dir)
    check_replaceable(out_dir, "adapt")
    paths = site_images(folder)
    source = model_folder(model_spec)
    train = sa.read_stats(source / sa.STATS_FILE, "training feature statistics")
    from covidxray.networks import builders, model_file
    from covidxray.serving.loading import load_images

    model, meta = model_file.load_model(source, engine="keras")  # its layers are refolded, not run by LiteRT
    skipped = []

    def skip(path, message):
        skipped.append(str(path))
        print(f"covidxray adapt: warning: skipped: {message}", file=sys.stderr)

    pixels, ok = load_images(paths, meta, skip)
    if len(ok) < MIN_IMAGES:
        raise CovidXrayError(f"{folder}: {len(ok)} readable image(s); at least {MIN_IMAGES} are needed to adapt")
    site = sa.feature_stats(builders.pooled_features(model, pixels))
    sa.adapt_model(model, train, site)  # checks the two statistics' shapes first
    scale, _ = sa.alignment(train, site)
    provenance = {
        "method": "feature alignment: the site's pooled features standardized to the training images' mean and "
        "std per feature (AdaBN-style), folded into head_dense",
        "folder": str(folder.resolve()),
        "images": len(ok),
        "skipped": len(skipped),
        "features": int(train.shape[1]),
        "median_scale": float(sorted(scale)[len(scale) // 2]),
        "files": [sa.STATS_FILE, sa.SITE_STATS_FILE],
        "model": str(model_spec),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    new_meta = json_safe(adapted_meta(meta, provenance))

    def write(work: Path) -> None:
        model_file.save(model, work / MODEL_FILE)
        (work / META_FILE).write_text(json.dumps(new_meta, indent=2) + "\n")
        sa.write_stats(work / sa.STATS_FILE, train)
        sa.write_stats(work / sa.SITE_STATS_FILE, site)

    replace_dir(out_dir, write, by="adapt", owned=True)
    return new_meta


def adapt_cli(argv: list[str]) -> int:
    """`covidxray adapt FOLDER --model M --out DIR`: a model aligned to a site's unlabeled X-rays."""
    parser = argparse.ArgumentParser(prog="covidxray adapt", description=adapt_cli.__doc__)
    parser.add_argument("folder", help="the site's unlabeled X-rays: every image file under this folder")
    parser.add_argument("--model", default="models/model.keras", help="a model file or folder from the train stage")
    parser.add_argument("--out", required=True, help="the adapted model folder to write (new or empty)")
    parser.add_argument("--register", metavar="NAME", help="also log it to MLflow, registered as NAME")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or mlruns/)")
    args = parser.parse_args(argv)
    meta = adapt(Path(args.folder), args.model, Path(args.out))
    found = meta["site_adaptation"]
    print(
        f"adapt: {found['images']} unlabeled images ({found['skipped']} skipped); {found['features']} pooled "
        f"features aligned to the training images' (median scale {found['median_scale']:.3f}); wrote {args.out}"
    )
    if args.register:
        from covidxray.infra.config import compose
        from covidxray.tools.calibrate import register

        cfg = compose()
        uri = register(
            Path(args.out), args.register, args.tracking_uri or cfg.mlflow.tracking_uri, cfg.mlflow.experiment, "adapt"
        )
        print(f"adapt: registered {uri}")
    return 0
