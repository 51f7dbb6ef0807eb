"""The model artifact: a versioned folder with the weights and a model card.

Layout::

    model.weights.h5   Keras 3 weights of ml.model.build_model(...) (the inference model)
    model_card.json    class map, input size, preprocessing, architecture, temperature,
                       sha256 of the weights, data sources/licences, metrics with 95% CIs,
                       known limitations, intended use, disclaimer
    MODEL_CARD.md      short human-readable card rendered from the JSON

:func:`load_card` + :func:`verify_sha` check an artifact; :func:`build_model_from_card`
rebuilds the Keras model with its weights. :func:`make_tiny_artifact` writes a small,
deterministic artifact (tiny DenseNet-shaped backbone) for fast tests of other components.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.labels import CLASSES

if TYPE_CHECKING:  # pragma: no cover
    import keras

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.weights.h5"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
DISCLAIMER = "Research use only, not for diagnostic use."
CARD_SCHEMA_VERSION = 1


class ArtifactError(RuntimeError):
    """The model folder is missing files, or its weights do not match the card."""


class Card(dict):  # type: ignore[type-arg]
    """The model card dict; ``.path`` is the artifact folder it was read from."""

    path: Path | None = None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_card(image_size: int, architecture: Mapping[str, Any]) -> dict[str, Any]:
    from ml.preprocess import PreprocessConfig

    return {
        "schema_version": CARD_SCHEMA_VERSION,
        "name": "cxr-classifier",
        "version": "0",
        "classes": list(CLASSES),
        "image_size": image_size,
        "preprocessing": PreprocessConfig(size=image_size).to_dict(),
        "architecture": dict(architecture),
        "temperature": 1.0,
        "intended_use": (
            "Research triage of frontal (PA/AP) chest radiographs into COVID-19 / normal / "
            "other lung disease, beside a PACS. Not a medical device."
        ),
        "limitations": [],
        "disclaimer": DISCLAIMER,
    }


def save_artifact(
    model: keras.Model | None, out_dir: str | Path, card_fields: Mapping[str, Any]
) -> Path:
    """Write the weights (unless ``model`` is None: keep the folder's weights), hash them,
    and write ``model_card.json`` + ``MODEL_CARD.md``. Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    if model is not None:
        tmp = out / ("tmp." + WEIGHTS_FILE)
        model.save_weights(tmp)
        os.replace(tmp, weights)
    if not weights.is_file():
        raise ArtifactError(f"{weights} does not exist")
    arch = dict(card_fields.get("architecture", {}))
    size = int(card_fields.get("image_size", 0) or 0)
    if model is not None:
        size = size or int(model.inputs[0].shape[1])
    card = default_card(size, arch)
    card.update(card_fields)
    card["image_size"] = size
    card["classes"] = list(card.get("classes") or CLASSES)
    card["disclaimer"] = DISCLAIMER
    card["weights_file"] = WEIGHTS_FILE
    card["weights_sha256"] = sha256_file(weights)
    card["weights_bytes"] = weights.stat().st_size
    _atomic_write_text(out / CARD_JSON, json.dumps(card, indent=2, default=_json_default) + "\n")
    _atomic_write_text(out / CARD_MD, render_markdown(card))
    log.info("wrote model artifact %s (sha256 %s)", out, card["weights_sha256"][:12])
    return out


def _json_default(o: object) -> object:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_card(model_dir: str | Path) -> Card:
    d = Path(model_dir)
    p = d / CARD_JSON
    if not p.is_file():
        raise ArtifactError(f"{d} is not a model artifact (no {CARD_JSON})")
    try:
        card = Card(json.loads(p.read_text(encoding="utf-8")))
    except ValueError as exc:
        raise ArtifactError(f"{p} is not valid JSON: {exc}") from exc
    for key in ("classes", "image_size", "architecture", "weights_sha256"):
        if key not in card:
            raise ArtifactError(f"{p} lacks {key!r}")
    card.path = d
    return card


def verify_sha(model_dir: str | Path) -> bool:
    """True when the weights file exists and its sha256 equals the card's."""
    d = Path(model_dir)
    try:
        card = load_card(d)
    except ArtifactError:
        return False
    w = d / card.get("weights_file", WEIGHTS_FILE)
    expected: str = card["weights_sha256"]
    return w.is_file() and sha256_file(w) == expected


def build_model_from_card(card: Mapping[str, Any], model_dir: str | Path | None = None):  # type: ignore[no-untyped-def]
    """The Keras inference model described by ``card`` with the artifact's weights.

    ``model_dir`` defaults to the folder :func:`load_card` read the card from.
    """
    from ml.model import build_model

    d = Path(model_dir) if model_dir is not None else getattr(card, "path", None)
    if d is None:
        raise ArtifactError("build_model_from_card needs the artifact folder")
    arch = card.get("architecture", {})
    model = build_model(
        image_size=int(card["image_size"]),
        head=arch.get("head", "gap"),
        weights=None,
        dropout=float(arch.get("dropout", 0.3)),
        n_classes=len(card["classes"]),
        backbone=arch.get("backbone", "densenet169"),
    )
    model.load_weights(Path(d) / card.get("weights_file", WEIGHTS_FILE))
    return model


# --------------------------------------------------------------------------- markdown


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "n/a" if v is None else str(v)


def _metric_with_ci(metrics: Mapping[str, Any], key: str) -> str:
    v = metrics.get(key)
    ci = (metrics.get("ci") or {}).get(key)
    if v is None:
        return "n/a"
    return f"{_fmt(v)} ({_fmt(ci[0])}-{_fmt(ci[1])})" if ci else _fmt(v)


def render_markdown(card: Mapping[str, Any]) -> str:
    lines = [
        f"# Model card: {card.get('name', 'model')} {card.get('version', '')}".rstrip(),
        "",
        f"**{card.get('disclaimer', DISCLAIMER)}**",
        "",
        f"- Classes: {', '.join(card.get('classes', []))}",
        f"- Input: {card.get('image_size')} x {card.get('image_size')} px, 3 channels "
        "(grey repeated), 0..255",
        f"- Architecture: {json.dumps(card.get('architecture', {}))}",
        f"- Preprocessing: {json.dumps(card.get('preprocessing', {}))}",
        f"- Temperature (calibration): {_fmt(float(card.get('temperature', 1.0)))}",
        f"- Weights: `{card.get('weights_file', WEIGHTS_FILE)}`, sha256 "
        f"`{card.get('weights_sha256', '')}`",
    ]
    if card.get("intended_use"):
        lines += ["", "## Intended use", "", str(card["intended_use"])]
    metrics = card.get("metrics") or {}
    for split in ("test", "val"):
        m = metrics.get(split)
        if not m:
            continue
        lines += [
            "",
            f"## {split} metrics (n={m.get('n')}, 95% bootstrap CI in brackets)",
            "",
            f"- accuracy {_metric_with_ci(m, 'accuracy')}, macro F1 "
            f"{_metric_with_ci(m, 'macro_f1')}, ECE {_metric_with_ci(m, 'ece')}",
            "",
            "| class | precision | recall | F1 | specificity | AUC |",
            "|---|---|---|---|---|---|",
        ]
        for c, pc in (m.get("per_class") or {}).items():
            cells = [_fmt(pc.get(k)) for k in ("precision", "recall", "f1", "specificity", "auc")]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        per_source = m.get("per_source") or {}
        if per_source:
            lines += [
                "",
                "Per source (sources seen in training: a number here says little about a "
                "new hospital; see the cross-source table):",
                "",
                "| source | n | accuracy | recall per class | predicted | AUC within the source |",
                "|---|---|---|---|---|---|",
            ]
            for s, ps in sorted(per_source.items()):
                rec = ", ".join(f"{c} {_fmt(v)}" for c, v in (ps.get("recall") or {}).items())
                pred = ", ".join(f"{c} {v}" for c, v in (ps.get("predicted") or {}).items())
                auc = ", ".join(
                    f"{c} {_fmt(v)}" for c, v in (ps.get("auc_within_source") or {}).items()
                )
                lines.append(
                    f"| {s} | {ps.get('n')} | {_fmt(ps.get('accuracy'))} | {rec} | {pred} | "
                    f"{auc or '-'} |"
                )
        if m.get("ood"):
            lines += [
                "",
                f"Out-of-distribution flag: {_fmt(1 - float(m['ood']['pass_rate']))} of these "
                f"images flagged (threshold {_fmt(m['ood']['threshold'])}).",
            ]
        targets = m.get("targets")
        if targets:
            lines += ["", "Targets (classifier v2):", ""]
            lines += [
                f"- {k}: {_fmt(v.get('value'))} ({'met' if v.get('met') else '**NOT met**'})"
                for k, v in targets.items()
            ]
    cross = card.get("cross_source") or []
    if cross:
        lines += [
            "",
            "## Cross-source table (train without a source, test on it)",
            "",
            "Each arm is trained with the same recipe on the training split minus the "
            "left-out images (and anything sharing a patient group with them), then tested "
            "on every left-out image. This is the number that speaks for a new hospital.",
            "",
            "| left out | n | metric | value | predicted |",
            "|---|---|---|---|---|",
        ]
        for c in cross:
            pred = ", ".join(f"{k} {v}" for k, v in (c.get("predicted") or {}).items())
            lines.append(
                f"| {c.get('left_out')} | {c.get('n')} | {c.get('metric')} | "
                f"{_fmt(c.get('value'))} | {pred} |"
            )
    ood = card.get("ood") or {}
    if ood:
        lines += [
            "",
            "## Out-of-distribution flag",
            "",
            f"- method: {ood.get('method')}",
            f"- threshold {_fmt(ood.get('threshold'))}, set on the validation split so that "
            f"{_fmt(ood.get('coverage_target'))} of its images pass (val pass rate "
            f"{_fmt(ood.get('val_pass_rate'))}, test pass rate {_fmt(ood.get('test_pass_rate'))})",
            f'- above it every output says: "{ood.get("message")}"; the three '
            "probabilities are still given",
        ]
        if ood.get("checks"):
            lines += [f"- {k}: {v}" for k, v in ood["checks"].items()]
    if card.get("training_cost"):
        lines += ["", "## Training cost", ""]
        lines += [f"- {k}: {v}" for k, v in card["training_cost"].items()]
    data = card.get("data") or {}
    if data:
        lines += ["", "## Training data", ""]
        for k in ("root", "split", "split_counts"):
            if k in data:
                lines.append(
                    f"- {k}: {json.dumps(data[k]) if not isinstance(data[k], str) else data[k]}"
                )
        for s, info in sorted((data.get("sources") or {}).items()):
            lines.append(f"- source `{s}`: {info.get('n')} images; licence: {info.get('licence')}")
    training = card.get("training") or {}
    if training:
        lines += ["", "## Training", ""]
        lines += [
            f"- {k}: {f'{v:.4g}' if isinstance(v, float) else v}"
            for k, v in training.items()
            if not isinstance(v, dict)
        ]
        for k, v in (training.get("extra") or {}).items():  # free-text training notes
            lines.append(f"- {k.replace('_', ' ')}: {v}")
    if card.get("limitations"):
        lines += ["", "## Known limitations", ""]
        lines += [f"- {item}" for item in card["limitations"]]
    bench = card.get("engine_benchmark")
    if bench:
        lines += ["", "## Inference engine", "", f"{json.dumps(bench)}"]
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- tiny test artifact


def make_tiny_artifact(
    out_dir: str | Path, image_size: int = 64, seed: int = 0, temperature: float = 1.0
) -> Path:
    """A small deterministic artifact (tiny DenseNet-shaped backbone, random weights).

    For fast tests of components that load a model (worker, CLI): the same ``seed``
    gives the same weights and the same sha256.
    """
    import keras

    from ml.model import build_model

    keras.backend.clear_session()  # reset auto layer names: same seed -> same bytes/sha256
    keras.utils.set_random_seed(seed)
    model = build_model(image_size=image_size, backbone="tiny", head="gap", dropout=0.0)
    return save_artifact(
        model,
        out_dir,
        {
            "name": "cxr-tiny-test",
            "version": f"test-{seed}",
            "image_size": image_size,
            "architecture": {"backbone": "tiny", "head": "gap", "dropout": 0.0},
            "temperature": float(temperature),
            "limitations": ["Random weights: a test fixture, its outputs mean nothing."],
            "training": {"note": "untrained (random initialisation)"},
        },
    )
