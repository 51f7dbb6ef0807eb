"""The OOD detector's arithmetic (ml/ood.py): fit, score, threshold, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml.ood import MahalanobisOOD, threshold_for


def test_scores_far_points_higher_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(m, 0.002, (40, 30)) for m in (0.0, 0.01, 0.02)])  # tiny
    y = np.repeat([0, 1, 2], 40)
    det = MahalanobisOOD.fit(x, y, n_components=1024)  # capped at N - 1 and C
    assert det.components.shape == (30, 30)
    inside = det.score(rng.normal(0.01, 0.002, (20, 30)))
    outside = det.score(rng.normal(0.2, 0.01, (20, 30)))
    assert np.isfinite(inside).all() and outside.min() > inside.max()
    det.threshold = threshold_for(inside)
    assert np.mean(inside <= det.threshold) >= 0.95
    det.save(tmp_path / "ood.npz")
    back = MahalanobisOOD.load(tmp_path / "ood.npz")
    np.testing.assert_allclose(back.score(x[:10]), det.score(x[:10]), rtol=2e-2)
    assert back.threshold == det.threshold
    assert np.max(np.abs(det.precision)) > 65504  # would overflow float16 unscaled


def test_threshold_needs_scores() -> None:
    with pytest.raises(ValueError):
        threshold_for(np.array([]))
    with pytest.raises(ValueError):
        threshold_for(np.array([1.0]), coverage=1.5)
