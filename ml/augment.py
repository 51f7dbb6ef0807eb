"""Training augmentation that imitates other scanners and other hospitals.

Applied to the 8-bit *display* image, before :mod:`ml.preprocess` (so the border trim and
the equalisation of serving see augmented images exactly as they would see a new site's):

* acquisition: rescale down and up (the image's long side to 160-384 px and back),
  Gaussian blur, Gaussian noise, gamma, contrast/brightness, JPEG artefacts;
* geometry: small rotations (+/- 7 degrees), shifts (+/- 5%), zoom (+/- 12%);
* the site's habits: random borders (black or white bars on random sides, any width),
  burnt-in text and markers (letters, "L"/"R", "AP", "PORTABLE"), black or white
  rectangles like the masked labels of digitised film, for **every class**, so that none of
  them marks one.

No vertical flips (the diaphragm never sits on top) and no horizontal flips (they would
turn every heart into dextrocardia). Each call takes its own ``numpy.random.Generator``,
so a run is reproducible from its seed.
"""

from __future__ import annotations

import cv2
import numpy as np

_MARKERS = ("L", "R", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "A", "B", "C", "1", "2")


def _rescale(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape
    target = float(rng.uniform(160, 384))
    s = target / max(h, w)
    small = cv2.resize(
        img,
        (max(8, round(w * s)), max(8, round(h * s))),
        interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR,
    )
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _geometry(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape
    angle = float(rng.uniform(-7, 7))
    zoom = float(rng.uniform(0.88, 1.12))
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, zoom)
    m[0, 2] += float(rng.uniform(-0.05, 0.05)) * w
    m[1, 2] += float(rng.uniform(-0.05, 0.05)) * h
    fill = int(rng.choice([0, 0, 255]))
    out: np.ndarray = cv2.warpAffine(
        img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill
    )
    return out


def _intensity(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = img.astype(np.float32) / 255.0
    f = np.power(np.clip(f, 0, 1), float(np.exp(rng.uniform(-0.4, 0.4))))  # gamma 0.67-1.5
    f = (f - 0.5) * float(rng.uniform(0.75, 1.3)) + 0.5 + float(rng.uniform(-0.08, 0.08))
    if rng.random() < 0.5:
        sigma = float(rng.uniform(0.3, 1.6)) * max(img.shape) / 384.0
        f = cv2.GaussianBlur(f, (0, 0), sigmaX=max(0.1, sigma))
    if rng.random() < 0.5:
        f = f + rng.normal(0, float(rng.uniform(0.003, 0.02)), f.shape).astype(np.float32)
    out: np.ndarray = np.clip(f * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def _jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    q = int(rng.integers(25, 90))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:  # pragma: no cover - OpenCV always encodes a grey uint8 image
        return img
    dec = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    if dec is None:  # pragma: no cover - decoding what OpenCV just encoded
        return img
    return dec


def _borders(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape
    out = img
    value = int(rng.choice([0, 0, 0, 255]))
    for side in range(4):
        if rng.random() < 0.35:
            frac = float(rng.uniform(0.02, 0.2))
            if side in (0, 1):
                n = max(1, int(frac * h))
                out = cv2.copyMakeBorder(
                    out,
                    n if side == 0 else 0,
                    n if side == 1 else 0,
                    0,
                    0,
                    cv2.BORDER_CONSTANT,
                    value=value,
                )
            else:
                n = max(1, int(frac * w))
                out = cv2.copyMakeBorder(
                    out,
                    0,
                    0,
                    n if side == 2 else 0,
                    n if side == 3 else 0,
                    cv2.BORDER_CONSTANT,
                    value=value,
                )
    return out


def _marks(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.ascontiguousarray(img.copy())
    h, w = out.shape
    for _ in range(int(rng.integers(1, 4))):
        colour = int(rng.choice([0, 255, 230]))
        x, y = int(rng.uniform(0, 0.85) * w), int(rng.uniform(0.05, 1.0) * h)
        if rng.random() < 0.4:  # a masked label: a solid rectangle
            rw, rh = int(rng.uniform(0.04, 0.15) * w), int(rng.uniform(0.03, 0.1) * h)
            cv2.rectangle(out, (x, y - rh), (x + rw, y), colour, thickness=-1)
        else:
            text = str(rng.choice(_MARKERS))
            scale = float(rng.uniform(0.4, 1.6)) * max(h, w) / 384.0
            cv2.putText(
                out,
                text,
                (x, y),
                cv2.FONT_HERSHEY_SIMPLEX,
                scale,
                colour,
                max(1, int(round(2 * scale))),
                cv2.LINE_AA,
            )
    return out


def augment_display(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random scanner/site variation of an 8-bit grey display image (H, W)."""
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W) uint8 image, got {img.shape} {img.dtype}")
    out = img
    if rng.random() < 0.7:
        out = _rescale(out, rng)
    out = _geometry(out, rng)
    out = _intensity(out, rng)
    if rng.random() < 0.4:
        out = _marks(out, rng)
    if rng.random() < 0.5:
        out = _borders(out, rng)
    if rng.random() < 0.4:
        out = _jpeg(out, rng)
    return out
