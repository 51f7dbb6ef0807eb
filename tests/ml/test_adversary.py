"""The class-conditional source adversary (``cxr train --source-adversary``): which images
take part, that the reversal pushes the features *against* the adversary, and that a
frozen-trunk run with it trains, resumes and ships the plain classifier."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from apps.cli import main
from ml.adversary import ADVERSARY_WEIGHTS, SourceAdversary, ramp, source_targets
from ml.artifact import load_card
from ml.labels import CLASSES
from ml.runtime import Classifier

from .conftest import TINY_SIZE
from .test_frozen import three_source_folder, tiny_frozen_args  # noqa: F401  # fixtures


def test_source_targets_only_classes_with_two_sources_take_part() -> None:
    labels = np.asarray([0, 0, 1, 1, 2])
    ids, mask, names = source_targets(labels, ["a", "b", "c", "c", ""])
    assert names == ["a", "b", "c", "unknown"]
    assert ids.tolist() == [0, 1, 2, 2, 3]
    # class 0 has sources a and b; classes 1 and 2 have one source each
    assert mask.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_ramp_reaches_lambda_and_stays() -> None:
    assert ramp(0.6, 0) == pytest.approx(0.2)
    assert ramp(0.6, 2) == pytest.approx(0.6)
    assert ramp(0.6, 9) == pytest.approx(0.6)
    assert ramp(0.0, 5) == 0.0


def _adv_loss(adv: SourceAdversary, x: np.ndarray, y: np.ndarray, src: np.ndarray) -> float:
    import tensorflow as tf

    pooled, _ = adv.head(x, training=True)  # batch statistics, as in the train step
    logits = adv.adversary([pooled, tf.constant(y)], training=False)
    per = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=src, logits=logits)
    return float(tf.reduce_mean(per))


@pytest.mark.parametrize("lam", [0.0, 20.0])
def test_reversal_moves_the_features_against_the_adversary(lam: float, tmp_path: Path) -> None:
    """From the same weights, three joint steps with a large reversal weight leaves the
    (unchanged) adversary worse at naming the source than steps without reversal."""
    import keras

    from ml.frozen import cut_layer, split_model
    from ml.model import build_model
    from ml.train import TrainConfig, make_loss

    def one_step(weight: float) -> float:
        keras.backend.clear_session()
        keras.utils.set_random_seed(3)
        model = build_model(image_size=TINY_SIZE, backbone="tiny", head="gap", dropout=0.0)
        trunk, _, _ = split_model(model)
        rng = np.random.default_rng(0)
        img = rng.uniform(-1, 1, (32, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
        src = np.asarray([0, 1] * 16, np.int64)
        img[src == 1] += 0.5  # source 1 is brighter: a source signal in the features
        x = np.asarray(trunk(img, training=False))
        y = np.eye(len(CLASSES), dtype=np.float32)[np.zeros(32, np.int64)]
        adv = SourceAdversary(
            model, 2, len(CLASSES), 1e-2, make_loss(TrainConfig()), cut_layer(model)
        )
        # teach the adversary first (no reversal), then freeze it for the comparison
        for _ in range(15):
            adv.fit_epoch(x, y, None, src, np.ones(32, np.float32), 0.0, 32)
        before = [w.copy() for w in adv.adversary.get_weights()]
        base = _adv_loss(adv, x, y, src)
        for _ in range(3):  # three head steps against the frozen adversary
            adv.fit_epoch(x, y, None, src, np.ones(32, np.float32), weight, 32)
            adv.adversary.set_weights(before)
        rise = _adv_loss(adv, x, y, src) - base
        print(f"lambda {weight}: adversary loss rise {rise:.4f}")
        return rise

    if lam == 0.0:
        # without reversal the head has no reason to hide the source: the adversary's
        # loss does not rise by more than noise
        assert one_step(0.0) < 0.01
    else:
        assert one_step(lam) > one_step(0.0) + 0.05


def test_frozen_training_with_the_adversary_resumes_and_ships_the_plain_model(
    workdir: Path,
    tiny_frozen_args: Callable[..., list[str]],  # noqa: F811  # the imported fixture
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = workdir / "model"
    args = tiny_frozen_args(
        "--source-adversary", "0.5", "--patience", "5",
    )  # fmt: skip
    assert main([*args, "--epochs", "1", "--no-finalise"]) == 0
    text = capsys.readouterr().out
    assert "adversary loss" in text and "lambda 0.17" in text
    assert (out / "checkpoint" / ADVERSARY_WEIGHTS).is_file()
    state = json.loads((out / "train_state.json").read_text())
    state["completed"] = False  # "interrupted" after epoch 1
    (out / "train_state.json").write_text(json.dumps(state))
    assert main([*args, "--epochs", "3"]) == 0
    text = capsys.readouterr().out
    assert "resumed after epoch 1" in text and "source adversary resumed" in text
    assert "lambda 0.50" in text  # epoch 3: the ramp is done
    card = load_card(out)
    assert card["training"]["extra"]["source_adversary"] == 0.5
    # the shipped artifact is the plain classifier: no adversary inside it
    clf = Classifier.load(out, engine="keras")
    p = clf.predict_display(np.full((80, 64), 128, np.uint8))
    assert set(p.probabilities) == set(CLASSES)
    assert not (out / ADVERSARY_WEIGHTS).exists()
