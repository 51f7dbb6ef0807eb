"""CPU stage of the shipped model: fine-tune conv5 + head on cached conv1-4 features.

Why: the GPU stage (5 epochs on an H200, keras-torch backend) trained the whole
DenseNet169 from scratch but ran out of device time. Full training on this 2-core CPU
(~1-3 images/s under load) would give ~2 more epochs in the time left, so, as in the
original study's recipe (only conv5 trainable), conv1-conv4 are frozen at the GPU weights,
their output (pool4, 8x8x640 at 256 px) is computed once per image (original + ``--aug-copies``
augmented copies with the same Keras augmentation layers), and conv5 + the GAP head are
trained on those features for many epochs. The result is the full model's weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import keras
import numpy as np

from ml.data import load_samples, split_samples
from ml.labels import CLASSES
from ml.model import build_augmenter, build_model
from ml.preprocess import PreprocessConfig, preprocess_file
from ml.train import (
    HISTORY_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    BestWeights,
    TrainConfig,
    make_loss,
    one_hot,
)

log = logging.getLogger("conv5")
CUT = "pool4_pool"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/cxr")
    ap.add_argument("--out", default="var/train-conv5")
    ap.add_argument("--init-from", default="var/gpu-run/model.weights.h5")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--aug-copies", type=int, default=1)
    ap.add_argument("--learning-rate", type=float, default=3e-4)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--max-minutes", type=float, default=60)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(42)

    pcfg = PreprocessConfig(size=256, equalization="hist")
    splits = split_samples(load_samples(a.data))
    model = build_model(256, head="gap")
    model.load_weights(a.init_from)
    cut = model.get_layer(CUT).output
    extractor = keras.Model(model.input, cut)
    head = keras.Model(cut, model.output)  # shares layers (and weights) with ``model``
    aug = build_augmenter(seed=42)

    def features(samples, copies: int) -> tuple[np.ndarray, np.ndarray]:
        xs = np.stack([preprocess_file(s.path, pcfg) for s in samples])
        y = one_hot(np.array([CLASSES.index(s.label) for s in samples]))
        feats, ys = [extractor.predict(xs, batch_size=32, verbose=0)], [y]
        for _ in range(copies):
            xa = np.concatenate(
                [np.asarray(aug(xs[i : i + 32], training=True)) for i in range(0, len(xs), 32)]
            )
            feats.append(extractor.predict(xa, batch_size=32, verbose=0))
            ys.append(y)
        return np.concatenate(feats), np.concatenate(ys)

    t0 = time.time()
    ftr, ytr = features(splits["train"], a.aug_copies)
    fva, yva = features(splits["val"], 0)
    log.info("cached features %s %s in %.0fs", ftr.shape, fva.shape, time.time() - t0)

    for layer in head.layers:
        layer.trainable = True
    cfg = TrainConfig(
        image_size=256,
        epochs=a.epochs,
        batch_size=32,
        head="gap",
        loss="focal",
        learning_rate=a.learning_rate,
        patience=a.patience,
        equalization="hist",
        init_from=a.init_from,
        augment=True,
        extra={
            "stage": "cpu: conv5+head fine-tuned on cached pool4 features",
            "aug_copies": a.aug_copies,
            "gpu_stage": "5 epochs full network from scratch, keras-torch on one H200",
        },
    )
    (out / "config.json").write_text(cfg.to_json())
    head.compile(
        optimizer=keras.optimizers.Adam(a.learning_rate),
        loss=make_loss(cfg),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    from ml.train import WallClockLimit

    head.fit(
        ftr,
        ytr,
        batch_size=32,
        epochs=a.epochs,
        shuffle=True,
        validation_data=(fva, yva),
        verbose=2,
        callbacks=[
            keras.callbacks.CSVLogger(str(out / HISTORY_FILE), append=True),
            BestWeights(model, out / WEIGHTS_FILE, out / STATE_FILE),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=a.patience),
            WallClockLimit(a.max_minutes * 60),
        ],
    )
    state = json.loads((out / STATE_FILE).read_text())
    state.update(completed=True, backend=keras.backend.backend(), train_seconds=time.time() - t0)
    (out / STATE_FILE).write_text(json.dumps(state, indent=2))
    log.info("done: %s", state)


if __name__ == "__main__":
    main()
