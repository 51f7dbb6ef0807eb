"""Measure equalizeHist vs CLAHE, and GAP vs the study's head, on the validation split.

Each arm is trained from scratch with the same ml.preprocess / ml.train.fit code, the same
group split and the same seed (paired: same initialisation and batch order, only the option
differs), for a fixed number of epochs. Prints one line per run and rewrites the JSON summary
after every run, so an interrupted measurement still leaves its finished runs.

    # the small DenseNet-shaped proxy (minutes on a CPU)
    python scripts/compare_preprocessing.py --epochs 15 --json docs/preprocessing_comparison.json
    # DenseNet169 itself at 128 px (about 2 min per epoch per arm on 2 CPU cores)
    python scripts/compare_preprocessing.py --backbone densenet169 --epochs 10 \
        --seeds 42,43 --arms hist/gap,clahe/gap,hist/study \
        --json docs/preprocessing_comparison_densenet169.json
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
    ap.add_argument("--backbone", default="tiny", choices=["tiny", "densenet169"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--arms",
        default="hist/gap,clahe/gap,hist/study",
        help="comma-separated EQUALIZATION/HEAD pairs, run seed-major (all arms for the "
        "first seed, then the next seed)",
    )
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

    arms = [tuple(x.split("/")) for x in a.arms.split(",")]
    results: list[dict] = []
    seeds = [int(x) for x in a.seeds.split(",")]
    what = (
        f"{'proxy: tiny DenseNet-shaped net' if a.backbone == 'tiny' else 'DenseNet169'}, "
        f"{a.size}px, from scratch, {a.epochs} epochs, Adam {a.lr:g}, seeds {seeds}, "
        "group split, focal loss; val split of ../shared/data/cxr"
    )
    for seed, (eq, head) in ((seed, arm) for seed in seeds for arm in arms):
        xtr, xva = arrays("train", eq), arrays("val", eq)
        cfg = TrainConfig(
            image_size=a.size,
            epochs=a.epochs,
            batch_size=32,
            head=head,
            backbone=a.backbone,
            equalization=eq,
            learning_rate=a.lr,
            patience=a.epochs,
            seed=seed,
        )
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as d:
            fit(cfg, d, (xtr, labels["train"]), (xva, labels["val"]), verbose=0)
            st = read_state(d)
        row = {
            "equalization": eq,
            "head": head,
            "seed": seed,
            "best_val_loss": st["best_val_loss"],
            "best_val_accuracy": st["best_val_accuracy"],
            "best_epoch": st["best_epoch"],
            "seconds": round(time.monotonic() - t0, 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        summary = summarise(what, arms, results)
        if a.json:
            a.json.write_text(json.dumps(summary, indent=2) + "\n")
    for key, m in summary["means"].items():
        print(f"mean {key:11s}", json.dumps(m), flush=True)


def summarise(what: str, arms: list[tuple[str, ...]], results: list[dict]) -> dict:
    """Per-arm means over the finished seeds (an arm with no finished run is left out)."""
    means = {}
    for eq, head in arms:
        rows = [r for r in results if r["equalization"] == eq and r["head"] == head]
        if rows:
            means[f"{eq}/{head}"] = {
                "runs": len(rows),
                **{
                    k: float(np.mean([r[k] for r in rows]))
                    for k in ("best_val_loss", "best_val_accuracy")
                },
            }
    return {"what": what, "results": results, "means": means}


if __name__ == "__main__":
    main()
