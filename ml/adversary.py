"""Class-conditional source adversary for the frozen-trunk head (``--source-adversary``).

Why: inside a class the look of a *source* (its scanner, its figure crops, its framing)
is a shortcut the classifier can learn instead of the disease (data README, "Known
biases"). Source-balanced draws (:func:`ml.frozen.source_balanced_indices`) stop a large
source from dominating a class, but they do not stop the features from telling the
sources apart. Here a small network, the *adversary*, tries to name the source of every
training image from its pooled features **and its true class** (so it learns which source
within the class, the conditional form of domain-adversarial training, Ganin et al. 2016;
Li et al. 2018 for the class-conditional variant). The classifier's conv5 + head are
trained to keep their loss low **and** the adversary's high: a gradient reversal with
weight ``lam`` on the pooled features. The adversary is thrown away after training; the
shipped model is the same DenseNet169 as without it.

Only classes with two or more sources in the training split take part (a class with one
source has nothing to hide). The weight is ramped up over the first ``RAMP_EPOCHS``
epochs, because the adversary starts untrained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RAMP_EPOCHS = 3
ADVERSARY_WEIGHTS = "adversary.weights.h5"
ADVERSARY_OPTIMIZER = "adversary_optimizer.npz"


def source_targets(
    labels: np.ndarray, sources: list[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(source id per image, 1.0 where its class has >= 2 sources else 0.0, source names)."""
    names = sorted({s or "unknown" for s in sources})
    ids = np.asarray([names.index(s or "unknown") for s in sources], np.int64)
    per_class: dict[int, set[int]] = {}
    for y, i in zip(labels.tolist(), ids.tolist(), strict=True):
        per_class.setdefault(int(y), set()).add(int(i))
    mask = np.asarray([len(per_class[int(y)]) >= 2 for y in labels], np.float32)
    return ids, mask, names


def ramp(lam: float, epoch: int) -> float:
    """The reversal weight in ``epoch`` (0-based): linear up to ``lam``."""
    return float(lam) * min(1.0, (epoch + 1) / RAMP_EPOCHS)


@dataclass
class SourceAdversary:
    """The adversary and the joint train step of classifier head + adversary."""

    model: Any  # the whole classifier (its trunk frozen)
    n_sources: int
    n_classes: int
    learning_rate: float
    loss_fn: Any
    cut: str  # name of the trunk layer the (trainable) head starts at
    hidden: int = 128
    _step: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        import keras

        from ml.model import LOGITS_LAYER

        names = {layer.name for layer in self.model.layers}
        if "gap" not in names:
            raise ValueError("--source-adversary needs the gap head (pooled features)")
        cut = self.model.get_layer(self.cut).output
        self.head = keras.Model(
            cut,
            [self.model.get_layer("gap").output, self.model.get_layer(LOGITS_LAYER).output],
            name="head_pooled_logits",
        )
        width = int(self.head.outputs[0].shape[-1])
        f = keras.Input((width,), name="pooled")
        c = keras.Input((self.n_classes,), name="class")
        h = keras.layers.Concatenate()([f, c])
        h = keras.layers.Dense(self.hidden, activation="relu")(h)
        out = keras.layers.Dense(self.n_sources, dtype="float32")(h)
        self.adversary = keras.Model([f, c], out, name="source_adversary")
        self.opt = keras.optimizers.Adam(self.learning_rate)
        self.adv_opt = keras.optimizers.Adam(self.learning_rate * 3)
        self.opt.build(self.head.trainable_variables)
        self.adv_opt.build(self.adversary.trainable_variables)

    # ------------------------------------------------------------------ training
    def _make_step(self) -> Any:
        import tensorflow as tf

        head, adversary = self.head, self.adversary
        loss_fn, opt, adv_opt = self.loss_fn, self.opt, self.adv_opt

        @tf.function  # type: ignore[untyped-decorator]  # tensorflow is untyped
        def step(x: Any, y: Any, sw: Any, src: Any, mask: Any, lam: Any) -> Any:
            with tf.GradientTape(persistent=True) as tape:
                pooled, logits = head(x, training=True)
                cls_loss = loss_fn(y, logits, sample_weight=sw)
                adv_logits = adversary([pooled, y], training=True)
                per = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=src, logits=adv_logits)
                adv_loss = tf.reduce_sum(per * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
                head_loss = cls_loss - lam * adv_loss
            hv = head.trainable_variables
            av = adversary.trainable_variables
            opt.apply_gradients(zip(tape.gradient(head_loss, hv), hv, strict=True))
            adv_opt.apply_gradients(zip(tape.gradient(adv_loss, av), av, strict=True))
            del tape
            correct = tf.cast(tf.equal(tf.argmax(logits, 1), tf.argmax(y, 1)), tf.float32)
            src_hit = tf.cast(tf.equal(tf.argmax(adv_logits, 1), src), tf.float32) * mask
            return cls_loss, adv_loss, tf.reduce_sum(correct), tf.reduce_sum(src_hit)

        return step

    def fit_epoch(
        self,
        x: np.ndarray,
        y: np.ndarray,
        sw: np.ndarray | None,
        src: np.ndarray,
        mask: np.ndarray,
        lam: float,
        batch_size: int,
    ) -> dict[str, float]:
        """One pass over (x, y) in order; returns loss, accuracy, adversary loss and its
        source accuracy (over the images of multi-source classes)."""
        if self._step is None:
            self._step = self._make_step()
        n = len(x)
        w = np.ones(n, np.float32) if sw is None else np.asarray(sw, np.float32)
        tot = {"loss": 0.0, "adv_loss": 0.0, "correct": 0.0, "src_hit": 0.0}
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            cl, al, c, s = self._step(
                x[lo:hi],
                y[lo:hi].astype(np.float32),
                w[lo:hi],
                src[lo:hi],
                mask[lo:hi],
                np.float32(lam),
            )
            k = hi - lo
            tot["loss"] += float(cl) * k
            tot["adv_loss"] += float(al) * k
            tot["correct"] += float(c)
            tot["src_hit"] += float(s)
        m = float(mask.sum())
        return {
            "loss": tot["loss"] / n,
            "accuracy": tot["correct"] / n,
            "adv_loss": tot["adv_loss"] / n,
            "adv_source_accuracy": tot["src_hit"] / m if m else 0.0,
        }

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt: Path) -> None:
        self.adversary.save_weights(ckpt / ("tmp." + ADVERSARY_WEIGHTS))
        (ckpt / ("tmp." + ADVERSARY_WEIGHTS)).replace(ckpt / ADVERSARY_WEIGHTS)
        for opt, name in ((self.opt, "head"), (self.adv_opt, "adv")):
            tmp = ckpt / f"tmp.{name}.{ADVERSARY_OPTIMIZER}"
            with open(tmp, "wb") as fh:
                arrays: dict[str, Any] = {
                    f"v{i}": np.asarray(v) for i, v in enumerate(opt.variables)
                }
                np.savez(fh, **arrays)
            tmp.replace(ckpt / f"{name}.{ADVERSARY_OPTIMIZER}")

    def load(self, ckpt: Path) -> bool:
        if not (ckpt / ADVERSARY_WEIGHTS).is_file():
            return False
        self.adversary.load_weights(ckpt / ADVERSARY_WEIGHTS)
        for opt, name in ((self.opt, "head"), (self.adv_opt, "adv")):
            saved = np.load(ckpt / f"{name}.{ADVERSARY_OPTIMIZER}")
            for i, v in enumerate(opt.variables):
                v.assign(saved[f"v{i}"])
        return True
