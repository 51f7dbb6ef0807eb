"""Rebuild a training folder from the files a GPU run (scripts/gpu_train.py) returned.

The device returns, in its $OUT folder:

* ``weights.part0`` .. ``weights.partN``: chunks of the best run's ``model.weights.h5``;
* ``summary.json``: every experiment's state/config, ``best`` (its name) and, in newer
  runs, ``best_files`` = {"history.csv": text, "config.json": text, "train_state.json": text};
* older runs: ``best_history.csv``, ``best_config.json``, ``best_train_state.json``;
* or the concatenated ``model.weights.h5`` itself instead of the parts.

This script concatenates the parts into ``OUT_DIR/model.weights.h5`` and writes
``history.csv``, ``config.json``, ``train_state.json`` (+ ``gpu_summary.json``) there, so
that ``cxr train --data ../shared/data/cxr --out OUT_DIR`` sees a completed run and only
finalises it (temperature on val, test metrics, model card).

Usage: python scripts/assemble_gpu_run.py RUN_FILES_DIR OUT_DIR [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)

PART_RE = re.compile(r"^weights\.part(\d+)$")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
FILES = ("history.csv", "config.json", "train_state.json")


def weight_parts(run: Path) -> list[Path]:
    parts = sorted(
        ((int(m.group(1)), p) for p in run.iterdir() if (m := PART_RE.match(p.name))),
    )
    if not parts:
        raise SystemExit(f"no weights.part* files in {run}")
    idx = [i for i, _ in parts]
    if idx != list(range(len(idx))):
        raise SystemExit(f"weight parts are not contiguous: {idx}")
    return [p for _, p in parts]


def best_files(run: Path) -> dict[str, str]:
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    out: dict[str, str] = {}
    embedded = summary.get("best_files") or {}
    for name in FILES:
        f = run / f"best_{name}"
        if f.is_file():
            out[name] = f.read_text()
        elif name in embedded:
            out[name] = embedded[name]
        else:
            raise SystemExit(f"{name} of the best run is neither best_{name} nor in summary.json")
    return out


def assemble(run: Path, out: Path, force: bool = False) -> str:
    out.mkdir(parents=True, exist_ok=True)
    whole = run / "model.weights.h5"
    if whole.is_file() and not any(run.glob("weights.part*")):  # already concatenated
        blob = whole.read_bytes()
    else:
        blob = b"".join(p.read_bytes() for p in weight_parts(run))
    if not blob.startswith(HDF5_SIGNATURE):
        raise SystemExit("assembled weights are not an HDF5 file")
    files = best_files(run)
    state = json.loads(files["train_state.json"])
    if not state.get("completed") and not force:
        raise SystemExit("the GPU run did not complete (train_state.json); use --force")
    tmp = out / "model.weights.h5.tmp"
    tmp.write_bytes(blob)
    tmp.replace(out / "model.weights.h5")
    for name, text in files.items():
        (out / name).write_text(text)
    if (run / "summary.json").is_file():
        summary = json.loads((run / "summary.json").read_text())
        summary.pop("best_files", None)
        (out / "gpu_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    digest = hashlib.sha256(blob).hexdigest()
    print(
        f"assembled {len(blob) / 1e6:.1f} MB weights (sha256 {digest[:12]}), "
        f"epochs_run {state.get('epochs_run')}, best_epoch {state.get('best_epoch')}, "
        f"best_val_loss {state.get('best_val_loss')} into {out}"
    )
    return digest


def check_loads(out: Path) -> None:
    """Build the model from config.json and load the weights (needs Keras)."""
    from ml.model import build_model
    from ml.train import TrainConfig

    cfg = TrainConfig.from_json((out / "config.json").read_text())
    model = build_model(
        image_size=cfg.image_size, head=cfg.head, dropout=cfg.dropout, backbone=cfg.backbone
    )
    model.load_weights(out / "model.weights.h5")
    print(f"weights load into {model.name} ({model.count_params():,} parameters)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="folder with the GPU run's returned files")
    ap.add_argument("out", type=Path, help="training/artifact folder to (re)build")
    ap.add_argument("--check", action="store_true", help="load the weights into the model")
    ap.add_argument("--force", action="store_true", help="accept an incomplete run")
    a = ap.parse_args(argv)
    assemble(a.run, a.out, a.force)
    if a.check:
        check_loads(a.out)
    print(f"next: cxr train --data ../shared/data/cxr --out {a.out}   (finalises only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
