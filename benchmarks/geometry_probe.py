"""Geometry shortcut probe: does framing change the verdict?

The data's README ("Known biases"): NIH images are square, most COVID images were padded
with black bars, so a model can learn "bars = COVID". A new hospital's normal radiograph,
stored 4:3 or with a black border, is then called COVID. This probe takes the test-split
radiographs of the Normal class (NIH and JSRT, sources whose images are square), presents
each as it is, with black bars to 4:3, and with a black frame, and counts how often the
verdict changes and how often a normal image becomes "COVID", for each model given.

    python benchmarks/geometry_probe.py --model ml/models/cxr-densenet169-v2 \\
        [--baseline DIR] [--data ../shared/data/cxr]

The last line: ``ratios: model/baseline COVID-flip rate X``. RESEARCH USE ONLY.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def variants(img: np.ndarray) -> dict[str, np.ndarray]:
    h, w = img.shape
    side = (int(round(h * 4 / 3)) - w) // 2
    frame = max(4, h // 12)
    return {
        "as is": img,
        "black bars to 4:3": cv2.copyMakeBorder(
            img, 0, 0, side, side, cv2.BORDER_CONSTANT, value=0
        ),
        "black frame": cv2.copyMakeBorder(
            img, frame, frame, frame, frame, cv2.BORDER_CONSTANT, value=0
        ),
    }


def probe(model_dir: Path, samples: list, cache: Path) -> dict[str, dict[str, float]]:
    from ml.preprocess import load_display
    from ml.runtime import Classifier

    clf = Classifier.load(model_dir, engine="auto", cache_dir=cache)
    names = list(variants(np.zeros((8, 8), np.uint8)))
    labels: dict[str, list[str]] = {n: [] for n in names}
    for s in samples:
        vs = variants(load_display(s.path))
        for n, p in zip(names, clf.predict_displays([vs[n] for n in names]), strict=True):
            labels[n].append(p.label)
    base = labels["as is"]
    out = {
        "as is": {
            "Normal": float(np.mean([x == "Normal" for x in base])),
            "COVID": float(np.mean([x == "COVID" for x in base])),
        }
    }
    for n in names[1:]:
        out[n] = {
            "Normal": float(np.mean([x == "Normal" for x in labels[n]])),
            "COVID": float(np.mean([x == "COVID" for x in labels[n]])),
            "changed": float(np.mean([a != b for a, b in zip(base, labels[n], strict=True)])),
            "to COVID": float(
                np.mean(
                    [a != "COVID" and b == "COVID" for a, b in zip(base, labels[n], strict=True)]
                )
            ),
        }
    return {"model": {"name": f"{clf.name} {clf.version}"}, **out}  # type: ignore[dict-item]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--baseline", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cxr")
    a = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tempfile

    from ml.data import load_samples, split_samples

    test = split_samples(load_samples(a.data))["test"]
    normals = [s for s in test if s.label == "Normal"]
    cache = Path(tempfile.mkdtemp(prefix="cxr-probe-"))
    results = {"model": probe(a.model, normals, cache)}
    if a.baseline:
        results["baseline"] = probe(a.baseline, normals, cache)
    print(
        f"geometry probe: {len(normals)} test-split Normal radiographs "
        f"({', '.join(sorted({s.source for s in normals}))})"
    )
    print(
        "| model | presented | called Normal | called COVID | verdict changed | "
        "Normal/Other -> COVID |"
    )
    print("|---|---|---|---|---|---|")
    for r in results.values():
        name = r["model"]["name"]  # type: ignore[index]
        for k, v in r.items():
            if k == "model":
                continue
            print(
                f"| {name} | {k} | {v['Normal']:.3f} | {v['COVID']:.3f} | "
                f"{v.get('changed', 0.0):.3f} | {v.get('to COVID', 0.0):.3f} |"
            )
    m = results["model"]["black bars to 4:3"]["to COVID"]
    if "baseline" in results:
        b = results["baseline"]["black bars to 4:3"]["to COVID"]
        print(f"ratios: model/baseline COVID-flip rate (bars) {m / b if b else float('nan'):.2f}")
    else:
        print(f"ratios: COVID-flip rate (bars) {m:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
