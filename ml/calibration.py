"""Calibration: temperature scaling (Guo et al. 2017), ECE and reliability diagrams.

Focal loss and class weights both distort the softmax, so the probabilities shown to
radiologists are ``softmax(logits / T)`` with ``T`` fitted on the validation split by
minimising the negative log-likelihood.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

N_BINS = 15
T_BOUNDS = (0.05, 20.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    p: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return p


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer ``labels`` under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray | Sequence[int]) -> float:
    """The T > 0 minimising validation NLL (bounded 1-D search on log T)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("no validation samples to fit the temperature on")
    res = minimize_scalar(
        lambda lt: nll(logits, labels, float(np.exp(lt))),
        bounds=tuple(np.log(T_BOUNDS)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    t = float(np.exp(res.x))
    log.info(
        "temperature %.4f: val NLL %.4f -> %.4f", t, nll(logits, labels), nll(logits, labels, t)
    )
    return t


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error of the top-1 confidence (equal-width bins)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            total += m.sum() / len(labels) * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS
) -> list[dict[str, float]]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        out.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "n": int(m.sum()),
                "confidence": float(conf[m].mean()) if m.any() else float("nan"),
                "accuracy": float(correct[m].mean()) if m.any() else float("nan"),
            }
        )
    return out


def reliability_diagram(
    probs: np.ndarray,
    labels: np.ndarray,
    png: str | Path,
    n_bins: int = N_BINS,
    title: str = "Reliability diagram",
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = reliability_bins(probs, labels, n_bins)
    e = ece(probs, labels, n_bins)
    fig, ax = plt.subplots(figsize=(5, 5))
    width = 1.0 / n_bins
    centres = [b["lo"] + width / 2 for b in bins]
    accs = [0.0 if b["n"] == 0 else b["accuracy"] for b in bins]
    ax.bar(centres, accs, width=width * 0.95, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE ({n_bins} bins) = {e:.3f}", fontsize=10)
    ax.legend(loc="upper left")
    fig.text(0.5, 0.01, "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE", ha="center", fontsize=7)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
