"""Grad-CAM on the logits at the last convolutional block (:data:`ml.model.FEATURE_LAYER`).

With the default GAP -> Dropout -> Dense head the logit of class c is
``y_c = b_c + sum_k w_kc * mean_ij A_ijk``, so Grad-CAM's channel weights
``alpha_kc = mean_ij dy_c/dA_ijk = w_kc / (h*w)`` and Grad-CAM equals CAM up to a
positive factor (Selvaraju et al. 2017, section 3.1). :func:`cam_from_features` uses that:
no backward pass, only the features the forward pass already produced.
:func:`gradcam_gradient` is the general version (any head), with ``tf.GradientTape``.

All maps are ReLU'd and scaled to [0, 1] (a map with no positive evidence is all zero).
"""

from __future__ import annotations

import logging
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.5  # opacity of the heat colour where the map is 1
ALPHA_FLOOR = 0.2  # below this CAM value the overlay is fully transparent


def normalise_cam(cam: np.ndarray) -> np.ndarray:
    """ReLU, then divide by the maximum: float32 in [0, 1]."""
    cam = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    peak = float(cam.max()) if cam.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0:
        return np.zeros(cam.shape, np.float32)
    return (cam / peak).astype(np.float32)


def cam_from_features(
    features: np.ndarray, weights_of_logits_layer: np.ndarray, class_idx: int
) -> np.ndarray:
    """CAM (== Grad-CAM for GAP->linear heads) at the feature resolution, in [0, 1].

    ``features``: (h, w, C) last-conv activations of one image; ``weights_of_logits_layer``:
    the logits Dense kernel (C, K) (a (kernel, bias) pair is accepted).
    """
    kernel = weights_of_logits_layer
    if isinstance(kernel, list | tuple):
        kernel = kernel[0]
    kernel = np.asarray(kernel, dtype=np.float32)
    f = np.asarray(features, dtype=np.float32)
    if f.ndim == 4:
        if f.shape[0] != 1:
            raise ValueError("cam_from_features takes one image's features")
        f = f[0]
    if f.shape[-1] != kernel.shape[0]:
        raise ValueError(f"features have {f.shape[-1]} channels, kernel {kernel.shape}")
    return normalise_cam(f @ kernel[:, class_idx])


def make_gradcam_fn(model: Any) -> Any:
    """A compiled (``tf.function``) Grad-CAM for ``model``: ``fn(x (1,S,S,3), class_idx)``
    -> raw map (h, w) before ReLU/normalisation. Build once per model and reuse."""
    import tensorflow as tf

    from ml.model import feature_logit_model

    fl = model if len(model.outputs) == 2 else feature_logit_model(model)

    def fn(x: tf.Tensor, class_idx: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            features, logits = fl([x], training=False)
            score = tf.gather(logits, class_idx, axis=1)
        grads = tape.gradient(score, features)[0]  # (h, w, C)
        alpha = tf.reduce_mean(grads, axis=(0, 1))  # global-average-pooled gradients
        return tf.reduce_sum(features[0] * alpha, axis=-1)

    # tf.function(fn, ...) rather than a decorator: TensorFlow ships no type information
    return tf.function(fn, reduce_retracing=True)


def gradcam_gradient(model: Any, x: np.ndarray, class_idx: int, fn: Any = None) -> np.ndarray:
    """Grad-CAM with a real backward pass (TensorFlow backend), in [0, 1].

    ``model``: the Keras classifier (logits output) or its
    :func:`ml.model.feature_logit_model`; ``x``: one input (S, S, 3) or (1, S, S, 3);
    ``fn``: a :func:`make_gradcam_fn` of ``model`` to reuse (else built here).
    """
    xb = np.asarray(x, dtype=np.float32)
    if xb.ndim == 3:
        xb = xb[None]
    fn = fn or make_gradcam_fn(model)
    return normalise_cam(np.asarray(fn(xb, np.int32(class_idx))))


def upsample(cam: np.ndarray, size: int) -> np.ndarray:
    """Feature-resolution map -> (size, size) model-input frame (bilinear), in [0, 1]."""
    if cam.shape == (size, size):
        return cam.astype(np.float32)
    out = cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)


