"""The out-of-distribution flag measured over whole collections: per collection of the curated data
(source/label, split into the test partition and the CV rows the detector was fitted on), the
curated probe set (the collections' other findings), Kermany's pneumonia X-rays (data/external:
chest X-rays of a class the model never saw), and per synthetic probe kind (uniform and Gaussian
noise, gradients, checkerboards, natural pictures from scikit-image), the share the trained model
flags out-of-distribution and the median OOD score (Mahalanobis distance; the detector's threshold
and false-alarm rate beside them).

Images go through what `covidxray predict` does with them: curated squares and synthetic probes
(made at the store size) through the model's input steps (images.prepare_for), files through
images.load_image; scores come from inference.predictions (its ood_score and ood columns), so the
benchmark follows however the model computes its OOD features.

    .venv/bin/python benchmarks/bench_ood.py                  # models/, data/curated, data/splits.csv
    .venv/bin/python benchmarks/bench_ood.py --model /elsewhere/models --data /elsewhere/data
    .venv/bin/python benchmarks/bench_ood.py --tiny           # an untrained smoke model on synthetic data
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, cpu_model

PROBE_KINDS = ("uniform_noise", "gaussian_noise", "gradient", "checkerboard", "natural")
NATURAL = ("camera", "astronaut", "coffee", "chelsea", "coins", "moon", "page", "text", "rocket", "brick", "grass")


def probe_images(kind: str, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n synthetic (size, size) uint8 squares of one probe kind; "natural": scikit-image's sample
    pictures (grayscale, stretched to the square), cycled, each one flipped or not at random."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = []
    for i in range(n):
        if kind == "uniform_noise":
            img = rng.uniform(0, 255, (size, size))
        elif kind == "gaussian_noise":
            img = rng.normal(rng.uniform(60, 190), rng.uniform(20, 60), (size, size))
        elif kind == "gradient":
            angle = rng.uniform(0, 2 * np.pi)
            ramp = np.cos(angle) * xx + np.sin(angle) * yy
            img = 255 * (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
        elif kind == "checkerboard":
            cell = int(rng.integers(2, max(3, size // 4)))
            img = 255.0 * (((np.arange(size)[:, None] // cell) + (np.arange(size)[None, :] // cell)) % 2)
        elif kind == "natural":
            img = natural_picture(NATURAL[i % len(NATURAL)], size)
            img = img[:, ::-1] if rng.random() < 0.5 else img
        else:
            raise ValueError(f"unknown probe kind {kind!r}")
        out.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
    return np.stack(out)


def natural_picture(name: str, size: int) -> np.ndarray:
    """One of scikit-image's sample pictures as a (size, size) grayscale square."""
    from PIL import Image
    from skimage import color, data

    picture = np.asarray(getattr(data, name)())
    if picture.ndim == 3:
        picture = color.rgb2gray(picture[..., :3]) * 255.0
    gray = Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8))
    return np.asarray(gray.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)


def curated_sets(curated: Path, splits: Path) -> dict[str, np.ndarray]:
    """The curated squares per collection and label, split into test and cv rows, and the probe
    set (the collections' other findings), as stored (not yet the model's inputs)."""
    from covidxray.data.images import load_curated, load_probe, load_splits, with_splits

    images, index, _ = load_curated(curated, mmap=True)
    index = with_splits(index, load_splits(splits), str(splits)).reset_index(drop=True)
    sets = {}
    for (source, label, part), rows in index.groupby(["source", "label", "partition"], sort=True):
        sets[f"{source}/{label}/{part}"] = np.asarray(images[rows.index.to_numpy()])
    probe, frame = load_probe(curated)
    for source, rows in frame.groupby("source") if "source" in frame and len(frame) else []:
        sets[f"{source}/other_findings (curated probe set)"] = np.asarray(probe[rows.index.to_numpy()])
    return sets


def file_inputs(folder: Path, meta: dict, limit: int | None) -> np.ndarray:
    """The model's inputs of the image files in `folder` (sorted; the first `limit`), as predict makes them."""
    from covidxray.data.images import load_image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:limit]
    spec = [meta["image_size"], meta.get("resize", "stretch"), meta.get("store_size")]
    spec += [meta.get("normalize", "none"), meta.get("crop_border", 0.0)]
    return np.stack([load_image(f, *spec) for f in files]) if files else np.zeros((0, 8, 8), np.uint8)


def measure(model, meta: dict, inputs: np.ndarray, batch: int = 256) -> dict:
    """Share flagged out-of-distribution, median OOD score and median p(covid) of model inputs."""
    from covidxray.networks.inference import predictions

    tables = [predictions(model, meta, inputs[i : i + batch]) for i in range(0, len(inputs), batch)]
    scores = np.concatenate([t["ood_score"].to_numpy(float) for t in tables])
    flagged = np.concatenate([t["ood"].to_numpy(bool) for t in tables])
    positive = f"p_{meta['classes'][-1]}"
    p = np.concatenate([t[positive].to_numpy(float) for t in tables])
    return {
        "n": int(len(inputs)),
        "flagged_share": round(float(flagged.mean()), 4),
        "median_score": round(float(np.median(scores)), 2),
        f"median_{positive}": round(float(np.median(p)), 4),
    }


