"""One preprocessing for PNG/JPEG/DICOM: bit depth, Modality LUT/rescale, VOI window,
MONOCHROME1, square padding, equalisation, 3 channels."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from ml.preprocess import (
    PreprocessConfig,
    PreprocessError,
    dicom_to_display,
    display_to_model_grey,
    load_display,
    preprocess_display,
    preprocess_file,
    read_image_file,
)
from tests.conftest import CXR_DATA, make_chest_dataset

from .conftest import chest_like


def _radiograph_png(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A real radiograph from ../shared when present, else a generated one (8-bit PNG)."""
    pngs = sorted((CXR_DATA / "Normal").glob("*.png"))[:1] if CXR_DATA.is_dir() else []
    if pngs:
        img = read_image_file(pngs[0])
    else:
        img = chest_like(np.random.default_rng(0), 300, 240, 0)
    img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX)  # full 0..255 range
    path = tmp_path / "cxr.png"
    cv2.imwrite(str(path), img)
    return path, img


def _as_12bit_monochrome1(png: np.ndarray) -> pydicom.Dataset:
    """The same picture as a 12-bit MONOCHROME1 CR with Rescale Slope/Intercept and a
    window: stored values are inverted, scaled to a 4,000-unit window, and the pure black /
    white pixels lie *outside* the window so only the window maps them correctly."""
    lo, hi = 1000.0, 5000.0  # window in modality units (after rescale)
    slope, intercept = 2.0, -1024.0
    q = 255.0 - png.astype(np.float64)  # MONOCHROME1: high values are dark
    modality = lo + q * (hi - lo) / 255.0
    stored = np.rint((modality - intercept) / slope)
    stored[png == 0] = 4095  # far above the window -> darkest
    stored[png == 255] = 0  # far below the window -> brightest
    ds = make_chest_dataset(pixels=stored.astype(np.uint16), bits=12, photometric="MONOCHROME1")
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.RescaleType = "US"
    ds.WindowCenter = (lo + hi) / 2
    ds.WindowWidth = hi - lo
    return ds


def test_png_and_12bit_monochrome1_dicom_give_the_same_tensor(tmp_path: Path) -> None:
    png_path, png = _radiograph_png(tmp_path)
    ds = _as_12bit_monochrome1(png)
    dcm_path = tmp_path / "cxr.dcm"
    ds.save_as(dcm_path, enforce_file_format=True)
    assert int(pydicom.dcmread(dcm_path).pixel_array.max()) > 255  # really 12-bit

    for eq in ("hist", "clahe"):
        cfg = PreprocessConfig(size=256, equalization=eq)  # type: ignore[arg-type]
        a, b = preprocess_file(png_path, cfg), preprocess_file(dcm_path, cfg)
        assert a.shape == b.shape == (256, 256, 3) and a.dtype == b.dtype == np.float32
        diff = np.abs(a - b)
        assert diff.mean() < 1.0, eq
        assert np.percentile(diff, 99) <= 4.0, eq
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    # the display images themselves agree to about one grey level
    disp = dicom_to_display(pydicom.dcmread(dcm_path))
    assert np.abs(disp.astype(int) - png.astype(int)).max() <= 2


def test_monochrome1_is_inverted() -> None:
    px = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    m2 = dicom_to_display(make_chest_dataset(pixels=px, photometric="MONOCHROME2"))
    m1 = dicom_to_display(make_chest_dataset(pixels=px, photometric="MONOCHROME1"))
    assert (m1.astype(int) + m2.astype(int) == 255).all()
    assert m2[0, 0] == 0 and m1[0, 0] == 255


def test_rescale_and_window() -> None:
    px = np.tile(np.linspace(0, 4095, 64), (64, 1)).astype(np.uint16)
    plain = dicom_to_display(make_chest_dataset(pixels=px))
    ds = make_chest_dataset(pixels=px)
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -100.0
    # without a window the (linear) rescale does not change the min-max display
    assert np.abs(dicom_to_display(ds).astype(int) - plain.astype(int)).max() <= 1
    # a window on the lower half of the modality range saturates the upper half
    ds.WindowCenter, ds.WindowWidth = 400.0, 1000.0  # covers modality -100..900
    win = dicom_to_display(ds)
    modality = px * 0.5 - 100
    assert (win[:, modality[0] >= 900] == 255).all()
    assert (win[:, modality[0] <= -100] == 0).all()
    inside = (modality[0] > 0) & (modality[0] < 800)
    assert np.all(np.diff(win[0, inside].astype(int)) >= 0)
    assert win[0, inside].max() - win[0, inside].min() > 150  # window stretches contrast


def test_8_to_16_bit_inputs(tmp_path: Path) -> None:
    grad = np.tile(np.linspace(0, 1, 50), (40, 1))
    p16 = tmp_path / "g16.png"
    cv2.imwrite(str(p16), (grad * 65535).astype(np.uint16))
    p8 = tmp_path / "g8.png"
    cv2.imwrite(str(p8), (grad * 255).astype(np.uint8))
    assert np.abs(load_display(p16).astype(int) - load_display(p8).astype(int)).max() <= 1
    for bits in (8, 10, 16):
        px = (grad * (2**bits - 1)).astype(np.uint16 if bits > 8 else np.uint8)
        d = dicom_to_display(make_chest_dataset(pixels=px, bits=bits))
        assert d.dtype == np.uint8 and d.min() == 0 and d.max() == 255


@pytest.mark.parametrize("shape", [(60, 100), (100, 60)])
def test_pad_policy_pads_black_symmetrically(shape: tuple[int, int]) -> None:
    """Model 1.0.0's policy, kept so its artifact serves as it was trained."""
    h, w = shape
    display = np.full(shape, 200, np.uint8)
    cfg = PreprocessConfig(size=50, equalization="none", square_policy="pad")
    grey = display_to_model_grey(display, cfg)
    assert grey.shape == (50, 50)
    content = grey > 100
    rows, cols = np.flatnonzero(content.any(1)), np.flatnonzero(content.any(0))
    # the aspect ratio is kept (not stretched), the content is centred, padding is black
    ch, cw = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert ch / cw == pytest.approx(h / w, rel=0.1)
    assert abs(rows.min() - (49 - rows.max())) <= 1 and abs(cols.min() - (49 - cols.max())) <= 1
    assert (grey[~content] == 0).all()


def test_three_channels_and_equalisation() -> None:
    img = chest_like(np.random.default_rng(1), 120, 100, 2) // 2  # low contrast
    x = preprocess_display(img, PreprocessConfig(size=64))
    assert x.shape == (64, 64, 3) and x.dtype == np.float32
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all()
    assert x.max() == 255.0  # equalizeHist spreads the histogram to the full range
    clahe = preprocess_display(img, PreprocessConfig(size=64, equalization="clahe"))
    assert not np.array_equal(clahe, x)


def test_unusable_inputs_raise(tmp_path: Path) -> None:
    ds = make_chest_dataset()
    del ds.PixelData
    with pytest.raises(PreprocessError):
        dicom_to_display(ds)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(PreprocessError):
        read_image_file(bad)
