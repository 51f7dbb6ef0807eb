"""How well do the square-crop policies keep the lungs? Measured against real lung masks.

The ``torchxrayvision`` wheel on PyPI carries ``data/semantic_masks_v7labs_lungs.zip``:
517 lung masks (V7 Labs' COVID-19 X-ray annotations), which match images of
../shared/data/cxr by file name (Cohen, darkcovidnet-Cohen and Hannover images: COVID only,
so this says nothing about normal or other-disease radiographs). Only the data is unzipped;
no torch is needed. The masks are never copied into the repository; get them with::

    pip download torchxrayvision --no-deps -d /tmp/txrv
    python benchmarks/lung_box_vs_masks.py --wheel /tmp/txrv/torchxrayvision-*.whl

For every matched image and each policy of :func:`ml.preprocess.model_frame_box`
(``trim-crop``: trimmed borders, centre square; ``lung-box``: the OpenCV lung-field box;
``pad``: the whole image padded to a square) it reports:

* **coverage**: the share of mask (lung) pixels inside the model frame - what a crop cuts
  away from the lungs is invisible to the model;
* **IoU** of the frame with the mask's bounding box, and **context**: frame area / mask
  bounding-box area (how much besides the lungs the model sees, e.g. labels and borders).

Last line: lung-box against trim-crop (the shipped policy), same images, same run.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "cxr"
POLICIES = ("trim-crop", "lung-box", "pad")
MEMBER = "torchxrayvision/data/semantic_masks_v7labs_lungs.zip"


def load_masks(wheel: Path) -> dict[str, bytes]:
    """Mask file stem -> encoded image, straight from the wheel (nothing written)."""
    with zipfile.ZipFile(wheel) as whl, zipfile.ZipFile(io.BytesIO(whl.read(MEMBER))) as z:
        return {
            Path(n).stem: z.read(n)
            for n in z.namelist()
            if n.lower().endswith((".png", ".jpg", ".jpeg"))
        }


def frame_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    h, w = shape
    x0, y0, x1, y1 = box
    out = np.zeros((h, w), bool)
    out[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)] = True
    return out


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area else 0.0


def main() -> int:
    from ml.preprocess import model_frame_box

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--wheel", type=Path, required=True, help="torchxrayvision-*.whl")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument(
        "--lung-margin",
        type=float,
        default=None,
        help="override ml.preprocess.LUNG_MARGIN (the lung-box margin; shipped 0.08)",
    )
    args = ap.parse_args()
    if args.lung_margin is not None:
        import ml.preprocess

        ml.preprocess.LUNG_MARGIN = args.lung_margin
        print(f"LUNG_MARGIN = {args.lung_margin}")
    masks = load_masks(args.wheel)
    rows = list(csv.DictReader(open(args.data / "manifest.csv", newline="")))
    res: dict[str, dict[str, list[float]]] = {p: defaultdict(list) for p in POLICIES}
    per_source: dict[tuple[str, str], list[float]] = defaultdict(list)
    n = 0
    for r in rows:
        stem = Path(r["file"]).stem.split("__", 1)[-1]
        if stem not in masks:
            continue
        img = cv2.imread(str(args.data / r["file"]), cv2.IMREAD_GRAYSCALE)
        m = cv2.imdecode(np.frombuffer(masks[stem], np.uint8), cv2.IMREAD_GRAYSCALE)
        if img is None or m is None:
            continue
        m = cv2.resize(m, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST) > 127
        if m.sum() < 100:
            continue
        n += 1
        mb = bbox(m)
        mb_area = (mb[2] - mb[0]) * (mb[3] - mb[1])
        for p in POLICIES:
            box = model_frame_box(img, p)  # type: ignore[arg-type]
            fm = frame_mask(img.shape[:2], box)
            cov = float((m & fm).sum() / m.sum())
            res[p]["coverage"].append(cov)
            res[p]["iou"].append(iou(box, mb))
            res[p]["context"].append((box[2] - box[0]) * (box[3] - box[1]) / mb_area)
            per_source[(p, r["source"])].append(cov)
    if not n:
        raise SystemExit("no image of the data set matches a mask")
    print(f"{n} radiographs with a lung mask (all COVID: Cohen, darkcovidnet-Cohen, Hannover)")

    def q(xs: list[float], k: float) -> float:
        return float(np.quantile(xs, k))

    for p in POLICIES:
        c, i, x = res[p]["coverage"], res[p]["iou"], res[p]["context"]
        cut = sum(v < 0.95 for v in c)
        print(
            f"{p:<9} coverage median {statistics.median(c):.3f} p10 {q(c, 0.1):.3f} "
            f"min {min(c):.3f} (<0.95 in {cut}/{n}) | IoU median {statistics.median(i):.3f} "
            f"| context median {statistics.median(x):.2f}x"
        )
    for (p, src), c in sorted(per_source.items()):
        print(f"  {p:<9} {src:<20} n={len(c):3d} coverage median {statistics.median(c):.3f}")
    t, lb = res["trim-crop"], res["lung-box"]
    print(
        "lung-box / trim-crop: coverage median "
        f"{statistics.median(lb['coverage']) / statistics.median(t['coverage']):.3f}x, p10 "
        f"{q(lb['coverage'], 0.1) / q(t['coverage'], 0.1):.3f}x, IoU median "
        f"{statistics.median(lb['iou']) / statistics.median(t['iou']):.3f}x, context median "
        f"{statistics.median(lb['context']) / statistics.median(t['context']):.3f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
