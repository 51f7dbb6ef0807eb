"""Training (tiny DenseNet-shaped model, a few steps) with one interruption + resume,
the tf.data loader, loss and augmentation choices."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest

from ml.train import TrainConfig, fit, make_loss, one_hot, read_state

from .conftest import TINY_SIZE, blob_images, make_labelled_folder


class Interrupt(keras.callbacks.Callback):
    """Simulates a crash (power cut, kill) at the end of an epoch."""

    def __init__(self, at_epoch: int) -> None:
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch == self.at_epoch:
            raise KeyboardInterrupt(f"simulated interruption after epoch {epoch + 1}")


def _history_epochs(out: Path) -> list[int]:
    with open(out / "history.csv", newline="") as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


def test_fit_resumes_after_an_interruption(tmp_path: Path) -> None:
    x, y, _ = blob_images(96, seed=3)
    xv, yv, _ = blob_images(24, seed=4)
    cfg = TrainConfig(
        image_size=TINY_SIZE,
        epochs=4,
        batch_size=16,
        backbone="tiny",
        learning_rate=3e-3,
        patience=10,
    )
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(
            cfg,
            out,
            (x, one_hot(y)),
            (xv, one_hot(yv)),
            verbose=0,
            extra_callbacks=[Interrupt(at_epoch=1)],
        )
    state = read_state(out)
    assert not state.get("completed")
    assert state["epochs_run"] == 2
    assert (out / "backup").is_dir() and (out / "model.weights.h5").is_file()
    assert _history_epochs(out) == [0, 1]

    state = fit(cfg, out, (x, one_hot(y)), (xv, one_hot(yv)), verbose=0)
    assert state["completed"] and state["epochs_run"] == 4
    # resumed at epoch 3, not from scratch: each epoch logged exactly once
    assert _history_epochs(out) == [0, 1, 2, 3]
    assert (out / "learning_curves.png").is_file()
    assert json.loads((out / "config.json").read_text())["backbone"] == "tiny"
    # a completed run is not trained again
    assert fit(cfg, out, (x, one_hot(y)), (xv, one_hot(yv)), verbose=0)["epochs_run"] == 4
    assert _history_epochs(out) == [0, 1, 2, 3]
    # the saved best weights load into a fresh inference model and are better than chance
    from ml.model import build_model

    model = build_model(image_size=TINY_SIZE, backbone="tiny")
    model.load_weights(out / "model.weights.h5")
    acc = float((model.predict(xv, verbose=0).argmax(1) == yv).mean())
    assert acc > 0.5


def test_tfdata_pipeline_matches_the_serving_preprocessing(tmp_path: Path) -> None:
    from ml.data import load_samples
    from ml.labels import CLASSES
    from ml.preprocess import PreprocessConfig, preprocess_file
    from ml.tfdata import load_arrays, make_dataset

    root = make_labelled_folder(tmp_path / "d", per_class=3)
    samples = load_samples(root)
    cfg = PreprocessConfig(size=TINY_SIZE)
    ds = make_dataset(samples, cfg, batch_size=4)
    xs, ys = zip(*ds.as_numpy_iterator(), strict=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert x.shape == (9, TINY_SIZE, TINY_SIZE, 3) and x.dtype == np.float32
    assert y.shape == (9, 3) and (y.sum(1) == 1).all()
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(x[i], preprocess_file(s.path, cfg))
        assert CLASSES[int(y[i].argmax())] == s.label
    greys, labels = load_arrays(samples, cfg)
    assert greys.dtype == np.uint8 and greys.shape == (9, TINY_SIZE, TINY_SIZE)
    np.testing.assert_array_equal(greys, x[..., 0].astype(np.uint8))
    # shuffled training order differs but holds the same images
    shuffled = np.concatenate([b[0] for b in make_dataset(samples, cfg, 4, shuffle=True)])
    assert sorted(shuffled.sum(axis=(1, 2, 3)).tolist()) == sorted(x.sum(axis=(1, 2, 3)).tolist())


def test_losses_come_from_keras() -> None:
    focal = make_loss(TrainConfig(loss="focal"))
    assert isinstance(focal, keras.losses.CategoricalFocalCrossentropy)
    assert isinstance(make_loss(TrainConfig(loss="ce")), keras.losses.CategoricalCrossentropy)
    with pytest.raises(ValueError):
        make_loss(TrainConfig(loss="mse"))


def test_augmentation_respects_anatomy() -> None:
    from ml.model import build_augmenter

    aug = build_augmenter(seed=0)
    assert not any(isinstance(layer, keras.layers.RandomFlip) for layer in aug.layers)
    # a top-heavy image stays top-heavy (no vertical flip) under augmentation
    img = np.zeros((1, 64, 64, 3), np.float32)
    img[:, :20] = 255.0
    for _ in range(5):
        out = np.asarray(aug(img, training=True))
        assert out[:, :32].mean() > 3 * out[:, 32:].mean()
