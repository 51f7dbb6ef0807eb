"""Weight averaging for the frozen-trunk head (``cxr train --weight-average START``).

Why: the head's validation loss and accuracy jump from epoch to epoch (the shipped 2.0.0:
val accuracy 0.73-0.79 between neighbouring epochs), so early stopping on the single best
epoch picks one noisy point of the trajectory. Averaging the weights of the later epochs
(stochastic weight averaging, Izmailov et al. 2018) lands in a wider, flatter region of
the loss surface; the flat-minimum argument is what SWAD (Cha et al. 2021) uses for
*domain generalisation*, the property the cross-source table measures.

From epoch ``start`` (1-based) on, :class:`WeightAverage` keeps the running mean of the
trainable head's weights after every epoch. Batch normalisation statistics are not
averaged: they are recomputed for the averaged weights on the training features
(:func:`recompute_batchnorm`, the cumulative mean of the batch statistics, as in
``torch.optim.swa_utils.update_bn``). The running mean and its count are checkpointed with
the run, so an interrupted run resumes with the same average.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

AVERAGE_FILE = "weight_average.npz"


def batchnorm_layers(model: Any) -> list[Any]:
    import keras

    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def recompute_batchnorm(model: Any, batches: Iterable[np.ndarray]) -> int:
    """Set every BatchNormalization layer's moving statistics of ``model`` to the mean of
    its batch statistics over ``batches`` (run in training mode, in order); returns the
    number of batches. The layers' momentum is restored afterwards."""
    layers = batchnorm_layers(model)
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, np.float32))
        layer.moving_variance.assign(np.ones(layer.moving_variance.shape, np.float32))
    k = 0
    try:
        for xb in batches:
            for layer in layers:
                layer.momentum = k / (k + 1)  # k = 0 takes the batch's statistics as they are
            model(np.asarray(xb, np.float32), training=True)
            k += 1
    finally:
        for layer, m in zip(layers, saved, strict=True):
            layer.momentum = m
    return k


@dataclass
class WeightAverage:
    """Running mean of ``model``'s trainable weights from epoch ``start`` (1-based) on."""

    model: Any
    start: int
    count: int = 0
    mean: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.start < 1:
            raise ValueError(f"weight averaging must start at epoch >= 1, not {self.start}")

    def _variables(self) -> list[Any]:
        return list(self.model.trainable_variables)

    def update(self, epoch: int) -> bool:
        """Fold the current weights in after ``epoch`` (1-based); False before ``start``."""
        if epoch < self.start:
            return False
        current = [np.asarray(v, np.float64) for v in self._variables()]
        if not self.mean:
            self.mean = current
        else:
            w = 1.0 / (self.count + 1)
            self.mean = [m + (c - m) * w for m, c in zip(self.mean, current, strict=True)]
        self.count += 1
        return True

    def snapshot(self) -> list[np.ndarray]:
        """Every weight of ``model`` (trainable and BN statistics), to restore later."""
        return [np.asarray(v) for v in self.model.weights]

    def restore(self, saved: list[np.ndarray]) -> None:
        for v, s in zip(self.model.weights, saved, strict=True):
            v.assign(s)

    def apply(self, batches: Iterable[np.ndarray]) -> None:
        """Put the averaged weights into ``model`` and recompute its BN statistics."""
        if not self.count:
            raise RuntimeError("no epoch has been averaged yet")
        for v, m in zip(self._variables(), self.mean, strict=True):
            v.assign(m.astype(np.float32))
        recompute_batchnorm(self.model, batches)

    def save(self, folder: Path) -> None:
        tmp = folder / (AVERAGE_FILE + ".tmp")
        arrays: dict[str, Any] = {f"m{i}": m for i, m in enumerate(self.mean)}
        arrays["count"] = np.asarray(self.count)
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        tmp.replace(folder / AVERAGE_FILE)

    def load(self, folder: Path) -> bool:
        path = folder / AVERAGE_FILE
        if not path.is_file():
            return False
        with np.load(path) as z:
            self.count = int(z["count"])
            self.mean = [z[f"m{i}"] for i in range(len(z.files) - 1)]
        if self.mean and len(self.mean) != len(self._variables()):
            raise ValueError(f"{path} holds {len(self.mean)} arrays for another model")
        return True