def tiny_setup(work: Path, size: int = 64) -> dict[str, Path]:
    """An untrained smoke model with an OOD detector fitted on synthetic "X-rays" (smooth blobs
    on a vertical ramp), and a curated store and splits of them: what the full run reads."""
    import pandas as pd

    from covidxray.infra import quiet

    quiet.install()
    from covidxray.data.images import save_curated
    from covidxray.infra.config import compose
    from covidxray.networks import builders, model_file, ood
    from covidxray.settings.train import fit_settings

    rng = np.random.default_rng(0)
    n = 48
    yy = np.mgrid[0:size, 0:size][0] / size
    blobs = [np.kron(rng.normal(0, 25, (8, 8)), np.ones((size // 8, size // 8))) for _ in range(n)]
    x = np.stack([np.clip(60 + 120 * yy + b, 0, 255).astype(np.uint8) for b in blobs])
    labels = np.array(["normal", "covid"] * (n // 2))
    index = pd.DataFrame({"image_id": [f"s-{i}" for i in range(n)], "label": labels, "y": (labels == "covid") * 1})
    index = index.assign(patient_id=index.image_id, source=np.where(np.arange(n) < n // 2, "site_a", "site_b"))
    save_curated(work / "curated", x, index, ["normal", "covid"])
    fold = np.arange(n) % 4
    part = np.where(np.arange(n) % 6 == 0, "test", "cv")
    splits = index[["image_id", "patient_id", "label"]].assign(partition=part, fold=np.where(part == "cv", fold, -1))
    splits.to_csv(work / "splits.csv", index=False)

    fit = fit_settings(compose(["experiment=smoke"]))
    model = builders.build_model(fit.model.as_config(), size, 2)
    folder = work / "models"
    folder.mkdir()
    model_file.write(model, folder)
    meta = {"classes": ["normal", "covid"], "image_size": size, "threshold": 0.5, "model": "smoke"}
    (folder / model_file.META_FILE).write_text(json.dumps(meta))
    cv = part == "cv"
    ood.save(ood.fit(ood.features(model, x[cv]), fold[cv], range(4), 0.05), folder / ood.OOD_FILE)
    return {"model": folder, "curated": work / "curated", "splits": work / "splits.csv"}


def run(model_dir: Path, curated: Path, splits: Path, external: Path, n_probe: int, limit: int | None) -> dict:
    from covidxray.data.images import prepare_for
    from covidxray.serving.loading import resolve_model

    model, meta = resolve_model(str(model_dir))
    if meta.get("ood") is None:
        raise SystemExit(f"{model_dir}: no ood.npz beside the model (trained before the OOD flag)")
    store_size = int(meta.get("store_size") or meta["image_size"])
    rng = np.random.default_rng(0)
    results, started = {}, time.perf_counter()
    for name, squares in curated_sets(curated, splits).items():
        results[name] = measure(model, meta, prepare_for(meta, squares[:limit]))
    pneumonia = external / "chest_xray" / "PNEUMONIA"
    if pneumonia.is_dir():
        results["kermany/pneumonia (external files, a class never trained on)"] = measure(
            model, meta, file_inputs(pneumonia, meta, limit)
        )
    for kind in PROBE_KINDS:
        results[f"probe/{kind}"] = measure(model, meta, prepare_for(meta, probe_images(kind, n_probe, store_size, rng)))
    detector = meta["ood"]
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "model": str(model_dir),
        "engine": type(model).__name__,
        "ood_threshold": round(float(detector.threshold), 2),
        "ood_false_alarm_rate": float(detector.rate),
        "seconds": round(time.perf_counter() - started, 1),
        "collections": results,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models"), help="a trained model folder (with ood.npz)")
    parser.add_argument("--data", default=str(REPO / "data"), help="folder of curated/, splits.csv, external/")
    parser.add_argument("--probes", type=int, default=100, help="images per synthetic probe kind")
    parser.add_argument("--limit", type=int, help="at most this many images per collection (default: all)")
    parser.add_argument("--tiny", action="store_true", help="an untrained smoke model on synthetic data (a smoke test)")
    args = parser.parse_args(argv)
    data = Path(args.data)
    with tempfile.TemporaryDirectory(prefix="bench-ood-") as tmp:
        if args.tiny:
            found = tiny_setup(Path(tmp))
            report = run(found["model"], found["curated"], found["splits"], Path(tmp) / "external", 4, None)
        else:
            report = run(
                Path(args.model), data / "curated", data / "splits.csv", data / "external", args.probes, args.limit
            )
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
