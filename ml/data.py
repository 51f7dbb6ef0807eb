"""Labelled image folders, manifests and leak-free splits.

Layouts read by :func:`scan_folder`:

* ours: ``COVID/``, ``Normal/``, ``Other/``;
* Kaggle COVID-19 Radiography Database: ``COVID``, ``Normal``, ``Lung_Opacity``,
  ``Viral Pneumonia`` with or without ``images/`` subfolders (``masks/`` are skipped).
  As in the study, Lung_Opacity and Viral Pneumonia become ``Other``.

Splits (:func:`split_samples`): with a manifest ``group`` column the split is by group
(same patient / near-duplicate never crosses splits), stratified by class; otherwise a
stratified 70/10/20 split by image with seed 42, as in the study.
"""

from __future__ import annotations

import csv
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ml.labels import CLASSES
from ml.preprocess import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

FOLDER_TO_CLASS = {
    "covid": "COVID",
    "covid-19": "COVID",
    "normal": "Normal",
    "other": "Other",
    "lung_opacity": "Other",
    "lung opacity": "Other",
    "viral pneumonia": "Other",
    "viral_pneumonia": "Other",
}
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
DEFAULT_SEED = 42


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    source: str = ""
    group: str = ""
    licence: str = ""

    @property
    def label_index(self) -> int:
        return CLASSES.index(self.label)


def _image_files(folder: Path) -> Iterable[Path]:
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES | {".dcm"}:
            continue
        rel = p.relative_to(folder).parts
        if any(part.lower() == "masks" for part in rel[:-1]):
            continue
        yield p


def scan_folder(root: str | Path) -> list[Sample]:
    """List labelled images under ``root`` (class subfolders, see module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    samples: list[Sample] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = FOLDER_TO_CLASS.get(sub.name.lower())
        if label is None:
            log.info("skipping folder %s (not a class folder)", sub.name)
            continue
        samples.extend(Sample(path=p, label=label) for p in _image_files(sub))
    if not samples:
        raise ValueError(f"no labelled images under {root}")
    return samples


def read_manifest(path: str | Path) -> dict[str, dict[str, str]]:
    """Manifest rows keyed by the file path relative to the data root."""
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["file"]: row for row in csv.DictReader(fh)}


def attach_manifest(
    samples: Sequence[Sample], root: str | Path, manifest: str | Path | None = None
) -> list[Sample]:
    """Fill source/group/licence from ``manifest`` (default ``root/manifest.csv``)."""
    root = Path(root)
    mpath = Path(manifest) if manifest else root / "manifest.csv"
    if not mpath.is_file():
        return list(samples)
    rows = read_manifest(mpath)
    out = []
    for s in samples:
        row = rows.get(s.path.relative_to(root).as_posix())
        if row is None:
            out.append(s)
            continue
        if row.get("label") and FOLDER_TO_CLASS.get(row["label"].lower(), s.label) != s.label:
            log.warning("manifest label disagrees with folder for %s", s.path.name)
        out.append(
            replace(
                s,
                source=row.get("source", "") or "",
                group=row.get("group", "") or "",
                licence=row.get("licence", "") or "",
            )
        )
    return out


def load_samples(root: str | Path, manifest: str | Path | None = None) -> list[Sample]:
    return attach_manifest(scan_folder(root), root, manifest)


def split_samples(
    samples: Sequence[Sample],
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
) -> dict[str, list[Sample]]:
    """Stratified split; by ``group`` when every sample has one (no leakage)."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError("split fractions must sum to 1")
    by_group = all(s.group for s in samples)
    units: dict[str, list[Sample]] = defaultdict(list)
    for i, s in enumerate(samples):
        units[s.group if by_group else f"__{i}"].append(s)
    # stratify units by their majority label
    per_class: dict[str, list[str]] = defaultdict(list)
    for key, members in sorted(units.items()):
        label = Counter(m.label for m in members).most_common(1)[0][0]
        per_class[label].append(key)
    rng = random.Random(seed)
    out: dict[str, list[Sample]] = {k: [] for k in SPLITS}
    for label in sorted(per_class):
        keys = per_class[label]
        rng.shuffle(keys)
        total = sum(len(units[k]) for k in keys)
        bounds = (fractions[0] * total, (fractions[0] + fractions[1]) * total)
        seen = 0
        for k in keys:
            n = len(units[k])
            mid = seen + n / 2.0  # assign by the unit's midpoint: balanced rounding
            split = "train" if mid <= bounds[0] else "val" if mid <= bounds[1] else "test"
            out[split].extend(units[k])
            seen += n
    for k in SPLITS:
        out[k].sort(key=lambda s: str(s.path))
    log.info(
        "split %s: %s",
        "by group" if by_group else "by image",
        {k: len(v) for k, v in out.items()},
    )
    return out


def class_weights(samples: Sequence[Sample]) -> dict[int, float]:
    """Balanced weights n / (k * n_c), as scikit-learn's ``class_weight='balanced'``."""
    counts = Counter(s.label_index for s in samples)
    n, k = len(samples), len(CLASSES)
    return {c: n / (k * counts[c]) for c in range(k) if counts[c]}
