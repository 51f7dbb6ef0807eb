"""Temperature scaling, ECE and the reliability diagram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml.calibration import ece, fit_temperature, nll, reliability_bins, reliability_diagram, softmax


def _sample(n: int, t_true: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose *true* class probabilities are softmax(logits / t_true)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3.0, (n, 3))
    p = softmax(logits, t_true)
    labels = np.array([rng.choice(3, p=row) for row in p])
    return logits, labels


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_true_temperature(t_true: float) -> None:
    logits, labels = _sample(6000, t_true)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(t_true, rel=0.1)
    assert nll(logits, labels, t) <= nll(logits, labels, 1.0) + 1e-9


def test_temperature_scaling_reduces_ece_of_overconfident_logits() -> None:
    logits, labels = _sample(6000, 2.5, seed=1)
    before = ece(softmax(logits), labels)
    t = fit_temperature(logits, labels)
    after = ece(softmax(logits, t), labels)
    assert before > 0.08
    assert after < 0.03
    # temperature never changes the predicted class
    assert (softmax(logits, t).argmax(1) == logits.argmax(1)).all()


def test_ece_hand_computed() -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.2, 0.6, 0.2], [0.2, 0.6, 0.2]])
    labels = np.array([0, 1, 1, 1])
    # bin of 0.9: accuracy 0.5, confidence 0.9 -> gap 0.4 (weight 1/2)
    # bin of 0.6: accuracy 1.0, confidence 0.6 -> gap 0.4 (weight 1/2)
    assert ece(probs, labels) == pytest.approx(0.4)
    perfect = np.tile([1.0, 0.0, 0.0], (5, 1))
    assert ece(perfect, np.zeros(5, int)) == pytest.approx(0.0)
    bins = reliability_bins(probs, labels)
    assert sum(b["n"] for b in bins) == 4 and len(bins) == 15


def test_reliability_diagram_png(tmp_path: Path) -> None:
    logits, labels = _sample(300, 2.0)
    png = reliability_diagram(softmax(logits), labels, tmp_path / "rel" / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_temperature_needs_data() -> None:
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, int))
