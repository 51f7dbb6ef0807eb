"""tf.data input pipeline for ``cxr train`` / ``cxr evaluate`` (TensorFlow backend).

Each file is decoded and preprocessed by the *serving* function
(:func:`ml.preprocess.load_display` + :func:`ml.preprocess.display_to_model_grey`)
through ``tf.numpy_function`` with ``num_parallel_calls=AUTOTUNE``; the (S, S) uint8
equalised images are cached (in memory, or in a file with ``cache_file``), so later epochs
skip decoding; then shuffle, 3 channels as float32 0..255, batch, prefetch. Augmentation
is a layer of the training model (:func:`ml.model.build_augmenter`), not part of this
pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ml.data import Sample
from ml.labels import CLASSES
from ml.preprocess import PreprocessConfig, display_to_model_grey, load_display

log = logging.getLogger(__name__)


def _decode_fn(cfg: PreprocessConfig):  # type: ignore[no-untyped-def]
    def decode(path: bytes) -> np.ndarray:
        p = path.decode("utf-8") if isinstance(path, bytes) else str(path)
        return display_to_model_grey(load_display(p), cfg)

    return decode


def make_dataset(
    samples: Sequence[Sample],
    cfg: PreprocessConfig,
    batch_size: int = 16,
    shuffle: bool = False,
    seed: int = 42,
    cache: bool | str = True,
    one_hot: bool = True,
    drop_remainder: bool = False,
) -> Any:
    """``tf.data.Dataset`` of (images (N, S, S, 3) float32 0..255, labels) batches.

    Labels are one-hot float32 (``one_hot=True``, what :func:`ml.train.fit` expects) or
    int32 class indices. ``cache``: True = in memory, a str = cache file prefix.
    """
    import tensorflow as tf

    if not samples:
        raise ValueError("no samples")
    paths = [str(s.path) for s in samples]
    labels = np.array([CLASSES.index(s.label) for s in samples], dtype=np.int32)
    size = cfg.size
    decode = _decode_fn(cfg)

    def load(path: tf.Tensor) -> tf.Tensor:
        grey = tf.numpy_function(decode, [path], tf.uint8, stateful=False)
        grey.set_shape((size, size))
        return grey

    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(lambda p, y: (load(p), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
        ds = ds.cache(cache if isinstance(cache, str) else "")
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)

    def to_input(grey: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.repeat(tf.cast(grey, tf.float32)[..., None], 3, axis=-1)
        if one_hot:
            return x, tf.one_hot(y, len(CLASSES), dtype=tf.float32)
        return x, y

    ds = ds.map(to_input, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def load_arrays(
    samples: Sequence[Sample], cfg: PreprocessConfig, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """All samples as NumPy: (uint8 greys (N, S, S), int labels (N,)), decoded in parallel."""
    ds = make_dataset(samples, cfg, batch_size=batch_size, cache=False, one_hot=False)
    xs, ys = [], []
    for x, y in ds.as_numpy_iterator():
        xs.append(x[..., 0].astype(np.uint8))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def cache_path(out_dir: str | Path, split: str) -> str:
    p = Path(out_dir) / "tfdata-cache"
    p.mkdir(parents=True, exist_ok=True)
    return str(p / split)
