"""Inference benchmark: Keras/TensorFlow next to ONNX Runtime on the same weights.

Reports, in one run:

* per image at batch 1: file decoding, preprocessing, forward pass, Grad-CAM (fast path:
  no backward pass; the gradient version for reference) - median of repeated runs;
* throughput (images/s, forward + CAM) at several batch sizes, and the best one;
* the ONNX Runtime / Keras ratios.

Model: the shipped artifact (``CXR_MODEL_DIR`` / ``ml/models/cxr-densenet169-v1``) when
present, else a freshly built DenseNet169 with random weights (same cost, meaningless
outputs) - the output says which. Images: real radiographs from ../shared/data/cxr when
present, else generated ones.

    python benchmarks/inference.py [--model DIR] [--batches 1,4,8,16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
log = logging.getLogger(__name__)


def _median_ms(fn: Any, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _images(n: int) -> tuple[list[Path], str]:
    data = REPO.parent / "shared" / "data" / "cxr"
    files = sorted(data.glob("*/*.png"))[:: max(1, len(sorted(data.glob("*/*.png"))) // n)][:n]
    if files:
        return files, f"{len(files)} real PNGs from {data}"
    import cv2

    d = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = d / f"gen{i}.png"
        cv2.imwrite(str(p), rng.integers(0, 255, (384, 320), np.uint8))
        out.append(p)
    return out, f"{n} generated 384x320 PNGs (../shared absent)"


def _model_dir(arg: str | None) -> tuple[Path, str]:
    from ml.artifact import CARD_JSON, load_card, save_artifact

    if arg:
        return Path(arg), f"artifact {arg}"
    from cxr.settings import get_settings

    shipped = Path(get_settings().model_dir)
    if (shipped / CARD_JSON).is_file():
        card = load_card(shipped)
        return shipped, f"shipped model {card.get('name')} {card.get('version')} ({shipped})"
    import keras

    from ml.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(image_size=256, backbone="densenet169", weights=None)
    d = Path(tempfile.mkdtemp(prefix="cxr-bench-model-"))
    save_artifact(
        model,
        d,
        {"name": "densenet169-random", "version": "bench", "image_size": 256,
         "architecture": {"backbone": "densenet169", "head": "gap", "dropout": 0.3}},
    )
    return d, "freshly built DenseNet169 with RANDOM weights (no shipped model found), 256 px"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model artifact (default: shipped or random)")
    ap.add_argument("--batches", default="1,4,8,16", help="batch sizes for throughput")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per measurement")
    ap.add_argument("--json", dest="json_out", type=Path, help="write the results as JSON")
    a = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING)

    from ml.gradcam import gradcam_gradient
    from ml.preprocess import grey_to_input, load_display
    from ml.runtime import Classifier

    batches = [int(b) for b in a.batches.split(",")]
    model_dir, model_desc = _model_dir(a.model)
    files, img_desc = _images(max(batches))
    cache = Path(tempfile.mkdtemp(prefix="cxr-bench-cache-"))
    t0 = time.perf_counter()
    engines = {"keras": Classifier.load(model_dir, engine="keras", cache_dir=cache)}
    t_keras = time.perf_counter() - t0
    t0 = time.perf_counter()
    engines["onnx"] = Classifier.load(model_dir, engine="onnx", cache_dir=cache)
    t_onnx_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    Classifier.load(model_dir, engine="onnx", cache_dir=cache)
    t_onnx_cached = time.perf_counter() - t0
    clf = engines["keras"]
    size = clf.image_size

    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"model : {model_desc}")
    print(f"images: {img_desc}; input {size}x{size}; machine: {cpu}")
    print(f"load  : keras {t_keras:.1f} s; onnx first load (export) {t_onnx_first:.1f} s, "
          f"cached {t_onnx_cached:.2f} s")

    displays = [load_display(f) for f in files]
    decode_ms = _median_ms(lambda: load_display(files[0]), a.reps)
    pre_ms = statistics.median(
        _median_ms(lambda d=d: clf.preprocess(d), a.reps) for d in displays[:8]
    )
    xs = np.stack([grey_to_input(clf.preprocess(d)) for d in displays])
    results: dict[str, Any] = {
        "model": model_desc,
        "images": img_desc,
        "machine": cpu,
        "image_size": size,
        "decode_ms": decode_ms,
        "preprocess_ms": pre_ms,
        "load_s": {"keras": t_keras, "onnx_export": t_onnx_first, "onnx_cached": t_onnx_cached},
        "engines": {},
    }
    for name, eng in engines.items():
        x1 = xs[:1]
        fwd = _median_ms(lambda e=eng, x=x1: e.forward(x), a.reps, warmup=2)
        feats, logits = eng.forward(x1)
        idx = int(np.argmax(logits[0]))
        cam = _median_ms(lambda e=eng, f=feats, x=x1, i=idx: e._cam(f[0], x[0], i), a.reps)
        e2e = _median_ms(lambda e=eng, d=displays[0]: e.predict_display(d), a.reps)
        thr = {}
        for b in batches:
            xb = xs[:b]

            def run(e: Classifier = eng, xb: np.ndarray = xb) -> None:
                f, z = e.forward(xb)
                for j in range(len(xb)):
                    e._cam(f[j], xb[j], int(np.argmax(z[j])))

            ms = _median_ms(run, max(2, a.reps // 2), warmup=1)
            thr[b] = len(xb) / (ms / 1000)
        best = max(thr, key=thr.__getitem__)
        results["engines"][name] = {
            "forward_ms_b1": fwd,
            "cam_fast_ms": cam,
            "predict_display_ms": e2e,
            "throughput_img_s": thr,
            "best_batch": best,
        }
    grad_ms = _median_ms(
        lambda: gradcam_gradient(clf.keras_model, xs[0], 0), max(2, a.reps // 2), warmup=1
    )
    results["cam_gradient_ms_keras"] = grad_ms

    k, o = results["engines"]["keras"], results["engines"]["onnx"]
    ratio_fwd = k["forward_ms_b1"] / o["forward_ms_b1"]
    ratio_thr = o["throughput_img_s"][o["best_batch"]] / k["throughput_img_s"][k["best_batch"]]
    results["onnx_speedup_forward_b1"] = ratio_fwd
    results["onnx_speedup_best_throughput"] = ratio_thr
    results["default_engine"] = "onnx" if ratio_thr >= 1.0 and ratio_fwd >= 1.0 else "keras"

    print(f"\nper image, batch 1 (median of {a.reps}):")
    print(f"  file decode (PNG/DICOM -> display)   {decode_ms:8.1f} ms")
    print(f"  preprocess (pad, resize, equalise)   {pre_ms:8.1f} ms")
    print(f"  {'':36} {'keras':>9} {'onnx':>9} {'keras/onnx':>11}")
    for key, label in (
        ("forward_ms_b1", "forward pass"),
        ("cam_fast_ms", "Grad-CAM fast path (no backward)"),
        ("predict_display_ms", "predict_display (all of the above)"),
    ):
        print(f"  {label:36} {k[key]:7.1f}ms {o[key]:7.1f}ms {k[key] / o[key]:10.2f}x")
    print(f"  Grad-CAM with a backward pass (keras, reference): {grad_ms:.1f} ms")
    print("\nthroughput, forward + CAM (images/s):")
    print("  batch " + "".join(f"{b:>9}" for b in batches))
    for name in ("keras", "onnx"):
        t = results["engines"][name]["throughput_img_s"]
        print(f"  {name:5} " + "".join(f"{t[b]:9.2f}" for b in batches)
              + f"   best batch {results['engines'][name]['best_batch']}")
    print(f"\nONNX Runtime vs Keras: {ratio_fwd:.2f}x at batch 1, {ratio_thr:.2f}x at the best "
          f"batch sizes -> default engine '{results['default_engine']}'")
    if a.json_out:
        a.json_out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
