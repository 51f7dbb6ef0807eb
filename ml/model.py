"""DenseNet169 classifier (backend-agnostic Keras 3).

The model takes (S, S, 3) float32 images in 0..255 (see :mod:`ml.preprocess`) and returns
**logits** for the classes in :data:`CLASSES`. ImageNet normalisation is the model's first
layer, so every runtime (Keras, ONNX Runtime) sees the same input.

Heads:

* ``gap`` (default): GlobalAveragePooling -> Dropout -> Dense(3). Linear on pooled
  features, so Grad-CAM equals CAM and needs no backward pass (:mod:`ml.gradcam`).
* ``study``: the original notebook's Flatten -> BN -> Dense256 -> Dropout -> BN ->
  Dense128 -> Dropout -> Dense3, to reproduce its recipe.

Freezing: ``trainable="conv5"`` trains only the conv5 block (+ head), as in the study,
which only makes sense with pretrained (``weights="imagenet"`` or a local file) backbones;
``"all"`` trains everything (needed from scratch).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import keras

from ml.labels import CLASS_DESCRIPTIONS, CLASSES  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

FEATURE_LAYER = "relu"  # DenseNet's final BN+ReLU: the last convolutional block's output
LOGITS_LAYER = "logits"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Head = Literal["gap", "study"]
Trainable = Literal["all", "conv5"]


def build_model(
    image_size: int = 256,
    head: Head = "gap",
    weights: str | None = None,
    trainable: Trainable = "all",
    dropout: float = 0.3,
    n_classes: int = len(CLASSES),
    backbone: str = "densenet169",
) -> keras.Model:
    """Build the classifier. ``weights``: None (scratch), ``"imagenet"`` or a weights file.

    ``backbone="tiny"`` builds a small DenseNet-shaped network (same layer names for the
    feature/logit layers) for fast tests.
    """
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    x = keras.layers.Normalization(
        mean=list(IMAGENET_MEAN),
        variance=[s * s for s in IMAGENET_STD],
        name="imagenet_norm",
    )(x)
    if backbone == "densenet169":
        base = keras.applications.DenseNet169(
            include_top=False, weights=weights, input_tensor=x, pooling=None
        )
        features = base.get_layer(FEATURE_LAYER).output
        if trainable == "conv5":
            for layer in base.layers:
                if not layer.name.startswith(("conv5", "bn", FEATURE_LAYER)):
                    layer.trainable = False
    elif backbone == "tiny":
        features = _tiny_backbone(x)
    else:
        raise ValueError(f"unknown backbone {backbone!r}")

    if head == "gap":
        h = keras.layers.GlobalAveragePooling2D(name="gap")(features)
        h = keras.layers.Dropout(dropout, name="head_dropout")(h)
    elif head == "study":
        h = keras.layers.Flatten(name="flatten")(features)
        h = keras.layers.BatchNormalization(name="head_bn1")(h)
        h = keras.layers.Dense(256, activation="relu", name="head_dense256")(h)
        h = keras.layers.Dropout(0.5, name="head_dropout1")(h)
        h = keras.layers.BatchNormalization(name="head_bn2")(h)
        h = keras.layers.Dense(128, activation="relu", name="head_dense128")(h)
        h = keras.layers.Dropout(0.5, name="head_dropout2")(h)
    else:
        raise ValueError(f"unknown head {head!r}")
    logits = keras.layers.Dense(n_classes, name=LOGITS_LAYER, dtype="float32")(h)
    return keras.Model(inputs, logits, name=f"cxr_{backbone}_{head}")


def _tiny_backbone(x: Any) -> Any:
    """Two small dense blocks with DenseNet's conv/BN/ReLU/concat pattern (tests only)."""
    x = keras.layers.Conv2D(16, 3, strides=4, padding="same", name="conv1_conv")(x)
    for block in (1, 2):
        for i in range(2):
            y = keras.layers.BatchNormalization(name=f"tiny{block}_{i}_bn")(x)
            y = keras.layers.Activation("relu")(y)
            y = keras.layers.Conv2D(8, 3, padding="same", name=f"tiny{block}_{i}_conv")(y)
            x = keras.layers.Concatenate()([x, y])
        x = keras.layers.AveragePooling2D(2, name=f"pool{block}")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.layers.Activation("relu", name=FEATURE_LAYER)(x)


def build_augmenter(seed: int | None = None) -> keras.Sequential:
    """Anatomy-respecting augmentation: small rotation/shift/zoom/contrast, no flips.

    Vertical flips put the diaphragm on top and horizontal flips move the heart to the
    right (dextrocardia); neither occurs in real frontal chest films, so neither is used.
    """
    return keras.Sequential(
        [
            keras.layers.RandomRotation(0.02, fill_mode="constant", seed=seed),  # +/- 7 deg
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed),
            keras.layers.RandomZoom((-0.1, 0.1), fill_mode="constant", seed=seed),
            keras.layers.RandomContrast(0.1, value_range=(0, 255), seed=seed),
        ],
        name="augment",
    )


def feature_logit_model(model: keras.Model) -> keras.Model:
    """Same weights, two outputs: last-conv features (N, h, w, C) and logits (N, 3)."""
    return keras.Model(
        model.inputs,
        [model.get_layer(FEATURE_LAYER).output, model.get_layer(LOGITS_LAYER).output],
        name=model.name + "_cam",
    )
