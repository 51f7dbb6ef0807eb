"""Write the train+val images, already padded and resized (pre-equalisation), for a GPU run.

The GPU box has no TensorFlow and a 64 MiB upload limit, so we ship 256 px PNGs of the
display images; the device script applies the rest of ml.preprocess (equalisation) itself,
so the model sees exactly what serving feeds it. Output goes to an ignored folder.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2

from ml.data import load_samples, split_samples
from ml.preprocess import load_display, resize_square


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/cxr")
    ap.add_argument("--out", default=".devdata")
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args()
    out = Path(a.out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    splits = split_samples(load_samples(a.data))
    with open(out / "index.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "split", "label", "source", "group"])
        for split in ("train", "val"):
            for i, s in enumerate(splits[split]):
                name = f"{split}_{i:05d}.png"
                img = resize_square(load_display(s.path), a.size)
                cv2.imwrite(str(out / "img" / name), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
                w.writerow([name, split, s.label, s.source, s.group])


if __name__ == "__main__":
    main()
