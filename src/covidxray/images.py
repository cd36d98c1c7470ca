"""Images: decode any X-ray file to grayscale at a fixed size, and the curated image store.

The curated store (data/curated/) is what every later stage reads:
- images.npy   uint8 array (N, S, S): grayscale images, row i belongs to row i of index.csv
- index.csv    one row per image: image_id, label, y, patient_id, source, ... (see curate.py)
- classes.json the class names in the order of `y` (the positive class, covid, is last)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from covidxray import CovidXrayError

IMAGES_FILE = "images.npy"
INDEX_FILE = "index.csv"
CLASSES_FILE = "classes.json"


def save_curated(out_dir: Path, images: np.ndarray, index: pd.DataFrame, classes: list[str]) -> None:
    """Write the curated store; `index` row i describes `images[i]`."""
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) != len(index):
        raise ValueError("images must be uint8 (N, S, S) with one index row per image")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / IMAGES_FILE, images)
    index.to_csv(out_dir / INDEX_FILE, index=False)
    (out_dir / CLASSES_FILE).write_text(json.dumps(classes) + "\n")


def load_curated(curated_dir: Path, mmap: bool = False) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """Read the curated store: images (N, S, S) uint8, the index, and the class names."""
    curated_dir = Path(curated_dir)
    for name in (IMAGES_FILE, INDEX_FILE, CLASSES_FILE):
        if not (curated_dir / name).is_file():
            raise CovidXrayError(f"curated data missing: {curated_dir / name} (run `dvc repro curate`)")
    images = np.load(curated_dir / IMAGES_FILE, mmap_mode="r" if mmap else None)
    index = pd.read_csv(curated_dir / INDEX_FILE, dtype={"patient_id": str, "image_id": str})
    classes = json.loads((curated_dir / CLASSES_FILE).read_text())
    if len(images) != len(index):
        raise CovidXrayError(f"{curated_dir}: {len(images)} images but {len(index)} index rows")
    return images, index, classes
