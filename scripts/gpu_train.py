"""Train the shipped model on a GPU box (no TensorFlow there: Keras 3 on JAX or torch).

Runs a small, time-boxed comparison (equalisation: hist vs CLAHE; head: GAP vs the
study's Flatten head) with the same ml.train.fit used by ``cxr train``, keeps the best
shippable run by validation loss/accuracy, and writes it to $OUT as <16 MiB chunks plus
a JSON summary. Locally, ``scripts/assemble_gpu_run.py`` rebuilds the training folder
and ``cxr train`` then finalises it (temperature, test metrics, model card).

Input: .devdata/ from scripts/export_devdata.py (train+val only; the test split never
leaves this machine).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import traceback
from pathlib import Path

T0 = time.monotonic()
BUDGET = float(os.environ.get("GPU_BUDGET_S", "470"))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
OUT.mkdir(parents=True, exist_ok=True)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def left() -> float:
    return BUDGET - (time.monotonic() - T0)


def log(*a: object) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s]", *a, flush=True)


def main() -> int:
    import keras
    import numpy as np

    from ml.labels import CLASSES
    from ml.preprocess import PreprocessConfig, display_to_model_grey
    from ml.train import TrainConfig, fit, one_hot, read_state

    log("backend", keras.backend.backend(), "keras", keras.__version__)
    if os.environ.get("GPU_MIXED", "1") == "1":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    import cv2

    rows = list(csv.DictReader(open(".devdata/index.csv")))
    raw = {r["file"]: cv2.imread(f".devdata/img/{r['file']}", cv2.IMREAD_GRAYSCALE) for r in rows}
    log("loaded", len(raw), "images")

    def arrays(split: str, eq: str) -> tuple[np.ndarray, np.ndarray]:
        cfg = PreprocessConfig(size=256, equalization=eq)  # type: ignore[arg-type]
        sel = [r for r in rows if r["split"] == split]
        if os.environ.get("GPU_SUBSET"):
            sel = sel[:: max(1, len(sel) // int(os.environ["GPU_SUBSET"]))]
        x = np.stack([display_to_model_grey(raw[r["file"]], cfg) for r in sel])
        x = np.repeat(x[..., None], 3, axis=-1)  # uint8, cast to float in the model
        y = one_hot(np.array([CLASSES.index(r["label"]) for r in sel]))
        return x, y

    epochs = int(os.environ.get("GPU_EPOCHS", "80"))
    experiments = [
        # (name, equalization, head, seconds); the two shippable arms get equal time
        ("gap_hist", "hist", "gap", float(os.environ.get("GPU_ARM_S", "185"))),
        ("gap_clahe", "clahe", "gap", float(os.environ.get("GPU_ARM_S", "185"))),
        ("study_hist", "hist", "study", 1e9),
    ]
    summary: dict[str, dict] = {}
    for name, eq, head, seconds in experiments:
        budget = min(seconds, left() - 25)
        if budget < 60:
            log("skip", name, "(budget)")
            continue
        try:
            xtr, ytr = arrays("train", eq)
            xva, yva = arrays("val", eq)
            cfg = TrainConfig(
                image_size=256,
                epochs=epochs,
                batch_size=32,
                head=head,
                loss="focal",
                learning_rate=float(os.environ.get("GPU_LR", "1e-3")),
                patience=15,
                equalization=eq,
                class_weights=False,
                max_minutes=budget / 60,
                extra={"device": "gpu", "experiment": name},
            )
            run_dir = Path("/tmp/runs") / name
            log("start", name, "budget", round(budget), "s")
            fit(
                cfg,
                run_dir,
                (xtr, ytr),
                (xva, yva),
                class_weight=None,
                verbose=2,
            )
            st = read_state(run_dir)
            summary[name] = {"state": st, "config": json.loads(cfg.to_json())}
            log("done", name, json.dumps(st))
        except Exception:
            traceback.print_exc()
            summary[name] = {"error": traceback.format_exc()[-2000:]}
        (OUT / "summary.json").write_text(json.dumps(summary, indent=2))

    shippable = {k: v for k, v in summary.items() if "state" in v and k.startswith("gap_")}
    if not shippable:
        log("no shippable run")
        return 1
    best = min(shippable, key=lambda k: shippable[k]["state"].get("best_val_loss", 1e9))
    log("best", best)
    run_dir = Path("/tmp/runs") / best
    blob = (run_dir / "model.weights.h5").read_bytes()
    chunk = 15 * 1024 * 1024
    for i in range(0, len(blob), chunk):
        (OUT / f"weights.part{i // chunk}").write_bytes(blob[i : i + chunk])
    summary["best"] = best  # type: ignore[assignment]
    summary["best_files"] = {  # type: ignore[assignment]
        f: (run_dir / f).read_text() for f in ("history.csv", "config.json", "train_state.json")
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
