"""images.py: decoding every mode to 8-bit grayscale, the resize policies, errors, the store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidxray import CovidXrayError
from covidxray.data import images

W, H = 48, 36  # above images.MIN_SIDE


def gradient() -> np.ndarray:
    """A (H, W) uint8 ramp 0..255 left to right."""
    return np.tile(np.linspace(0, 255, W).round().astype(np.uint8), (H, 1))


def _write(path, img, **kw):
    img.save(path, **kw)
    return path


@pytest.fixture()
def samples(tmp_path):
    """Synthetic files of every mode and bit depth: name -> (path, expected format, expected mode).

    Pillow cannot write 32-bit integer or float PNGs, so modes I and F are written as TIFF.
    """
    g = gradient()
    rgb = np.stack([g, g, g], axis=-1)
    rgba = np.dstack([rgb, np.full((H, W), 255, np.uint8)])
    rgba[:, : W // 2, 3] = 0  # left half transparent -> black
    la = np.dstack([g, np.full((H, W), 255, np.uint8)])
    deep = g.astype(np.uint16) * 16  # 12-bit data in a 16-bit container
    out = {
        "L": (_write(tmp_path / "l.png", Image.fromarray(g)), "PNG", "L"),
        "RGB": (_write(tmp_path / "rgb.png", Image.fromarray(rgb)), "PNG", "RGB"),
        "RGBA": (_write(tmp_path / "rgba.png", Image.fromarray(rgba)), "PNG", "RGBA"),
        "P": (
            _write(tmp_path / "p.png", Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)),
            "PNG",
            "P",
        ),
        "LA": (_write(tmp_path / "la.png", Image.fromarray(la, mode="LA")), "PNG", "LA"),
        "I;16": (_write(tmp_path / "i16.png", Image.fromarray(deep)), "PNG", None),
        "I;16B": (
            _write(tmp_path / "i16b.png", Image.frombytes("I;16B", (W, H), deep.astype(">u2").tobytes())),
            "PNG",
            None,
        ),
        "I": (_write(tmp_path / "i32.tif", Image.fromarray(deep.astype(np.int32) * 1000)), "TIFF", "I"),
        "F": (_write(tmp_path / "f.tif", Image.fromarray(deep.astype(np.float32) / 7)), "TIFF", "F"),
        "JPEG L": (_write(tmp_path / "l.jpg", Image.fromarray(g), quality=95), "JPEG", "L"),
        "JPEG RGB": (_write(tmp_path / "rgb.jpg", Image.fromarray(rgb), quality=95), "JPEG", "RGB"),
    }
    return out


@pytest.mark.parametrize("name", ["L", "RGB", "RGBA", "P", "LA", "I;16", "I;16B", "I", "F", "JPEG L", "JPEG RGB"])
def test_read_grayscale_every_mode(samples, name):
    path, fmt, mode = samples[name]
    gray, info = images.read_grayscale(path)
    assert gray.dtype == np.uint8 and gray.shape == (H, W)
    assert (info["width"], info["height"], info["format"]) == (W, H, fmt)
    assert mode is None or info["mode"] == mode
    assert len(info["sha256"]) == 64
    if name == "RGBA":
        assert gray[:, : W // 2].max() == 0  # transparent composited onto black
        assert gray[:, -1].min() >= 250
    else:
        # the ramp survives: dark at the left, bright at the right, full 8-bit range
        assert gray[:, 0].max() <= 10 and gray[:, -1].min() >= 245
        assert np.all(np.diff(gray[H // 2].astype(int)) >= -8)


def test_sixteen_bit_scaled_by_actual_range(tmp_path):
    deep = np.tile(np.linspace(1000, 1400, 40).astype(np.uint16), (40, 1))
    deep[0, 0], deep[-1, -1] = 200, 4000
    path = _write(tmp_path / "d.png", Image.fromarray(deep))
    gray, info = images.read_grayscale(path)
    assert info["mode"].startswith("I")
    assert gray.min() == 0 and gray.max() == 255
    with Image.open(_write(tmp_path / "flat.png", Image.fromarray(np.full((4, 4), 999, np.uint16)))) as flat:
        assert images.to_grayscale(flat).max() == 0


def test_too_small_or_flat_for_an_xray_is_refused_naming_the_limit(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "one_pixel.png": (np.full((1, 1), 128, np.uint8), r"too small .* 1x1 px .* at least 32 px"),
        "thumbnail.png": (rng.integers(0, 256, (20, 300), dtype=np.uint8), r"300x20 px"),
        "blank.png": (np.full((256, 256), 250, np.uint8), r"too flat .* within 0 grey levels.*at least 16"),
        # a blank page with a little text: 98% of the pixels are the same white
        "labelled.png": (np.where(rng.random((256, 256)) < 0.005, 0, 255).astype(np.uint8), r"too flat"),
    }
    for name, (pixels, message) in cases.items():
        path = _write(tmp_path / name, Image.fromarray(pixels))
        with pytest.raises(CovidXrayError, match=message) as err:
            images.load_image(path, 32)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    # just above both limits: accepted
    ok = _write(tmp_path / "ok.png", Image.fromarray(np.tile(np.arange(0, 32, dtype=np.uint8) * 2, (32, 1))))
    assert images.load_image(ok, 16).shape == (16, 16)


def test_the_real_xrays_pass_the_limits(collection_dir):
    """The smallest X-rays of the collection (156-157 px, figures of a paper) decode."""
    for name in ("ryct.2020003.fig2-a.png", "ryct.2020003.fig2-b.png"):
        gray, info = images.read_grayscale(collection_dir / "images" / name)
        assert min(gray.shape) >= 156


def test_resize_policies():
    wide = np.full((50, 100), 255, np.uint8)  # a white 2:1 image
    stretch = images.resize(wide, 32, "stretch")
    pad = images.resize(wide, 32, "pad")
    crop = images.resize(wide, 32, "crop")
    for out in (stretch, pad, crop):
        assert out.shape == (32, 32) and out.dtype == np.uint8
    assert stretch.min() == 255 and crop.min() == 255
    # pad keeps the aspect ratio: a 32x16 white band between black bands above and below
    assert pad[:8].max() == 0 and pad[-8:].max() == 0 and pad[8:24].min() == 255
    tall = np.full((100, 50), 255, np.uint8)
    pad_tall = images.resize(tall, 32, "pad")
    assert pad_tall[:, :8].max() == 0 and pad_tall[:, 8:24].min() == 255
    # crop takes the centre: black side thirds disappear, stretch keeps them
    banded = np.zeros((100, 300), np.uint8)
    banded[:, 100:200] = 255
    assert images.resize(banded, 32, "crop").min() == 255
    assert images.resize(banded, 32, "stretch")[:, :8].max() == 0
    # enlarging works too
    assert images.resize(np.zeros((5, 7), np.uint8), 32, "pad").shape == (32, 32)


def test_unknown_policy_names_the_key():
    with pytest.raises(CovidXrayError, match=r"data\.resize.*stretch, pad, crop"):
        images.resize(np.zeros((4, 4), np.uint8), 8, "squash")


def test_load_image(samples):
    out = images.load_image(samples["JPEG RGB"][0], 16, "pad")
    assert out.shape == (16, 16) and out.dtype == np.uint8


def test_bad_files_raise_naming_the_file(tmp_path, samples):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    data = samples["JPEG L"][0].read_bytes()
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(data[: len(data) // 3])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    for path in (text, corrupt, garbage, tmp_path / "absent.png", tmp_path):
        with pytest.raises(CovidXrayError) as err:
            images.load_image(path, 16)
        message = str(err.value)
        assert str(path) in message and "\n" not in message


def test_store_round_trip(tmp_path):
    arr = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    index = pd.DataFrame(
        {"image_id": ["a", "b"], "label": ["normal", "covid"], "y": [0, 1], "patient_id": ["001", "002"]}
    )
    images.save_curated(tmp_path / "c", arr, index, ["normal", "covid"])
    back, idx, classes = images.load_curated(tmp_path / "c", mmap=True)
    assert np.array_equal(back, arr) and classes == ["normal", "covid"]
    assert list(idx["patient_id"]) == ["001", "002"]
    with pytest.raises(CovidXrayError, match="curated data missing"):
        images.load_curated(tmp_path / "nothing")


def test_prepare_resizes_crops_and_equalises():
    from covidxray.data.images import prepare

    rng = np.random.default_rng(0)
    stored = np.zeros((2, 40, 40), np.uint8)
    stored[:, 4:36, 4:36] = rng.integers(100, 140, (2, 32, 32))  # low-contrast centre, black border
    plain = prepare(stored, 20)
    assert plain.shape == (2, 20, 20) and plain.dtype == np.uint8 and plain[:, 0, :].max() == 0
    cropped = prepare(stored, 32, crop_border=0.1)  # 4 px cut from each side of 40
    assert np.array_equal(cropped, stored[:, 4:36, 4:36])
    for method in ("equalize", "clahe"):
        spread = prepare(stored, 32, normalize=method, crop_border=0.1)
        assert np.ptp(spread[0]) > 3 * np.ptp(cropped[0]), method  # contrast stretched


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(size=64), r"data.image_size=64 exceeds the stored images' 40 px"),
        (dict(size=20, normalize="gamma"), "data.normalize must be one of none, equalize, clahe"),
        (dict(size=20, crop_border=0.4), r"data.crop_border must be a fraction in \[0, 0.3\]"),
    ],
)
def test_prepare_rejects_bad_values(kwargs, message):
    from covidxray.data.images import prepare

    with pytest.raises(CovidXrayError, match=message):
        prepare(np.zeros((1, 40, 40), np.uint8), **kwargs)
