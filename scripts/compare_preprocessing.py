"""Proxy measurement: equalizeHist vs CLAHE, and GAP vs the study's head.

The full DenseNet169 arms planned for the GPU did not run (see the model card), so this
compares the options on a small DenseNet-shaped network (``backbone="tiny"``) at 128 px,
trained from scratch with the same ml.preprocess / ml.train.fit code, the same group split
and seed, for a fixed number of epochs each. It is a proxy: it ranks the options for a
small model, not for DenseNet169. Prints one line per arm and writes a JSON summary.

    python scripts/compare_preprocessing.py --epochs 15 --json docs/preprocessing_comparison.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ml.data import load_samples, split_samples
from ml.labels import CLASSES
from ml.preprocess import PreprocessConfig, display_to_model_grey, load_display
from ml.train import TrainConfig, fit, one_hot, read_state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/cxr")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", default="42,43,44", help="comma-separated seeds per arm")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    splits = split_samples(load_samples(a.data))
    displays = {k: [load_display(s.path) for s in v] for k, v in splits.items() if k != "test"}
    labels = {
        k: one_hot(np.array([CLASSES.index(s.label) for s in v]))
        for k, v in splits.items()
        if k != "test"
    }

    def arrays(split: str, eq: str) -> np.ndarray:
        cfg = PreprocessConfig(size=a.size, equalization=eq)  # type: ignore[arg-type]
        g = np.stack([display_to_model_grey(d, cfg) for d in displays[split]])
        return np.repeat(g[..., None], 3, axis=-1).astype(np.float32)

    arms = [("hist", "gap"), ("clahe", "gap"), ("hist", "study")]
    results = []
    seeds = [int(x) for x in a.seeds.split(",")]
    for (eq, head), seed in ((arm, seed) for arm in arms for seed in seeds):
        xtr, xva = arrays("train", eq), arrays("val", eq)
        cfg = TrainConfig(
            image_size=a.size, epochs=a.epochs, batch_size=32, head=head, backbone="tiny",
            equalization=eq, learning_rate=1e-3, patience=a.epochs, seed=seed,
        )
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as d:
            fit(cfg, d, (xtr, labels["train"]), (xva, labels["val"]), verbose=0)
            st = read_state(d)
        row = {
            "equalization": eq, "head": head, "seed": seed, "best_val_loss": st["best_val_loss"],
            "best_val_accuracy": st["best_val_accuracy"], "best_epoch": st["best_epoch"],
            "seconds": round(time.monotonic() - t0, 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    means = {}
    for eq, head in arms:
        rows = [r for r in results if r["equalization"] == eq and r["head"] == head]
        means[f"{eq}/{head}"] = {
            k: float(np.mean([r[k] for r in rows])) for k in ("best_val_loss", "best_val_accuracy")
        }
        print(f"mean {eq:5s} {head:5s}", json.dumps(means[f"{eq}/{head}"]), flush=True)
    summary = {
        "what": f"proxy: tiny DenseNet-shaped net, {a.size}px, from scratch, {a.epochs} epochs, "
        f"seeds {seeds}, group split, focal loss; val split of ../shared/data/cxr",
        "results": results,
        "means": means,
    }
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
