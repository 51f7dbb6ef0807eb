"""Fixtures of the ml tests: a tiny model artifact, a localised synthetic task, tiny
labelled folders."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "ml" / "models" / "cxr-densenet169-v2"
TINY_SIZE = 64


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ml.artifact import make_tiny_artifact

    return make_tiny_artifact(tmp_path_factory.mktemp("tiny") / "model", image_size=TINY_SIZE)


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def blob_images(
    n: int, size: int = TINY_SIZE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A localised 3-class task: class 0 = bright disc, 1 = nothing, 2 = dark disc, at a
    random position on a textured grey background. Returns (x float32 0..255 (n,S,S,3),
    labels (n,), disc masks (n,S,S) bool)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    x = np.empty((n, size, size, 3), np.float32)
    masks = np.zeros((n, size, size), bool)
    labels = np.arange(n) % 3
    rng.shuffle(labels)
    r = size // 8
    for i in range(n):
        img = 110 + 20 * rng.standard_normal((size, size))
        cy, cx = rng.integers(r + 2, size - r - 2, size=2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if labels[i] == 0:
            img[disc] += 110
            masks[i] = disc
        elif labels[i] == 2:
            img[disc] -= 100
            masks[i] = disc
        x[i] = np.clip(img, 0, 255)[..., None]
    return x, labels.astype(np.int64), masks


def chest_like(rng: np.random.Generator, h: int, w: int, label: int) -> np.ndarray:
    """A grey 8-bit radiograph-ish picture whose texture depends on the label."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = 90 + 60 * np.sin(xx / w * np.pi) * np.cos((yy / h - 0.5) * np.pi)
    lungs = ((xx - w * 0.3) / (w * 0.18)) ** 2 + ((yy - h * 0.5) / (h * 0.3)) ** 2 < 1
    lungs |= ((xx - w * 0.7) / (w * 0.18)) ** 2 + ((yy - h * 0.5) / (h * 0.3)) ** 2 < 1
    img = base - 40 * lungs + 8 * rng.standard_normal((h, w))
    if label == 0:  # "COVID": bright patches in the lungs
        img += 60 * lungs * (np.sin(xx / 3.0) > 0.3)
    elif label == 2:  # "Other": a dense consolidation
        img += 70 * (((xx - w * 0.7) ** 2 + (yy - h * 0.6) ** 2) < (min(h, w) * 0.12) ** 2)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_labelled_folder(
    root: Path,
    per_class: int = 6,
    size: tuple[int, int] = (72, 60),
    seed: int = 0,
    manifest: bool = True,
    layout: str = "ours",
) -> Path:
    """PNG class folders (+ manifest.csv with source/group/licence)."""
    from ml.labels import CLASSES

    rng = np.random.default_rng(seed)
    folders = (
        {"COVID": ["COVID"], "Normal": ["Normal"], "Other": ["Other"]}
        if layout == "ours"
        else {
            "COVID": ["COVID/images"],
            "Normal": ["Normal/images"],
            "Other": ["Lung_Opacity/images", "Viral Pneumonia/images"],
        }
    )
    rows = []
    for ci, cls in enumerate(CLASSES):
        for k in range(per_class):
            sub = folders[cls][k % len(folders[cls])]
            (root / sub).mkdir(parents=True, exist_ok=True)
            name = f"{sub}/{cls.lower()}_{k:03d}.png"
            cv2.imwrite(str(root / name), chest_like(rng, size[0], size[1], ci))
            source = "srcA" if cls == "COVID" else "srcB"
            rows.append(
                {
                    "file": name,
                    "label": cls,
                    "source": source,
                    "group": f"{cls}-{k // 2}",  # pairs share a group ("same patient")
                    "licence": "CC BY 4.0" if source == "srcA" else "public domain",
                }
            )
    if manifest:
        with open(root / "manifest.csv", "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    return root
