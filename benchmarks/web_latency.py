"""Web console benchmark: upload-to-verdict latency of ``POST /api/v1/predict`` against the
model's own time, in the same run (issue 12: target p95 <= 1.5x the model's time).

It measures, on the same real radiographs (../shared/data/cxr, several sources):

1. **model**: the shipped classifier in this process, ``predict_display`` on the decoded
   image (preprocessing, forward pass, OOD score, Grad-CAM): the baseline.
2. **web**: a real ``cxr web`` process (uvicorn, model loaded once in it) answering
   ``POST /api/v1/predict`` with the file as multipart upload; timed at the client, from
   the first byte sent to the parsed JSON verdict (decode, model, overlay PNG, base64).
3. **broker round trip**: what the other design would add, inference through the Celery
   worker: one task carrying the same file (base64 in JSON) to a Celery worker process and
   its answer back through a Redis result backend, with a task that only echoes. This is a
   lower bound of that path's overhead: it leaves out the queue wait behind PACS traffic.

Every figure is printed; the last line gives the ratios against the model's own time.

    python benchmarks/web_latency.py [--n 20] [--reps 3] [--redis redis://127.0.0.1:6379/14]
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "cxr"
PASSWORD = "bench-password-123"


def percentile(xs: list[float], q: float) -> float:
    from db.queries import percentile as p

    v = p(xs, q)
    assert v is not None
    return v


def images(n: int) -> list[Path]:
    files = sorted(DATA.glob("*/*.png"))
    if not files:
        raise SystemExit(f"no radiographs under {DATA} (the shared data set)")
    step = max(1, len(files) // n)
    return files[::step][:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_times(files: list[Path], reps: int, cache: Path) -> list[float]:
    from cxr.settings import load_settings
    from ml.preprocess import load_display
    from ml.runtime import get_classifier

    clf = get_classifier(load_settings(model_cache_dir=cache))
    displays = [load_display(f) for f in files]
    clf.predict_display(displays[0])  # warm-up
    out = []
    for _ in range(reps):
        for d in displays:
            t0 = time.perf_counter()
            clf.predict_display(d)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def web_times(files: list[Path], reps: int, cache: Path, work: Path) -> tuple[list[float], Any]:
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        CXR_WEB_PORT=str(port),
        CXR_WEB_ADMIN_PASSWORD=PASSWORD,
        CXR_DATABASE_URL=f"sqlite:///{work / 'a.db'}",
        CXR_MODEL_CACHE_DIR=str(cache),
        CXR_DICOM_PORT=str(free_port()),
        CXR_EMBEDDED_BROKER_PATH=str(work / "b.sqlite"),
        CXR_LOG_LEVEL="WARNING",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "apps.cli", "web"],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "web.log", "wb"),  # noqa: SIM115
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                h = httpx.get(base + "/api/v1/health", timeout=5).json()
                if h["checks"]["model"]["ok"]:
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.3)
        else:
            raise SystemExit("cxr web did not come up:\n" + (work / "web.log").read_text()[-2000:])
        payloads = [f.read_bytes() for f in files]
        out = []
        server_model = []
        with httpx.Client(base_url=base, auth=("admin", PASSWORD), timeout=60) as c:
            c.post("/api/v1/predict", files={"file": ("w.png", payloads[0])})  # warm-up
            for _ in range(reps):
                for data in payloads:
                    t0 = time.perf_counter()
                    r = c.post("/api/v1/predict", files={"file": ("x.png", data)})
                    body = r.json()
                    out.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 200 and body["label"], r.text[:300]
                    server_model.append(body["timings_ms"]["model_total"])
        return out, server_model
    finally:
        proc.terminate()
        proc.wait(30)


ECHO_APP = """
from celery import Celery
app = Celery("bench", broker="{url}", backend="{url}")
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                worker_prefetch_multiplier=1)

@app.task(name="bench.echo")
def echo(payload):
    return {{"n": len(payload)}}
"""


def broker_times(files: list[Path], reps: int, url: str, work: Path) -> list[float]:
    (work / "bench_echo_app.py").write_text(ECHO_APP.format(url=url))
    sys.path.insert(0, str(work))
    import bench_echo_app  # type: ignore[import-not-found]

    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench_echo_app",
            "worker",
            "--pool=solo",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=work,
        env=dict(os.environ, PYTHONPATH=str(work)),
        stdout=subprocess.DEVNULL,
        stderr=open(work / "celery.log", "wb"),  # noqa: SIM115
    )
    try:
        payloads = [base64.b64encode(f.read_bytes()).decode() for f in files]
        bench_echo_app.echo.delay("x").get(timeout=60)  # worker up, warm
        out = []
        for _ in range(reps):
            for p in payloads:
                t0 = time.perf_counter()
                bench_echo_app.echo.delay(p).get(timeout=60)
                out.append((time.perf_counter() - t0) * 1000)
        return out
    finally:
        worker.terminate()
        worker.wait(30)


def describe(name: str, xs: list[float]) -> str:
    return (
        f"{name:<34} n={len(xs):3d}  p50 {percentile(xs, 50):7.1f} ms  "
        f"p95 {percentile(xs, 95):7.1f} ms  mean {statistics.fmean(xs):7.1f} ms"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="radiographs (default 20)")
    ap.add_argument("--reps", type=int, default=3, help="passes over them (default 3)")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="broker + backend")
    ap.add_argument("--cache", type=Path, default=None, help="ONNX cache dir of the model")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxr-web-bench-"))
    cache = args.cache or work / "model-cache"
    files = images(args.n)
    print(f"{len(files)} radiographs from {DATA} x {args.reps} passes; shipped model")
    model = model_times(files, args.reps, cache)
    web, server_model = web_times(files, args.reps, cache, work)
    broker = broker_times(files, args.reps, args.redis, work)
    kb = statistics.fmean(f.stat().st_size for f in files) / 1024
    print(f"mean upload {kb:.0f} KiB")
    print(describe("model alone (this process)", model))
    print(describe("model inside cxr web (server)", server_model))
    print(describe("web upload -> verdict (client)", web))
    print(describe("Celery broker round trip (echo)", broker))
    m50, m95 = percentile(model, 50), percentile(model, 95)
    print(
        "ratios (web / model, target <= 1.5x): "
        f"p50/p50 {percentile(web, 50) / m50:.2f}x, p95/p95 {percentile(web, 95) / m95:.2f}x, "
        f"p95/p50 {percentile(web, 95) / m50:.2f}x; Celery round trip alone p50 "
        f"{percentile(broker, 50) / m50:.2f}x of the model's p50 on top of it"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
