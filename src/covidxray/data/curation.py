"""Curation: decoding the listed images once and building the curated store's index.

Every file is decoded once to grayscale at the store size (models resize from there), with its
original geometry, format, sha256 and perceptual hash, which the audit and the deduplication use.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import pandas as pd

from covidxray import CovidXrayError
from covidxray.data import images

COLUMNS = [
    "image_id",
    "label",
    "y",
    "patient_id",
    "source",
    "file",
    "finding",
    "view",
    "sex",
    "age",
    "orig_width",
    "orig_height",
    "orig_format",
    "orig_mode",
    "sha256",
    "phash",
    "dup_group",
]


def assign_image_ids(records: pd.DataFrame) -> pd.Series:
    """`source-stem` per record; the whole file name where two files of a source share a stem; the
    path inside the collection (`rel`, / as _) where two also share a name (e.g. class folders)."""
    files = pd.Series(list(records["file"]))
    where = zip(records["source"], records["file"])
    stems, names = zip(*[(f"{s}-{Path(f).stem}", f"{s}-{Path(f).name}") for s, f in where]) if len(files) else ((), ())
    rels = records["rel"] if "rel" in records.columns else records["file"]
    paths = [f"{s}-{str(r).replace('/', '_')}" for s, r in zip(records["source"], rels)]
    per_stem, per_name = files.groupby(list(stems)).nunique(), files.groupby(list(names)).nunique()
    ids = [s if per_stem[s] == 1 else n if per_name[n] == 1 else p for s, n, p in zip(stems, names, paths)]
    return pd.Series(ids, index=records.index)


def _decode(file: str, size: int, policy: str) -> dict:
    """Worker: decode one file once; its resized pixels, geometry, sha256 and phash (or the error)."""
    import imagehash
    from PIL import Image

    try:
        gray, info = images.read_grayscale(Path(file))
    except CovidXrayError as err:
        return {"file": file, "error": str(err)}
    return {
        "file": file,
        "pixels": images.resize(gray, size, policy),
        "orig_width": info["width"],
        "orig_height": info["height"],
        "orig_format": info["format"],
        "orig_mode": info["mode"],
        "sha256": info["sha256"],
        "phash": str(imagehash.phash(Image.fromarray(gray))),
    }


def decode_files(files: list[str], size: int, policy: str, workers: int = 1) -> list[dict]:
    """Decode every file once, in `workers` processes, in order, with a progress bar on stderr."""
    from tqdm import tqdm

    bar = dict(total=len(files), desc="curate: decoding", unit="img", file=sys.stderr, disable=None)
    if workers <= 1 or len(files) < 2:
        return [_decode(f, size, policy) for f in tqdm(files, **bar)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(_decode, files, repeat(size), repeat(policy), chunksize=4), **bar))


def build_index(records: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """The index.csv table: contract columns, y from the class order, sorted by class then image_id."""
    df = records.copy()
    df["y"] = df["label"].map({c: i for i, c in enumerate(classes)}).astype(int)
    df["age"] = df["age"].astype(float)
    df = df.sort_values(["y", "image_id"], kind="stable").reset_index(drop=True)
    if df["image_id"].duplicated().any():
        raise CovidXrayError(f"duplicate image ids: {sorted(df.loc[df['image_id'].duplicated(), 'image_id'])[:5]}")
    return df[COLUMNS]


def decode_records(records: pd.DataFrame, size: int, policy: str) -> tuple[pd.DataFrame, dict, list[str]]:
    """Records of present files with image ids and file attributes, their pixels by file, and the
    missing files. An unreadable input is an error: inputs are pinned and verified."""
    present = records["file"].map(lambda f: Path(f).is_file())
    missing = sorted(set(records.loc[~present, "file"]))
    records = records[present].reset_index(drop=True)
    records["image_id"] = assign_image_ids(records)
    decoded = decode_files(sorted(set(records["file"])), size, policy, workers=min(os.cpu_count() or 1, 8))
    errors = [r["error"] for r in decoded if "error" in r]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise CovidXrayError(f"{errors[0]}{more}")
    decoded = {r["file"]: r for r in decoded}
    for col in ("orig_width", "orig_height", "orig_format", "orig_mode", "sha256", "phash"):
        records[col] = [decoded[f][col] for f in records["file"]]
    return records, {f: r["pixels"] for f, r in decoded.items()}, missing