def cam_to_display(
    cam: np.ndarray,
    display_shape: tuple[int, ...],
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Map a square model-frame CAM onto the original (H, W) display image.

    ``box`` is the display region the model frame covers (``Prediction.frame_box``, from
    :func:`ml.preprocess.model_frame_box`): the map is resized to it and placed there;
    pixels outside it (borders cut away by the preprocessing) get 0. Without a box, the
    ``pad`` policy's box (symmetric padding to a square) is assumed.
    """
    h, w = int(display_shape[0]), int(display_shape[1])
    if box is None:
        s = max(h, w)
        top, left = (s - h) // 2, (s - w) // 2
        box = (-left, -top, s - left, s - top)
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty frame box {box}")
    full = cv2.resize(cam.astype(np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((h, w), np.float32)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0:sy1, sx0:sx1] = full[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
    return np.clip(out, 0.0, 1.0)


def overlay_weights(
    cam: np.ndarray, alpha: float = DEFAULT_ALPHA, floor: float = ALPHA_FLOOR
) -> np.ndarray:
    """Per-pixel opacity of the heat colour: ``alpha * cam`` where ``cam >= floor``, 0 below
    (float32). Cold regions keep the radiograph exactly as it is; only where the map says
    something does colour appear, and the stronger the map, the more opaque."""
    m = np.clip(np.nan_to_num(np.asarray(cam, np.float32)), 0.0, 1.0)
    return np.where(m >= np.float32(floor), m * np.float32(alpha), np.float32(0.0)).astype(
        np.float32
    )


def heat_colours(values: np.ndarray) -> np.ndarray:
    """RGB uint8 JET colours of values in [0, 1] (any shape (..., ) -> (..., 3))."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0.0, 1.0)
    u8 = cv2.convertScaleAbs(v, alpha=255.0)
    flat = u8.reshape(-1, 1) if u8.ndim != 2 else u8
    rgb = cv2.cvtColor(cv2.applyColorMap(flat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return rgb.reshape((*v.shape, 3))


def overlay(
    display_uint8: np.ndarray,
    cam: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    text: str | None = None,
    box: tuple[int, int, int, int] | None = None,
    floor: float = ALPHA_FLOOR,
) -> np.ndarray:
    """Colour-mapped CAM alpha-blended on a grey display image -> RGB uint8 (H, W, 3).

    ``cam`` is either already in the display frame (same H, W) or a square model-frame
    map (it is then mapped with :func:`cam_to_display`). The opacity follows the map
    (:func:`overlay_weights`): pixels whose CAM is below ``floor`` are the grey radiograph,
    unchanged. ``text`` is burnt in at the top. The one overlay of the project: the
    Secondary Capture (``worker.results``) and ``cxr-ml predict --cam-dir`` use it. The
    blend is OpenCV's ``blendLinear`` (no float NumPy temporaries of the whole image).
    """
    grey = np.asarray(display_uint8)
    if grey.ndim == 3:
        grey = cv2.cvtColor(grey, cv2.COLOR_RGB2GRAY)
    if grey.dtype != np.uint8:
        from ml.preprocess import to_uint8

        grey = to_uint8(grey)
    h, w = grey.shape
    m = cam if cam.shape == (h, w) and box is None else cam_to_display(cam, (h, w), box)
    m = np.clip(np.nan_to_num(np.asarray(m, np.float32)), 0.0, 1.0)
    heat = heat_colours(m)
    base = cv2.cvtColor(np.ascontiguousarray(grey), cv2.COLOR_GRAY2RGB)
    weight = overlay_weights(m, alpha, floor)
    out = cv2.blendLinear(heat, base, weight, np.float32(1.0) - weight)
    # blendLinear divides by (w1 + w2 + 1e-5): pixels without heat are copied exactly
    cold = weight == 0
    out[cold] = base[cold]
    if text:
        out = burn_text(out, text)
    return out


def colour_bar(
    height: int, width: int, floor: float = ALPHA_FLOOR, horizontal: bool = True
) -> np.ndarray:
    """A legend of the overlay: RGB uint8 (height, width, 3), the pure JET colours of the
    map from ``floor`` (left or bottom) to 1 (right or top); on the radiograph they are
    blended at the opacity :func:`overlay_weights` gives."""
    n = width if horizontal else height
    ramp = np.linspace(floor, 1.0, max(n, 2), dtype=np.float32)[:n]
    colours = heat_colours(ramp)  # (n, 3)
    if horizontal:
        return np.ascontiguousarray(np.broadcast_to(colours[None, :, :], (height, width, 3)))
    return np.ascontiguousarray(np.broadcast_to(colours[::-1, None, :], (height, width, 3)))


def burn_text(rgb: np.ndarray, text: str) -> np.ndarray:
    """Write ``text`` in a black band at the top of an RGB image (scaled to its width)."""
    out = np.ascontiguousarray(rgb.copy())
    h, w = out.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, 2)
    scale = max(0.25, min(1.5, 0.95 * w / max(tw, 1)))
    thick = max(1, int(round(scale * 1.5)))
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    band = min(h, th + base + 6)
    out[:band] = (out[:band] * 0.2).astype(np.uint8)
    cv2.putText(
        out, text, (max(0, (w - tw) // 2), th + 3), font, scale, (255, 255, 0), thick, cv2.LINE_AA
    )
    return out
