"""Weight averaging of the frozen-trunk head (``cxr train --weight-average START``): the
running mean, the recomputed batch-norm statistics, checkpoint and resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from apps.cli import main
from ml.artifact import load_card
from ml.swa import AVERAGE_FILE, WeightAverage, recompute_batchnorm

from .test_frozen import three_source_folder, tiny_frozen_args  # noqa: F401  # fixtures


def _bn_model(channels: int = 3) -> object:
    import keras

    keras.backend.clear_session()
    inp = keras.Input((4, 4, channels))
    return keras.Model(inp, keras.layers.BatchNormalization(momentum=0.9)(inp))


def test_batchnorm_statistics_are_the_mean_of_the_batch_statistics() -> None:
    model = _bn_model()
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc, scale, (8, 4, 4, 3)) for loc, scale in ((0, 1), (4, 2), (-1, 3))]
    n = recompute_batchnorm(model, batches)
    bn = model.layers[-1]  # type: ignore[attr-defined]
    assert n == 3
    want_mean = np.mean([b.mean(axis=(0, 1, 2)) for b in batches], axis=0)
    want_var = np.mean([b.var(axis=(0, 1, 2)) for b in batches], axis=0)
    np.testing.assert_allclose(np.asarray(bn.moving_mean), want_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), want_var, rtol=1e-4)
    assert bn.momentum == pytest.approx(0.9)  # restored
    # the moving statistics are what inference now uses
    x = batches[1][:2].astype(np.float32)
    y = np.asarray(model(x, training=False))  # type: ignore[operator]
    expect = (x - want_mean) / np.sqrt(want_var + bn.epsilon)
    np.testing.assert_allclose(y, expect, rtol=1e-3, atol=1e-3)


def test_running_mean_of_the_weights_from_the_start_epoch(tmp_path: Path) -> None:
    import keras

    keras.backend.clear_session()
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    kernel, bias = model.trainable_variables
    wa = WeightAverage(model, start=2)
    seen = []
    for epoch, value in ((1, 100.0), (2, 1.0), (3, 2.0), (4, 6.0)):
        kernel.assign(np.full((3, 2), value, np.float32))
        bias.assign(np.full((2,), -value, np.float32))
        folded = wa.update(epoch)
        seen.append(folded)
    assert seen == [False, True, True, True]  # epoch 1 is before the start
    assert wa.count == 3
    np.testing.assert_allclose(wa.mean[0], np.full((3, 2), 3.0))
    np.testing.assert_allclose(wa.mean[1], np.full((2,), -3.0))
    raw = wa.snapshot()
    wa.apply([])  # no BN layers here: nothing to recompute
    np.testing.assert_allclose(np.asarray(kernel), 3.0)
    wa.restore(raw)
    np.testing.assert_allclose(np.asarray(kernel), 6.0)
    wa.save(tmp_path)
    again = WeightAverage(model, start=2)
    assert again.load(tmp_path) and again.count == 3
    np.testing.assert_allclose(again.mean[0], wa.mean[0])
    with pytest.raises(ValueError):
        WeightAverage(model, start=0)
    with pytest.raises(RuntimeError):
        WeightAverage(model, start=1).apply([])


def test_frozen_training_with_weight_averaging_and_style_mixing_resumes_and_records_it(
    workdir: Path,
    tiny_frozen_args: Callable[..., list[str]],  # noqa: F811  # the imported fixture
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ml.runtime import Classifier

    out = workdir / "model"
    args = tiny_frozen_args(
        "--weight-average", "2", "--patience", "10", "--learning-rate", "0.01",
        "--feature-mixstyle", "0.5",
    )  # fmt: skip
    assert main([*args, "--epochs", "3", "--no-finalise"]) == 0
    text = capsys.readouterr().out
    assert "mean of 1" in text and "mean of 2" in text and "mean of 3" not in text
    assert (out / "checkpoint" / AVERAGE_FILE).is_file()
    state = json.loads((out / "train_state.json").read_text())
    assert state["averaged_epochs"] in (1, 2) and state["best_epoch"] >= 2  # never epoch 1
    state["completed"] = False  # "interrupted" after epoch 3
    (out / "train_state.json").write_text(json.dumps(state))
    assert main([*args, "--epochs", "5"]) == 0
    text = capsys.readouterr().out
    assert "resumed after epoch 3" in text and "weight average resumed (2 epochs" in text
    assert "mean of 4" in text
    card = load_card(out)
    assert card["training"]["extra"]["weight_average"] == 2
    assert card["training"]["extra"]["feature_mixstyle"] == 0.5
    # the artifact holds a selected average, not the last raw weights of the run
    shipped = Classifier.load(out, engine="keras")
    assert shipped is not None
    import h5py

    def weights(path: Path) -> list[np.ndarray]:
        arrays: list[np.ndarray] = []
        with h5py.File(path, "r") as fh:
            fh.visititems(
                lambda _, obj: (
                    arrays.append(np.asarray(obj)) if isinstance(obj, h5py.Dataset) else None
                )
            )
        return arrays

    best, last = weights(out / "model.weights.h5"), weights(out / "checkpoint" / "last.weights.h5")
    assert len(best) == len(last)
    assert any(not np.allclose(a, b) for a, b in zip(best, last, strict=True))
