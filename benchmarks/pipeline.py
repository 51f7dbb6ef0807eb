"""End-to-end benchmark of ``cxr run``: receive -> classify -> results stored by the PACS.

For each worker count (the first one is the baseline), in one run:

* starts ``cxr run --workers W`` on the embedded defaults in a scratch folder, with a
  pynetdicom Storage SCP standing in for the PACS (``CXR_DESTINATIONS``);
* warms up (one image end to end, so that model loading is not counted);
* pushes ``--count`` generated chest radiographs (``cxr demo`` phantoms, 12-bit CR/DX) with
  ``cxr send`` in one association;
* waits until every instance is delivered, and reads from the audit DB the per-instance
  latency (``finished_at - received_at``) and the throughput (instances / (last finished -
  first received)).

Prints a table and the ratio of each row's throughput to the baseline's.

    python benchmarks/pipeline.py --count 40 --workers 1 2 [--model DIR] [--size 1024]

Model: ``--model``, else ``CXR_MODEL_DIR``/the shipped artifact when present, else a tiny
random test artifact (then the output says so: figures are for the plumbing only).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_model(arg: str | None, work: Path) -> tuple[Path, str]:
    from cxr.settings import default_model_dir

    for cand in (arg, os.environ.get("CXR_MODEL_DIR"), str(default_model_dir())):
        if cand and (Path(cand) / "model_card.json").is_file():
            return Path(cand), "artifact"
    out = work / "tiny-model"
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from ml.artifact import make_tiny_artifact; make_tiny_artifact({str(out)!r})",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    return out, "TINY RANDOM TEST MODEL (plumbing only)"


def start_pacs() -> tuple[object, int, list[str]]:
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    got: list[str] = []

    def on_store(event: evt.Event) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000  # PS3.4 B.2.3 Success

    ae = AE(ae_title="BENCH_PACS")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    return server, port, got


def rows(db_url: str) -> list[tuple[str, datetime, datetime | None]]:
    from sqlalchemy import create_engine, text

    eng = create_engine(db_url)
    try:
        with eng.connect() as c:
            res = c.execute(text("SELECT state, received_at, finished_at FROM instances")).all()
    finally:
        eng.dispose()

    def dt(v: object) -> datetime | None:
        if v is None:
            return None
        d = v if isinstance(v, datetime) else datetime.fromisoformat(str(v))
        return d if d.tzinfo else d.replace(tzinfo=UTC)

    return [(r[0], dt(r[1]), dt(r[2])) for r in res]  # type: ignore[misc]


def wait_delivered(db_url: str, n: int, proc: subprocess.Popen, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("cxr run died")
        try:
            r = rows(db_url)
        except Exception:
            r = []
        if len(r) >= n and all(
            x[0] in ("delivered", "failed", "ignored", "delivery_failed") for x in r
        ):
            return r
        time.sleep(0.25)
    raise SystemExit(f"timeout waiting for {n} instances")


def send(folder: Path, port: int) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "apps.cli",
            "send",
            str(folder),
            "--no-progress",
            "--to",
            f"CXR_WORKER@127.0.0.1:{port}",
        ],
        check=True,
        capture_output=True,
    )


def measure(workers: int, count: int, size: int, model: Path, base: Path) -> dict[str, float]:
    from apps.demo import write_demo

    work = Path(tempfile.mkdtemp(prefix=f"w{workers}-", dir=base))
    warm, batch = work / "warm", work / "batch"
    write_demo(warm, count=1, size=size)
    write_demo(batch, count=count, size=size)
    server, pacs_port, _got = start_pacs()
    dicom_port = free_port()
    db_url = f"sqlite:///{work / 'audit.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        CXR_DICOM_HOST="127.0.0.1",
        CXR_DICOM_PORT=str(dicom_port),
        CXR_METRICS_PORT="0",
        CXR_DATABASE_URL=db_url,
        CXR_SPOOL_DIR=str(work / "spool"),
        CXR_EMBEDDED_BROKER_PATH=str(work / "broker.sqlite"),
        CXR_MODEL_DIR=str(model),
        CXR_MODEL_CACHE_DIR=str(base / "model-cache"),
        CXR_LOG_LEVEL="WARNING",
        CXR_DESTINATIONS=f"BENCH_PACS@127.0.0.1:{pacs_port}",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "apps.cli", "run", "--workers", str(workers), "--quiet"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "cxr run: ready" in line:
                break
        # every worker loads the model at its first task: warm each one
        for _ in range(workers):
            send(warm, dicom_port)  # identical re-sends are duplicates: new file each time
            write_demo(warm, count=1, size=size)
        wait_delivered(db_url, workers, proc, 600)
        n0 = len(rows(db_url))
        send(batch, dicom_port)
        r = wait_delivered(db_url, n0 + count, proc, 1800)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(300)
        except subprocess.TimeoutExpired:
            proc.kill()
        server.shutdown()  # type: ignore[attr-defined]
    r = sorted(r, key=lambda x: x[1])[n0:]
    lat = [(f - rcv).total_seconds() for _s, rcv, f in r if f]
    span = (max(f for *_x, f in r if f) - min(rcv for _s, rcv, _f in r)).total_seconds()
    return {
        "ips": count / span if span > 0 else float("nan"),
        "p50": statistics.median(lat),
        "p95": statistics.quantiles(lat, n=20)[18] if len(lat) >= 2 else lat[0],
        "delivered": sum(1 for x in r if x[0] == "delivered"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", type=int, default=1024, help="image rows = columns (1024)")
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cxr-bench-pipeline-"))
    model, kind = pick_model(a.model, base)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
        f"Python {platform.python_version()}"
    )
    print(f"model: {model} ({kind}); {a.count} images of {a.size}x{a.size} px 12-bit")
    try:
        results = {w: measure(w, a.count, a.size, model, base) for w in a.workers}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    baseline = results[a.workers[0]]["ips"]
    print(
        f"\n| workers | instances/s | latency p50 s | latency p95 s | delivered | ratio to {a.workers[0]} worker(s) |"
    )
    print("|---|---|---|---|---|---|")
    for w, m in results.items():
        print(
            f"| {w} | {m['ips']:.2f} | {m['p50']:.2f} | {m['p95']:.2f} | "
            f"{m['delivered']}/{a.count} | {m['ips'] / baseline:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
