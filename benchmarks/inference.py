"""Inference benchmark: Keras/TensorFlow next to ONNX Runtime on the same weights.

Reports, in one run:

* per image at batch 1: file decoding, preprocessing, forward pass, Grad-CAM (fast path:
  no backward pass; the gradient version for reference) - median of repeated runs;
* throughput (images/s, forward + CAM) at several batch sizes, and the best one;
* the ONNX Runtime / Keras ratios.

Model: the shipped artifact (``CXR_MODEL_DIR`` / ``ml/models/cxr-densenet169-v2``) when
present, else a freshly built DenseNet169 with random weights (same cost, meaningless
outputs) - the output says which. Images: real radiographs from ../shared/data/cxr when
present, else generated ones.

    python benchmarks/inference.py [--model DIR] [--baseline DIR] [--batches 1,4,8,16]
                                   [--json OUT]
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


_STARTUP = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from ml.runtime import Classifier
clf = Classifier.load(sys.argv[1], engine=sys.argv[2], cache_dir=sys.argv[3])
t1 = time.perf_counter()
clf.predict_display(np.full((384, 320), 128, np.uint8))
t2 = time.perf_counter()
# VmHWM (peak RSS of this process image); ru_maxrss would include the forking parent's
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status")
              if line.startswith("VmHWM:"))
print(json.dumps({"import_and_load_s": t1 - t0, "first_predict_s": t2 - t1,
                  "peak_rss_mb": hwm_kb / 1024,
                  "imports_tensorflow": "tensorflow" in sys.modules}))
"""


