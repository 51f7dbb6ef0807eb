"""Continue training the shipped model on the CPU from a (short) GPU run's weights.

Same split, preprocessing and ml.train.fit as ``cxr train``; images are preprocessed once
into memory (uint8) because CPU time is the bottleneck. Resumable: run it again after an
interruption and BackupAndRestore continues from the last finished epoch.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from ml.data import load_samples, split_samples
from ml.labels import CLASSES
from ml.preprocess import PreprocessConfig, preprocess_file
from ml.train import TrainConfig, fit, one_hot


def arrays(samples, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([preprocess_file(s.path, cfg).astype(np.uint8) for s in samples])
    y = one_hot(np.array([CLASSES.index(s.label) for s in samples]))
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/cxr")
    ap.add_argument("--out", default="var/train-cpu")
    ap.add_argument("--init-from", default="var/gpu-run/model.weights.h5")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--max-minutes", type=float, default=95)
    ap.add_argument("--learning-rate", type=float, default=3e-4)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    pcfg = PreprocessConfig(size=256, equalization="hist")
    splits = split_samples(load_samples(a.data))
    xtr, ytr = arrays(splits["train"], pcfg)
    xva, yva = arrays(splits["val"], pcfg)
    cfg = TrainConfig(
        image_size=256,
        epochs=a.epochs,
        batch_size=16,
        head="gap",
        loss="focal",
        learning_rate=a.learning_rate,
        patience=10,
        equalization="hist",
        init_from=a.init_from,
        max_minutes=a.max_minutes,
        extra={"stage": "cpu-continuation", "gpu_stage": "5 epochs, keras-torch on H200"},
    )
    fit(cfg, a.out, (xtr, ytr), (xva, yva), verbose=2)


if __name__ == "__main__":
    main()
