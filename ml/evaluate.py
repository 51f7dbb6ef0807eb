"""Honest evaluation: accuracy, per-class precision/recall/F1/specificity/one-vs-rest ROC
AUC, macro F1, ECE, confusion matrix, ROC curves, reliability diagram, bootstrap 95%
confidence intervals (percentile, resampling images), and a per-``source`` breakdown.

JSON keys (:func:`compute_metrics`): ``accuracy``, ``macro_f1``, ``ece``, ``n``,
``per_class.{COVID,Normal,Other}.{precision,recall,f1,specificity,auc}``, plus ``ci``
(same keys, ``[lo, hi]``), ``confusion_matrix`` (rows = truth, columns = prediction),
``per_source`` and ``classes``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ml.calibration import ece, reliability_diagram
from ml.labels import CLASSES

log = logging.getLogger(__name__)

N_BOOTSTRAP = 1000
PER_CLASS_KEYS = ("precision", "recall", "f1", "specificity", "auc")
DISCLAIMER_TEXT = "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE"


def _div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def confusion(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, score))


def point_metrics(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    k = len(classes)
    preds = probs.argmax(axis=1)
    cm = confusion(labels, preds, k)
    n = int(cm.sum())
    per_class: dict[str, dict[str, float]] = {}
    for c, name in enumerate(classes):
        tp = cm[c, c]
        fp = cm[:, c].sum() - tp
        fn = cm[c, :].sum() - tp
        tn = n - tp - fp - fn
        p, r = _div(tp, tp + fp), _div(tp, tp + fn)
        per_class[name] = {
            "precision": p,
            "recall": r,
            "f1": _div(2 * tp, 2 * tp + fp + fn),
            "specificity": _div(tn, tn + fp),
            "auc": _auc((labels == c).astype(int), probs[:, c]),
            "support": int(cm[c, :].sum()),
        }
    f1s = [v["f1"] for v in per_class.values()]
    return {
        "n": n,
        "accuracy": _div(np.trace(cm), n),
        "macro_f1": float(np.nanmean(f1s)) if not all(math.isnan(f) for f in f1s) else float("nan"),
        "ece": ece(probs, labels),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def bootstrap_ci(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Percentile bootstrap CIs of every metric (resampling images with replacement)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    samples: dict[str, list[float]] = {"accuracy": [], "macro_f1": [], "ece": []}
    per: dict[str, dict[str, list[float]]] = {c: {k: [] for k in PER_CLASS_KEYS} for c in classes}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        m = point_metrics(probs[idx], labels[idx], classes)
        for key in samples:
            samples[key].append(m[key])
        for c in classes:
            for key in PER_CLASS_KEYS:
                per[c][key].append(m["per_class"][c][key])

    def interval(vals: list[float]) -> list[float] | None:
        a = np.asarray(vals, dtype=np.float64)
        a = a[~np.isnan(a)]
        if len(a) < n_boot * 0.5:
            return None
        return [float(np.quantile(a, alpha / 2)), float(np.quantile(a, 1 - alpha / 2))]

    out: dict[str, Any] = {k: interval(v) for k, v in samples.items()}
    out["per_class"] = {c: {k: interval(v) for k, v in per[c].items()} for c in classes}
    out["method"] = f"percentile bootstrap, {n_boot} resamples of images, seed {seed}"
    return out


def compute_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str] = CLASSES,
    sources: Sequence[str] | None = None,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("nothing to evaluate")
    m = point_metrics(probs, labels, classes)
    m["classes"] = list(classes)
    if n_boot > 0:
        m["ci"] = bootstrap_ci(probs, labels, classes, n_boot=n_boot, seed=seed)
    if sources is not None and any(sources):
        src = np.asarray([s or "unknown" for s in sources])
        per_source = {}
        for s in sorted(set(src.tolist())):
            sel = src == s
            preds = probs[sel].argmax(1)
            counts = {classes[c]: int((labels[sel] == c).sum()) for c in range(len(classes))}
            recall = {
                classes[c]: _div(((preds == c) & (labels[sel] == c)).sum(), counts[classes[c]])
                for c in range(len(classes))
                if counts[classes[c]]
            }
            per_source[s] = {
                "n": int(sel.sum()),
                "accuracy": float((preds == labels[sel]).mean()),
                "class_counts": counts,
                "recall": recall,
                "predicted": {classes[c]: int((preds == c).sum()) for c in range(len(classes))},
            }
            present = [c for c in range(len(classes)) if counts[classes[c]]]
            if len(present) > 1:  # can the model tell the classes apart WITHIN this source?
                per_source[s]["auc_within_source"] = {
                    classes[c]: _auc((labels[sel] == c).astype(int), probs[sel][:, c])
                    for c in present
                }
        m["per_source"] = per_source
    return m


def targets(
    m: dict[str, Any], cross_source: Sequence[dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Classifier v2's targets on the held-out test split (and the cross-source table),
    met or not."""
    covid = m["per_class"].get("COVID", {}).get("recall", float("nan"))
    out = {
        "accuracy>=0.90": {"value": m["accuracy"], "met": bool(m["accuracy"] >= 0.90)},
        "COVID recall>=0.97": {"value": covid, "met": bool(covid >= 0.97)},
        "ECE<=0.05": {"value": m["ece"], "met": bool(m["ece"] <= 0.05)},
    }
    for src in ("darkcovidnet-nih", "jsrt"):
        r = (m.get("per_source") or {}).get(src, {}).get("recall", {}).get("Normal")
        if r is not None:
            out[f"Normal recall>=0.80 on {src}"] = {"value": r, "met": bool(r >= 0.80)}
    for cell in cross_source or []:
        v = cell.get("value")
        out[f"left-out {cell['left_out']} {cell['metric']}>=0.80"] = {
            "value": v,
            "met": bool(v is not None and v >= 0.80),
        }
    return out