def _startup(model_dir: Path, engine: str, cache: Path) -> dict[str, Any]:
    """A fresh process's cost to load the model and classify once (the worker's start-up)."""
    import subprocess

    res = subprocess.run(
        [sys.executable, "-c", _STARTUP, str(model_dir), engine, str(cache)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


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
        {
            "name": "densenet169-random",
            "version": "bench",
            "image_size": 256,
            "architecture": {"backbone": "densenet169", "head": "gap", "dropout": 0.3},
        },
    )
    return d, "freshly built DenseNet169 with RANDOM weights (no shipped model found), 256 px"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model artifact (default: shipped or random)")
    ap.add_argument("--batches", default="1,4,8,16", help="batch sizes for throughput")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per measurement")
    ap.add_argument("--json", dest="json_out", type=Path, help="write the results as JSON")
    ap.add_argument(
        "--record-in-card",
        action="store_true",
        help="store a summary as 'engine_benchmark' in the measured artifact's model card",
    )
    ap.add_argument(
        "--baseline",
        default=None,
        help="a second artifact (e.g. the previous model version) measured in the same run: "
        "per-image predict_display (preprocess + forward + OOD score + CAM), ONNX Runtime",
    )
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
    print(
        f"images: {img_desc}; input {size}x{size}; machine: {cpu}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"load  : keras {t_keras:.1f} s; onnx first load (export) {t_onnx_first:.1f} s, "
        f"cached {t_onnx_cached:.2f} s"
    )

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
        "load_average_1min_start": os.getloadavg()[0],
        "image_size": size,
        "decode_ms": decode_ms,
        "preprocess_ms": pre_ms,
        "load_s": {"keras": t_keras, "onnx_export": t_onnx_first, "onnx_cached": t_onnx_cached},
        "engines": {},
    }

    # engines are measured interleaved (keras, onnx, keras, ...) so that load from other
    # processes hits both alike; median and min are reported
    def interleaved(make: Any, reps: int, warmup: int = 1) -> dict[str, dict[str, float]]:
        fns = {name: make(eng) for name, eng in engines.items()}
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1000)
        return {n: {"median": statistics.median(t), "min": min(t)} for n, t in times.items()}

    x1 = xs[:1]
    cache_fl = {n: e.forward(x1) for n, e in engines.items()}
    fwd = interleaved(lambda e: lambda: e.forward(x1), a.reps, warmup=2)
    cam = interleaved(
        lambda e: (
            lambda: e._cam(
                cache_fl[e.engine][0][0], x1[0], int(np.argmax(cache_fl[e.engine][1][0]))
            )
        ),
        a.reps,
    )
    e2e = interleaved(lambda e: lambda: e.predict_display(displays[0]), a.reps)
    thr: dict[str, dict[int, float]] = {n: {} for n in engines}
    for b in batches:
        xb = xs[:b]

        def batch_fn(e: Classifier, xb: np.ndarray = xb) -> Any:
            def run() -> None:
                f, z = e.forward(xb)
                for j in range(len(xb)):
                    e._cam(f[j], xb[j], int(np.argmax(z[j])))

            return run

        t = interleaved(batch_fn, max(2, a.reps // 2))
        for n in engines:
            thr[n][b] = len(xb) / (t[n]["min"] / 1000)
    for name in engines:
        best = max(thr[name], key=thr[name].__getitem__)
        results["engines"][name] = {
            "forward_ms_b1": fwd[name]["median"],
            "forward_ms_b1_min": fwd[name]["min"],
            "cam_fast_ms": cam[name]["median"],
            "predict_display_ms": e2e[name]["median"],
            "predict_display_ms_min": e2e[name]["min"],
            "throughput_img_s": thr[name],
            "best_batch": best,
        }
    from ml.gradcam import make_gradcam_fn

    gfn = make_gradcam_fn(clf.keras_model)
    grad_ms = _median_ms(
        lambda: gradcam_gradient(clf.keras_model, xs[0], 0, fn=gfn), max(2, a.reps // 2), warmup=2
    )
    results["cam_gradient_ms_keras"] = grad_ms

    results["startup"] = {n: _startup(model_dir, n, cache) for n in ("keras", "onnx")}
    k, o = results["engines"]["keras"], results["engines"]["onnx"]
    ratio_fwd = k["forward_ms_b1_min"] / o["forward_ms_b1_min"]
    ratio_thr = o["throughput_img_s"][o["best_batch"]] / k["throughput_img_s"][k["best_batch"]]
    results["onnx_speedup_forward_b1"] = ratio_fwd
    results["onnx_speedup_best_throughput"] = ratio_thr
    # ONNX Runtime wins unless it is clearly slower (>15%) per image: it also starts in a
    # fraction of the time and memory (no TensorFlow import), see "startup"
    results["default_engine"] = "onnx" if min(ratio_thr, ratio_fwd) >= 0.85 else "keras"

    print(f"\nper image, batch 1 (median of {a.reps}):")
    print(f"  file decode (PNG/DICOM -> display)   {decode_ms:8.1f} ms")
    print(f"  preprocess (pad, resize, equalise)   {pre_ms:8.1f} ms")
    print(f"  {'':36} {'keras':>9} {'onnx':>9} {'keras/onnx':>11}")
    for key, label in (
        ("forward_ms_b1", "forward pass (median)"),
        ("forward_ms_b1_min", "forward pass (min)"),
        ("cam_fast_ms", "Grad-CAM fast path (no backward)"),
        ("predict_display_ms", "predict_display, all steps (median)"),
        ("predict_display_ms_min", "predict_display, all steps (min)"),
    ):
        print(f"  {label:36} {k[key]:7.1f}ms {o[key]:7.1f}ms {k[key] / o[key]:10.2f}x")
    print(f"  Grad-CAM with a backward pass (keras tf.function, reference): {grad_ms:.1f} ms")
    print("\nthroughput, forward + CAM (images/s, from the fastest repetition):")
    print("  batch " + "".join(f"{b:>9}" for b in batches))
    for name in ("keras", "onnx"):
        t = results["engines"][name]["throughput_img_s"]
        print(
            f"  {name:5} "
            + "".join(f"{t[b]:9.2f}" for b in batches)
            + f"   best batch {results['engines'][name]['best_batch']}"
        )
    print("\nworker start-up (fresh process: imports + load + first prediction; warm ONNX cache):")
    for n, st in results["startup"].items():
        print(
            f"  {n:5} {st['import_and_load_s']:6.1f} s load, {st['first_predict_s']:5.2f} s first "
            f"prediction, peak RSS {st['peak_rss_mb']:6.0f} MB, imports TensorFlow: "
            f"{st['imports_tensorflow']}"
        )
    print(
        f"\nONNX Runtime vs Keras: {ratio_fwd:.2f}x at batch 1 (min), {ratio_thr:.2f}x at the best "
        f"batch sizes -> default engine '{results['default_engine']}'"
    )
    ratios = [f"onnx/keras forward {ratio_fwd:.2f}", f"throughput {ratio_thr:.2f}"]
    if a.baseline:
        base = Classifier.load(Path(a.baseline), engine="onnx", cache_dir=cache)
        pair = {"model": engines["onnx"], "baseline": base}
        per: dict[str, list[float]] = {k: [] for k in pair}
        for d in displays[:8]:
            for clf_ in pair.values():
                clf_.predict_display(d)  # warm-up on this image size
            for _ in range(max(3, a.reps)):
                for k, clf_ in pair.items():  # interleaved: load hits both alike
                    t0 = time.perf_counter()
                    clf_.predict_display(d)
                    per[k].append((time.perf_counter() - t0) * 1000)
        med = {k: statistics.median(v) for k, v in per.items()}
        results["versus_baseline"] = {
            "baseline": f"{base.name} {base.version} ({base.image_size} px)",
            "model": f"{clf.name} {clf.version} ({clf.image_size} px)",
            "predict_display_ms_median": med,
            "ratio": med["model"] / med["baseline"],
        }
        print(
            f"\nper image, all steps (preprocess + forward + OOD score + CAM), ONNX Runtime, "
            f"median over 8 images x {max(3, a.reps)}, interleaved:\n"
            f"  {clf.name} {clf.version} ({clf.image_size} px): {med['model']:.1f} ms\n"
            f"  {base.name} {base.version} ({base.image_size} px): {med['baseline']:.1f} ms"
        )
        ratios.insert(0, f"model/baseline per image {med['model'] / med['baseline']:.2f}")
    if a.json_out:
        a.json_out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if a.record_in_card and "RANDOM" not in model_desc:
        from ml.artifact import load_card, save_artifact

        card = dict(load_card(model_dir))
        card["engine_benchmark"] = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": cpu,
            "load_average_1min": os.getloadavg()[0],
            "forward_ms_b1_min": {n: results["engines"][n]["forward_ms_b1_min"] for n in engines},
            "best_throughput_img_s": {
                n: results["engines"][n]["throughput_img_s"][results["engines"][n]["best_batch"]]
                for n in engines
            },
            "startup": results["startup"],
            "default_engine": results["default_engine"],
            "script": "benchmarks/inference.py",
        }
        save_artifact(None, model_dir, card)
        print(f"recorded engine_benchmark in {model_dir}/model_card.json")
    print("ratios: " + " ".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
