"""Images: decode any X-ray file to grayscale at a fixed size, and the curated image store.

Decoding (`read_grayscale`, `resize`, `load_image`) is shared by the curate stage and by
`covidxray predict` on images in the wild, so every failure is a one-line CovidXrayError.

The curated store (data/curated/) is what every later stage reads:
- images.npy   uint8 array (N, S, S): grayscale images, row i belongs to row i of index.csv
- index.csv    one row per image: image_id, label, y, patient_id, source, ... (see curation.py)
- classes.json the class names in the order of `y` (the positive class, covid, is last)
- probe.npy, probe.csv  images of no class of the task (the collection's other findings), same layout
and the split stage's data/splits.csv (image_id, patient_id, label, partition, fold), which
`with_splits` joins onto the index for the stages that read one partition.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from covidxray import CovidXrayError
from covidxray.infra.outputs import read_json

IMAGES_FILE = "images.npy"
INDEX_FILE = "index.csv"
CLASSES_FILE = "classes.json"
PROBE_IMAGES_FILE, PROBE_INDEX_FILE = "probe.npy", "probe.csv"  # the collection's other findings
RESIZE_POLICIES = ("stretch", "pad", "crop")
NORMALIZE = ("none", "equalize", "clahe")
MAX_CROP_BORDER = 0.3
# What a chest X-ray can be, at the least. Refused below these, as no X-ray of the data comes near
# them (measured over the mirror and data/external, 3,343 images: smallest side 156 px, smallest
# 1st-99th percentile spread 54 grey levels), while a thumbnail, an icon or a blank page does.
MIN_SIDE = 32  # px, the smaller side; also the smallest input of the models
MIN_SPREAD = 16  # grey levels (of 255) between the 1st and 99th percentile of the pixels


def check_resize_policy(policy: str) -> None:
    """Reject an unknown resize policy, naming the key and the allowed values."""
    if policy not in RESIZE_POLICIES:
        raise CovidXrayError(f"data.resize must be one of {', '.join(RESIZE_POLICIES)}, got {policy!r}")


def to_grayscale(img: Image.Image) -> np.ndarray:
    """A decoded PIL image as a 2-D uint8 array, whatever its mode.

    Colour is reduced to luma (ITU-R 601, PIL's "L"); alpha is composited onto black (transparent
    means no signal). Data deeper than 8 bits (I;16*, I, F) is scaled linearly from its actual
    min..max to 0..255, because X-ray PNGs often fill only 10-12 of their 16 bits: a fixed
    65535 -> 255 scale would turn them nearly black. A constant image becomes all zeros.
    """
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode.startswith("I") or mode == "F":
        data = np.asarray(img).astype(np.float64)
        lo, hi = float(data.min()), float(data.max())
        if hi <= lo:
            return np.zeros(data.shape, dtype=np.uint8)
        return np.rint((data - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def read_grayscale(path: Path) -> tuple[np.ndarray, dict]:
    """Read and decode an image file once: its 8-bit grayscale pixels and what it was.

    The EXIF orientation is applied (as viewers do). info: width, height (as displayed),
    format (JPEG, PNG, ...), mode (PIL mode of the file) and sha256 (of the file's bytes).
    A missing, non-image or corrupt file, or one too small or flat to be an X-ray (`check_xray`),
    raises CovidXrayError naming it.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CovidXrayError(f"image not found: {path}") from None
    except OSError as err:
        raise CovidXrayError(f"cannot read image {path}: {err.strerror or err}") from None
    return decode_grayscale(data, str(path))


def decode_grayscale(data: bytes, source: str = "image") -> tuple[np.ndarray, dict]:
    """`read_grayscale` for an encoded image already in memory (e.g. posted to the scoring
    server); `source` names it in errors."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format, img.mode
            img.load()
            img = ImageOps.exif_transpose(img)
            gray = to_grayscale(img)
    except UnidentifiedImageError:
        raise CovidXrayError(f"not an image file (or a format Pillow cannot decode): {source}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise CovidXrayError(f"corrupt or unreadable image {source}: {reason}") from None
    if gray.ndim != 2 or gray.size == 0:
        raise CovidXrayError(f"not a 2-D image: {source} (shape {gray.shape})")
    check_xray(gray, source)
    info = {
        "width": int(gray.shape[1]),
        "height": int(gray.shape[0]),
        "format": fmt or "unknown",
        "mode": mode,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return gray, info


def check_xray(gray: np.ndarray, path) -> None:
    """Refuse decoded pixels too small or too flat (near-constant) to be a chest X-ray, naming the
    file and the limit: a model would still answer on them, with a confidence that means nothing."""
    height, width = gray.shape
    if min(height, width) < MIN_SIDE:
        raise CovidXrayError(
            f"too small for a chest X-ray: {path} is {width}x{height} px "
            f"(the smaller side must be at least {MIN_SIDE} px)"
        )
    step = max(1, int(np.sqrt(gray.size / 2**16)))  # percentiles of a regular sample of ~65k pixels
    sample = gray[::step, ::step]
    cumulative = np.cumsum(np.bincount(sample.ravel(), minlength=256))
    low, high = np.searchsorted(cumulative, [0.01 * sample.size, 0.99 * sample.size])
    if high - low < MIN_SPREAD:
        raise CovidXrayError(
            f"too flat for a chest X-ray: {path} has 98% of its pixels within {high - low} "
            f"grey levels (at least {MIN_SPREAD} of 255 needed between the 1st and 99th percentile)"
        )


def _scale(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resample to width x height: area averaging when shrinking (cv2 INTER_AREA), bilinear when enlarging."""
    if (width, height) == img.size:
        return img
    shrinking = width * height < img.width * img.height
    return img.resize((width, height), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)


def resize(gray: np.ndarray, size: int, policy: str = "stretch") -> np.ndarray:
    """A 2-D uint8 image as a (size, size) uint8 square.

    stretch: plain resize, aspect ratio not kept (the tutorial's cv2.resize);
    pad: keep the aspect ratio, fit the longer side, centre on black (letterbox);
    crop: keep the aspect ratio, take the centred square of the shorter side.
    """
    check_resize_policy(policy)
    size = int(size)
    if size < 1:
        raise CovidXrayError(f"data.image_size must be a positive integer, got {size}")
    img = Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8))
    w, h = img.size
    if policy == "stretch":
        out = _scale(img, size, size)
    elif policy == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        out = _scale(img.crop((left, top, left + side, top + side)), size, size)
    else:
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        out = Image.new("L", (size, size), 0)
        out.paste(_scale(img, nw, nh), ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(out, dtype=np.uint8)


def check_prepare(normalize: str, crop_border) -> None:
    """Reject unknown data.normalize or an out-of-range data.crop_border, naming the key."""
    if normalize not in NORMALIZE:
        raise CovidXrayError(f"data.normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    if (
        isinstance(crop_border, bool)
        or not isinstance(crop_border, (int, float))
        or not 0 <= crop_border <= MAX_CROP_BORDER
    ):
        raise CovidXrayError(f"data.crop_border must be a fraction in [0, {MAX_CROP_BORDER}], got {crop_border!r}")


def prepare(images: np.ndarray, size: int, normalize: str = "none", crop_border: float = 0.0) -> np.ndarray:
    """Stored squares (N, S, S) uint8 -> model inputs (N, size, size) uint8: cut `crop_border` of
    the side from each border (where text markers sit), resize to `size`, then equalise the
    intensities (skimage: global histogram equalisation, or CLAHE). The same steps for training,
    evaluation and prediction, so a model always sees what it was trained on."""
    check_prepare(normalize, crop_border)
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError("images must be a uint8 (N, S, S) stack")
    side = images.shape[1]
    cut = int(round(side * float(crop_border)))
    if side < 8 or side - 2 * cut < 8:
        raise CovidXrayError(f"data.crop_border={crop_border} leaves less than 8 px of {side} px images")
    if int(size) > side:
        raise CovidXrayError(
            f"data.image_size={size} exceeds the stored images' {side} px (raise data.store_size and re-run curate)"
        )
    out = np.empty((len(images), int(size), int(size)), dtype=np.uint8)
    for i, img in enumerate(images):
        square = img[cut : side - cut, cut : side - cut] if cut else img
        out[i] = square if square.shape[0] == size else _scale(Image.fromarray(square), size, size)
    if normalize == "none":
        return out
    from skimage import exposure

    equalise = exposure.equalize_hist if normalize == "equalize" else exposure.equalize_adapthist
    for i, img in enumerate(out):
        out[i] = np.clip(np.round(equalise(img) * 255.0), 0, 255).astype(np.uint8)
    return out


INPUT_KEYS = ("image_size", "resize", "store_size", "normalize", "crop_border")


def input_spec(image_size, resize="stretch", store_size=None, normalize="none", crop_border=0.0) -> dict:
    """How a model's inputs are made from an image file (saved with the model, so prediction
    repeats training's steps exactly), checked."""
    check_resize_policy(str(resize))
    check_prepare(str(normalize), crop_border)
    for key, value in (("image_size", image_size), ("store_size", store_size)):
        if (value is not None or key == "image_size") and (
            isinstance(value, bool) or not isinstance(value, int) or value < 8
        ):
            raise CovidXrayError(f"data.{key} must be an integer >= 8 (pixels), got {value!r}")
    size = int(image_size)
    store = int(store_size or size)
    if size > store:
        raise CovidXrayError(f"data.image_size={size} exceeds data.store_size={store}")
    return {
        "image_size": size,
        "resize": str(resize),
        "store_size": store,
        "normalize": str(normalize),
        "crop_border": float(crop_border),
    }


def prepare_for(meta: dict, images: np.ndarray) -> np.ndarray:
    """Stored squares as a saved model's inputs (its metadata's image_size, normalize, crop_border)."""
    return prepare(images, meta["image_size"], meta.get("normalize", "none"), meta.get("crop_border", 0.0))


def load_image(
    path: Path,
    size: int,
    policy: str = "stretch",
    store_size: int | None = None,
    normalize: str = "none",
    crop_border: float = 0.0,
) -> np.ndarray:
    """Decode an image file to what models see: a (size, size) uint8 grayscale square, by the
    curated store's steps (resize to store_size by `policy`) and then `prepare`'s."""
    check_resize_policy(policy)
    gray, _ = read_grayscale(path)
    stored = resize(gray, int(store_size or size), policy)
    return prepare(stored[None], size, normalize, crop_border)[0]


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
    classes = read_json(curated_dir / CLASSES_FILE)
    if len(images) != len(index):
        raise CovidXrayError(f"{curated_dir}: {len(images)} images but {len(index)} index rows")
    return images, index, classes


def load_splits(path: Path) -> pd.DataFrame:
    """Read data/splits.csv (ids as strings)."""
    path = Path(path)
    if not path.is_file():
        raise CovidXrayError(f"splits missing: {path} (run `dvc repro split`)")
    return pd.read_csv(path, dtype={"image_id": str, "patient_id": str})


def with_splits(index: pd.DataFrame, splits: pd.DataFrame, splits_path="the splits") -> pd.DataFrame:
    """The index with each image's partition and fold; every curated image must be in the splits."""
    missing = set(index["image_id"]) - set(splits["image_id"])
    if missing:
        raise CovidXrayError(f"{len(missing)} curated images are not in {splits_path} (rerun `dvc repro split`)")
    return index.merge(splits[["image_id", "partition", "fold"]], on="image_id", how="left", validate="one_to_one")


def load_probe(curated_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """The curated probe set (images of no class: the collection's other findings); empty if none."""
    curated_dir = Path(curated_dir)
    if not (curated_dir / PROBE_INDEX_FILE).is_file():
        return np.zeros((0, 8, 8), np.uint8), pd.DataFrame(columns=["image_id", "finding", "patient_id"])
    frame = pd.read_csv(curated_dir / PROBE_INDEX_FILE, dtype={"patient_id": str, "image_id": str})
    return np.load(curated_dir / PROBE_IMAGES_FILE), frame
