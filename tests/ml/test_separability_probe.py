"""The linear probe of benchmarks/separability.py (docs/benchmarks.md 7.3b): it must find a
real signal, find none in noise, and never score a patient group it was fitted on (a probe
that leaked groups across folds would report separability that is not there)."""

from __future__ import annotations

import importlib.util

import numpy as np

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location(
    "separability", REPO / "benchmarks" / "separability.py"
)
assert _spec is not None and _spec.loader is not None
separability = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(separability)


def _data(rng: np.random.Generator, n: int = 160, d: int = 32) -> tuple[np.ndarray, np.ndarray]:
    y = np.array([0, 1] * (n // 2))
    return rng.normal(size=(n, d)), y


def test_probe_finds_a_real_signal() -> None:
    rng = np.random.default_rng(1)
    x, y = _data(rng)
    x[:, 0] += 3.0 * y  # one feature carries the class
    auc, (lo, hi), best = separability.probe(x, y, np.arange(len(y)).astype(str), n_boot=200)
    assert auc > 0.9 and lo > 0.85 and best > 0.85


def test_probe_finds_nothing_in_noise() -> None:
    rng = np.random.default_rng(2)
    x, y = _data(rng)
    auc, (lo, hi), best = separability.probe(x, y, np.arange(len(y)).astype(str), n_boot=200)
    assert 0.3 < auc < 0.7 and lo < 0.5 < hi


def test_probe_does_not_leak_patient_groups() -> None:
    """Each patient group has its own look (a feature vector shared by its images) and one
    label; the look says nothing about the label across groups. Folds by image would let
    the probe recognise the patient (AUC near 1); folds by group must not."""
    rng = np.random.default_rng(3)
    n_groups, per_group = 40, 6
    looks = rng.normal(size=(n_groups, 32)) * 3.0
    labels = np.array([0, 1] * (n_groups // 2))
    x = np.repeat(looks, per_group, axis=0) + rng.normal(size=(n_groups * per_group, 32)) * 0.1
    y = np.repeat(labels, per_group)
    groups = np.repeat(np.arange(n_groups), per_group).astype(str)
    auc, _, _ = separability.probe(x, y, groups, n_boot=200)
    assert auc < 0.75
    leaky, _, _ = separability.probe(x, y, np.arange(len(y)).astype(str), n_boot=200)
    assert leaky > 0.9  # the same data split by image: the test above is not vacuous
