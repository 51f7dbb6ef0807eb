"""Preprocessing that carries no source signal (issue 8, point 1).

A radiograph reaches the model the same way with or without black side bars, and as a
4:3 image or as its square crop; the v1 ``pad`` policy fails the same checks (the control
that shows the test can fail). The border trim is also checked on every real image of the
data set's sources: no black bar survives it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from ml.augment import augment_display
from ml.gradcam import cam_to_display
from ml.preprocess import (
    PreprocessConfig,
    display_to_model_frame,
    display_to_model_grey,
    lung_field_box,
    lung_fields,
    read_image_file,
    trim_borders,
)
from tests.conftest import need_shared

from .conftest import chest_like

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr"
V2 = PreprocessConfig(size=128)
V1 = PreprocessConfig(size=128, square_policy="pad")


def _variants(img: np.ndarray) -> dict[str, np.ndarray]:
    """A landscape 4:3 radiograph, its centre square, and both with black side bars."""
    h, w = img.shape
    assert abs(w / h - 4 / 3) < 0.02
    s = h
    square = img[:, (w - s) // 2 : (w - s) // 2 + s]
    bars = cv2.copyMakeBorder(square, 0, 0, s // 6, s // 6, cv2.BORDER_CONSTANT, value=0)
    top_bars = cv2.copyMakeBorder(img, h // 8, h // 8, 0, 0, cv2.BORDER_CONSTANT, value=0)
    return {"4:3": img, "square": square, "square+side bars": bars, "4:3+top bars": top_bars}


def _max_mean_diff(cfg: PreprocessConfig, variants: dict[str, np.ndarray]) -> float:
    """Largest mean absolute difference (grey levels) between the variants' model inputs,
    compared at 32 x 32 (the anatomy, not a pixel-exact texture: a shift of a pixel or two
    of rib texture is not a different input to a network that pools over 32 px)."""
    greys = [
        cv2.resize(display_to_model_grey(v, cfg), (32, 32), interpolation=cv2.INTER_AREA).astype(
            np.float32
        )
        for v in variants.values()
    ]
    return max(float(np.abs(g - greys[0]).mean()) for g in greys[1:])


def _real_4_3() -> np.ndarray:
    """A real radiograph of the data set cut to 4:3 landscape around its centre."""
    root = need_shared(SHARED)
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    row = next(r for r in rows if r["source"] == "darkcovidnet-nih")
    img = read_image_file(root / row["file"])
    x0, y0, x1, y1 = trim_borders(img)  # the radiograph itself, without its own edge band
    img = img[y0:y1, x0:x1]
    h, w = img.shape
    nh = int(round(w * 3 / 4))
    top = (h - nh) // 2
    return img[top : top + nh]


@pytest.mark.parametrize("which", ["synthetic", "real"])
def test_same_model_input_with_bars_square_or_4_3(which: str) -> None:
    img = chest_like(np.random.default_rng(3), 240, 320, 0) if which == "synthetic" else _real_4_3()
    variants = _variants(img)
    v2 = _max_mean_diff(V2, variants)
    v1 = _max_mean_diff(V1, variants)
    # nearly the same input under v2 (a few grey levels of resampling), not under v1
    assert v2 < 6.0, (v2, v1)
    assert v1 > 20.0, (v2, v1)


def test_lung_box_policy_is_as_invariant_on_a_real_radiograph() -> None:
    """The measured alternative (``lung-box``, docs/benchmarks.md §7.7) finds the same
    lung fields with and without bars, square or 4:3, but its square is clamped to the
    image differently in the square crop: a shift of a few pixels that ``trim-crop``
    does not have (measured: 13.4 grey levels against 0.0, and 81 for ``pad``). It is
    still far from the bars' effect."""
    variants = _variants(_real_4_3())
    lung = _max_mean_diff(PreprocessConfig(size=128, square_policy="lung-box"), variants)
    assert lung < 0.3 * _max_mean_diff(V1, variants)
    assert _max_mean_diff(V2, variants) <= lung
    # and its frame is not simply the centre square: it follows the lungs
    img = variants["4:3"]
    assert lung_fields(img, trim_borders(img)) is not None


