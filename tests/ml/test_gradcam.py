"""Grad-CAM: the no-backward fast path equals the gradient version; Adebayo et al. 2018
model-randomisation sanity check; display-frame mapping; overlay."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from ml.gradcam import (
    burn_text,
    cam_from_features,
    cam_to_display,
    gradcam_gradient,
    normalise_cam,
    overlay,
)
from ml.labels import CLASSES
from ml.preprocess import pad_to_square, resize_square

from .conftest import TINY_SIZE, blob_images


def _train_blob_model(seed: int):
    """A tiny model trained for a few epochs on a task whose evidence is localised."""
    import keras

    from ml.model import build_model

    keras.utils.set_random_seed(seed)
    model = build_model(image_size=TINY_SIZE, backbone="tiny", dropout=0.0)
    x, y, _ = blob_images(360, seed=1)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=8, batch_size=24, verbose=0)
    return model


@pytest.fixture(scope="module")
def trained_blob_model():
    model = _train_blob_model(seed=1)
    xt, yt, mt = blob_images(60, seed=2)
    acc = float((model.predict(xt, verbose=0).argmax(1) == yt).mean())
    return model, acc, (xt, yt, mt)


def _fast_cam(model, x: np.ndarray, idx: int) -> np.ndarray:
    from ml.model import LOGITS_LAYER, feature_logit_model

    features, _ = feature_logit_model(model)([x[None]], training=False)
    kernel = model.get_layer(LOGITS_LAYER).get_weights()[0]
    return cam_from_features(np.asarray(features)[0], kernel, idx)


def test_fast_path_equals_gradient_gradcam(trained_blob_model) -> None:
    from ml.gradcam import make_gradcam_fn

    model, _, (xt, _, _) = trained_blob_model
    fn = make_gradcam_fn(model)  # compiled once, reused (the runtime does the same)
    for i in range(3):
        for c in range(len(CLASSES)):
            fast = _fast_cam(model, xt[i], c)
            grad = gradcam_gradient(model, xt[i], c, fn=fn)
            assert fast.shape == grad.shape == (4, 4)
            np.testing.assert_allclose(fast, grad, atol=1e-4)


def test_fast_path_equals_gradient_on_random_tiny_model() -> None:
    import keras

    from ml.model import build_model

    keras.utils.set_random_seed(3)
    model = build_model(image_size=TINY_SIZE, backbone="tiny")
    x = np.random.default_rng(0).uniform(0, 255, (TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
    for c in range(3):
        np.testing.assert_allclose(_fast_cam(model, x, c), gradcam_gradient(model, x, c), atol=1e-4)


def _mean_rank_correlation(m1, m2, xt: np.ndarray, yt: np.ndarray) -> float:
    """Mean Spearman rho between two models' CAMs of the true class (disc images)."""
    rhos = []
    for cls in (0, 2):  # bright disc / dark disc: the evidence is the disc
        for i in np.flatnonzero(yt == cls)[:8]:
            a, b = _fast_cam(m1, xt[i], cls).ravel(), _fast_cam(m2, xt[i], cls).ravel()
            rho = 0.0 if a.std() == 0 or b.std() == 0 else spearmanr(a, b).statistic
            rhos.append(rho)
    return float(np.mean(rhos))


def test_cam_of_randomised_model_differs_from_trained(trained_blob_model) -> None:
    """Adebayo et al. 2018 model-parameter randomisation test.

    Two independently trained models explain the same images alike; re-initialising the
    weights must change the explanation clearly. (Random conv nets still respond to a
    high-contrast disc a little - the "edge detector" effect the paper describes - so the
    bar is set relative to the trained-vs-trained agreement.)
    """
    import cv2
    import keras

    from ml.model import build_model

    model, acc, (xt, yt, masks) = trained_blob_model
    assert acc >= 0.9, f"the tiny model did not learn the synthetic task (accuracy {acc:.2f})"
    other = _train_blob_model(seed=2)
    agree = _mean_rank_correlation(model, other, xt, yt)
    randomised = []
    for seed in (5, 7, 99):
        keras.utils.set_random_seed(seed)
        random_model = build_model(image_size=TINY_SIZE, backbone="tiny", dropout=0.0)
        randomised.append(_mean_rank_correlation(model, random_model, xt, yt))
    assert agree > 0.85, f"trained models disagree (rho {agree:.2f})"
    assert max(randomised) < 0.8, randomised
    assert np.mean(randomised) < agree - 0.3, (agree, randomised)
    # and the trained map points at the evidence (the disc)
    inside = []
    for i in np.flatnonzero(yt == 0)[:8]:
        up = cv2.resize(_fast_cam(model, xt[i], 0), (TINY_SIZE, TINY_SIZE))
        inside.append(up[masks[i]].mean() - up[~masks[i]].mean())
    assert np.mean(inside) > 0.3


def test_normalise_cam() -> None:
    assert normalise_cam(np.array([[-1.0, 0.0], [1.0, 3.0]])).tolist() == [
        [0.0, 0.0],
        [pytest.approx(1 / 3), 1.0],
    ]
    assert not normalise_cam(-np.ones((3, 3))).any()


@pytest.mark.parametrize("shape", [(60, 100), (100, 60), (80, 80), (51, 37)])
def test_cam_to_display_undoes_square_padding(shape: tuple[int, int]) -> None:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    truth = np.exp(-(((yy - h * 0.3) / 8.0) ** 2 + ((xx - w * 0.7) / 8.0) ** 2)).astype(np.float32)
    # what the model frame would contain: the display padded to a square then resized
    model_frame = resize_square(truth, 64)
    back = cam_to_display(model_frame, (h, w))
    assert back.shape == (h, w)
    assert np.unravel_index(back.argmax(), back.shape) == pytest.approx(
        np.unravel_index(truth.argmax(), truth.shape), abs=2
    )
    assert np.corrcoef(back.ravel(), truth.ravel())[0, 1] > 0.95
    assert pad_to_square(truth).shape == (max(h, w),) * 2


def test_overlay_colours_the_hot_region_and_carries_text() -> None:
    grey = np.full((90, 120), 100, np.uint8)
    cam = np.zeros((64, 64), np.float32)
    cam[20:30, 40:50] = 1.0  # hot spot in the model frame
    rgb = overlay(grey, cam)
    assert rgb.shape == (90, 120, 3) and rgb.dtype == np.uint8
    hot = cam_to_display(cam, grey.shape) > 0.5
    assert hot.any()
    assert np.abs(rgb[hot].astype(int) - 100).max() > 30  # coloured
    assert (rgb[~hot & (cam_to_display(cam, grey.shape) == 0)] == 100).all()  # untouched
    text = overlay(grey, cam, text="RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE")
    assert not np.array_equal(text[:12], rgb[:12])
    assert burn_text(rgb, "X").shape == rgb.shape
