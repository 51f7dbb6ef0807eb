"""Training: focal loss (or cross-entropy), optional balanced class weights, Adam,
early stopping with best-checkpoint restore, resumable after an interruption.

Backend-agnostic: :func:`fit` takes a ``tf.data.Dataset`` (TensorFlow backend, what
``cxr train`` uses) or NumPy arrays (any Keras backend, e.g. JAX on a GPU box).

Output folder layout (``OUT``)::

    model.weights.h5      best weights (lowest val loss) of the inference model
    config.json           the TrainConfig
    history.csv           one row per epoch (appended across resumes)
    train_state.json      {"completed": bool, "epochs_run": n, "best_epoch": n, ...}
    backup/               keras BackupAndRestore state (removed when training completes)
    learning_curves.png   loss/accuracy curves
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ml.labels import CLASSES
from ml.model import Head, build_augmenter, build_model

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.weights.h5"
STATE_FILE = "train_state.json"
HISTORY_FILE = "history.csv"


@dataclass
class TrainConfig:
    image_size: int = 256
    epochs: int = 60
    batch_size: int = 16
    weights: str | None = None  # backbone: None = from scratch, "imagenet", or a weights file
    init_from: str | None = None  # whole-model weights to start from (e.g. a GPU run)
    head: Head = "gap"
    trainable: str = "all"
    loss: str = "focal"  # focal | ce
    focal_gamma: float = 2.0
    focal_alpha: float = 1.0
    class_weights: bool = False
    learning_rate: float = 1e-4
    patience: int = 10
    dropout: float = 0.3
    equalization: str = "hist"
    augment: bool = True
    seed: int = 42
    backbone: str = "densenet169"
    max_minutes: float | None = None
    label_smoothing: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls(**json.loads(text))


def make_loss(cfg: TrainConfig) -> keras.losses.Loss:
    if cfg.loss == "focal":
        return keras.losses.CategoricalFocalCrossentropy(
            alpha=cfg.focal_alpha,
            gamma=cfg.focal_gamma,
            from_logits=True,
            label_smoothing=cfg.label_smoothing,
        )
    if cfg.loss == "ce":
        return keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=cfg.label_smoothing
        )
    raise ValueError(f"unknown loss {cfg.loss!r} (focal or ce)")


def build_training_model(cfg: TrainConfig) -> tuple[keras.Model, keras.Model]:
    """(inference model, training model = augmentation + inference model), compiled."""
    model = build_model(
        image_size=cfg.image_size,
        head=cfg.head,
        weights=cfg.weights,
        trainable=cfg.trainable,  # type: ignore[arg-type]
        dropout=cfg.dropout,
        backbone=cfg.backbone,
    )
    if cfg.init_from:
        model.load_weights(cfg.init_from)
        log.info("initialised from %s", cfg.init_from)
    inp = keras.Input((cfg.image_size, cfg.image_size, 3), name="image")
    x = build_augmenter(cfg.seed)(inp) if cfg.augment else inp
    trainer = keras.Model(inp, model(x), name="trainer")
    trainer.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss=make_loss(cfg),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    return model, trainer


class BestWeights(keras.callbacks.Callback):  # type: ignore[misc]  # keras is untyped
    """Saves the inference model's weights whenever ``val_loss`` improves."""

    def __init__(self, model_to_save: keras.Model, path: Path, state_path: Path) -> None:
        super().__init__()
        self.inner = model_to_save
        self.path = path
        self.state_path = state_path
        self.state = _read_state(state_path)
        self.best = self.state.get("best_val_loss", math.inf)

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = logs or {}
        val = logs.get("val_loss")
        self.state["epochs_run"] = epoch + 1
        if val is not None and val < self.best:
            self.best = float(val)
            tmp = self.path.with_name(self.path.stem + ".tmp.weights.h5")
            self.inner.save_weights(tmp)
            tmp.replace(self.path)
            self.state.update(
                best_val_loss=self.best,
                best_epoch=epoch + 1,
                best_val_accuracy=float(logs.get("val_accuracy", float("nan"))),
            )
        _write_state(self.state_path, self.state)


class WallClockLimit(keras.callbacks.Callback):  # type: ignore[misc]  # keras is untyped
    """Stops training after ``seconds`` (checked at the end of each epoch)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.deadline = time.monotonic() + seconds
        self.hit = False

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        if time.monotonic() >= self.deadline:
            self.hit = True
            self.model.stop_training = True


def _read_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def read_state(out_dir: str | Path) -> dict[str, Any]:
    return _read_state(Path(out_dir) / STATE_FILE)


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(len(CLASSES), dtype=np.float32)[np.asarray(labels, dtype=np.int64)]


def fit(
    cfg: TrainConfig,
    out_dir: str | Path,
    train_data: Any,
    val_data: Any,
    class_weight: dict[int, float] | None = None,
    verbose: int | str = "auto",
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
) -> dict[str, Any]:
    """Train (or resume) into ``out_dir``; returns the final train state.

    ``train_data``/``val_data``: ``tf.data.Dataset`` of (image, one-hot) batches, or a
    tuple ``(x, y_onehot)`` of NumPy arrays.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    state = _read_state(state_path)
    if state.get("completed"):
        log.info("training in %s already completed; nothing to resume", out)
        return state
    (out / "config.json").write_text(cfg.to_json())
    keras.utils.set_random_seed(cfg.seed)
    model, trainer = build_training_model(cfg)

    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.BackupAndRestore(str(out / "backup"), delete_checkpoint=False),
        keras.callbacks.CSVLogger(str(out / HISTORY_FILE), append=True),
        BestWeights(model, out / WEIGHTS_FILE, state_path),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=cfg.patience, restore_best_weights=False
        ),
    ]
    limit = None
    if cfg.max_minutes:
        limit = WallClockLimit(cfg.max_minutes * 60)
        callbacks.append(limit)
    callbacks += extra_callbacks or []

    kwargs: dict[str, Any] = {}
    if isinstance(train_data, tuple):
        kwargs.update(x=train_data[0], y=train_data[1], batch_size=cfg.batch_size, shuffle=True)
        val = val_data
    else:
        kwargs.update(x=train_data)
        val = val_data
    t0 = time.monotonic()
    trainer.fit(
        epochs=cfg.epochs,
        validation_data=val,
        class_weight=class_weight,
        callbacks=callbacks,
        verbose=verbose,
        **kwargs,
    )
    state = _read_state(state_path)
    state.update(
        completed=True,
        stopped_by_time_limit=bool(limit and limit.hit),
        train_seconds=state.get("train_seconds", 0.0) + (time.monotonic() - t0),
        backend=keras.backend.backend(),
    )
    _write_state(state_path, state)
    try:
        plot_learning_curves(out / HISTORY_FILE, out / "learning_curves.png")
    except Exception:  # plotting must never lose a trained model
        log.exception("could not plot learning curves")
    return state


def plot_learning_curves(history_csv: Path, png: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    epochs = list(range(1, len(rows) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, style in (("", "-"), ("val_", "--")):
            vals = [float(r[prefix + key]) for r in rows if r.get(prefix + key)]
            if vals:
                ax.plot(epochs[: len(vals)], vals, style, label=prefix + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.suptitle("Learning curves - research use only, not for diagnostic use", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