def test_lung_fields_found_on_every_source() -> None:
    """On real images of every source the lung fields are found (else the policy falls
    back to the centre square); a blank or flat image has none."""
    root = need_shared(SHARED)
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    rng = np.random.default_rng(1)
    by_source: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    found, total = 0, 0
    for _src, items in sorted(by_source.items()):
        for r in [items[i] for i in rng.choice(len(items), 6, replace=False)]:
            img = read_image_file(root / r["file"])
            box = lung_fields(img, trim_borders(img))
            total += 1
            if box is None:
                continue
            found += 1
            x0, y0, x1, y1 = box
            h, w = img.shape
            # two lungs span most of the chest's width, and stay inside the image
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert (x1 - x0) >= 0.35 * w and (y1 - y0) >= 0.3 * h
            sx0, sy0, sx1, sy1 = lung_field_box(img)
            assert sx1 - sx0 == sy1 - sy0  # a square frame
    assert found >= 0.9 * total, (found, total)
    flat = np.full((200, 200), 128, np.uint8)
    assert lung_fields(flat, (0, 0, 200, 200)) is None
    assert lung_field_box(flat) == (0, 0, 200, 200)


def test_trim_finds_the_image_inside_bars_and_frames() -> None:
    img = chest_like(np.random.default_rng(5), 200, 160, 1)
    framed = cv2.copyMakeBorder(img, 7, 7, 5, 5, cv2.BORDER_CONSTANT, value=255)
    framed = cv2.copyMakeBorder(framed, 30, 0, 40, 40, cv2.BORDER_CONSTANT, value=0)
    x0, y0, x1, y1 = trim_borders(framed)
    assert abs(x0 - 45) <= 2 and abs(y0 - 37) <= 2
    assert abs(x1 - (45 + 160)) <= 2 and abs(y1 - (37 + 200)) <= 2
    # a uniform image has no "inside": it is kept whole, never cut to nothing
    assert trim_borders(np.zeros((50, 40), np.uint8)) == (0, 0, 40, 50)


def test_heat_map_lands_on_the_frame_pixels() -> None:
    """The CAM is mapped back through the frame box: a hot spot in the model frame
    lands on the same anatomy in the display image, nothing on the trimmed bars."""
    img = chest_like(np.random.default_rng(2), 120, 120, 0)
    display = cv2.copyMakeBorder(img, 0, 0, 40, 40, cv2.BORDER_CONSTANT, value=0)
    _, box = display_to_model_frame(display, V2)
    assert box == (40, 0, 160, 120)
    cam = np.zeros((128, 128), np.float32)
    cam[32:64, 32:64] = 1.0  # upper-left quadrant of the frame
    on = cam_to_display(cam, display.shape, box)
    ys, xs = np.nonzero(on > 0.5)
    assert 40 + 28 <= xs.min() and xs.max() <= 40 + 62 and 28 <= ys.min() and ys.max() <= 62
    assert on[:, :40].max() == 0 and on[:, 160:].max() == 0


def test_no_black_bar_survives_on_any_source() -> None:
    """On real images of every source (and augmented copies with random bars), the
    model input has no uniform black column or row band at its edges."""
    root = need_shared(SHARED)
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    rng = np.random.default_rng(0)
    by_source: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    bad = []
    for src, items in sorted(by_source.items()):
        for r in [items[i] for i in rng.choice(len(items), 8, replace=False)]:
            img = read_image_file(root / r["file"])
            for variant in (img, augment_display(img, rng)):
                g = display_to_model_grey(variant, PreprocessConfig(size=128, equalization="none"))
                for edge in (g[:, :3], g[:, -3:], g[:3, :].T, g[-3:, :].T):
                    if (edge.max(axis=1) <= 8).mean() > 0.9:
                        bad.append((src, r["file"]))
    assert len(bad) <= 2, bad  # at most a rare rotated-corner case