def json_clean(o: Any) -> Any:
    """NaN/inf -> None, NumPy -> Python, recursively (strict JSON)."""
    if isinstance(o, dict):
        return {str(k): json_clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [json_clean(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


# --------------------------------------------------------------------------- plots


def _plt() -> Any:
    """matplotlib.pyplot on the Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, classes: Sequence[str], png: Path, title: str) -> Path:
    plt = _plt()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            colour = "white" if cm[i, j] > cm.max() / 2 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=colour)
    ax.set_title(title, fontsize=10)
    fig.text(0.5, 0.01, DISCLAIMER_TEXT, ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def plot_roc(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], png: Path, title: str
) -> Path:
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(classes):
        y = (labels == c).astype(int)
        if y.min() == y.max():
            continue
        fpr, tpr, _ = roc_curve(y, probs[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title + " - one-vs-rest ROC", fontsize=10)
    ax.legend(loc="lower right")
    fig.text(0.5, 0.01, DISCLAIMER_TEXT, ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def write_report(
    metrics: dict[str, Any],
    probs: np.ndarray,
    labels: np.ndarray,
    report_dir: str | Path,
    title: str = "evaluation",
) -> dict[str, str]:
    """Confusion matrix, ROC and reliability PNGs + metrics.json into ``report_dir``."""
    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    classes = metrics.get("classes", list(CLASSES))
    files = {
        "confusion_matrix": plot_confusion(
            np.asarray(metrics["confusion_matrix"]), classes, d / "confusion_matrix.png", title
        ),
        "roc": plot_roc(probs, labels, classes, d / "roc.png", title),
        "reliability": reliability_diagram(probs, labels, d / "reliability.png", title=title),
    }
    (d / "metrics.json").write_text(json.dumps(json_clean(metrics), indent=2) + "\n")
    return {k: str(v) for k, v in files.items()}


# --------------------------------------------------------------------------- model on samples


def predict_samples(clf: Any, samples: Sequence[Any], batch_size: int = 16) -> np.ndarray:
    """Logits of a :class:`ml.runtime.Classifier` on labelled samples (tf.data decoding)."""
    return predict_samples_pooled(clf, samples, batch_size)[0]


def predict_samples_pooled(
    clf: Any, samples: Sequence[Any], batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K), pooled last-conv features (N, C)) through the serving runtime."""
    from ml.tfdata import load_arrays

    greys, _ = load_arrays(samples, clf.preprocess_config, batch_size=64)
    logits, pooled = [], []
    for i in range(0, len(greys), batch_size):
        x = np.repeat(greys[i : i + batch_size, ..., None], 3, axis=-1).astype(np.float32)
        f, lg = clf.forward(x)
        logits.append(np.asarray(lg))
        pooled.append(np.asarray(f).mean(axis=(1, 2)))
    if not logits:
        return np.zeros((0, len(clf.classes)), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(logits), np.concatenate(pooled)


def format_summary(m: dict[str, Any]) -> str:
    ci = m.get("ci") or {}

    def num(v: Any) -> str:
        return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.3f}"

    def f(key: str) -> str:
        c = ci.get(key)
        return num(m[key]).strip() + (f" [{c[0]:.3f}, {c[1]:.3f}]" if c else "")

    lines = [f"n={m['n']}  accuracy {f('accuracy')}  macro F1 {f('macro_f1')}  ECE {f('ece')}"]
    lines.append(f"{'class':8} {'prec':>6} {'recall':>6} {'F1':>6} {'spec':>6} {'AUC':>6}")
    for c, pc in m["per_class"].items():
        vals = " ".join(num(pc[k]) for k in PER_CLASS_KEYS)
        lines.append(f"{c:8} {vals}")
    for s, ps in (m.get("per_source") or {}).items():
        lines.append(f"  source {s}: n={ps['n']} accuracy {ps['accuracy']:.3f}")
    return "\n".join(lines)
