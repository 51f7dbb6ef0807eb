"""Pipeline benchmark against a real PACS (Orthanc): the figures of issue 4, in one run.

1. **Low-load latency**: images are sent to ``cxr node`` one at a time (the next only
   after the previous one's results are in the PACS); latency = the SC's ``delivered_at``
   (the PACS acknowledged the C-STORE) minus the instance's ``received_at``. p50 and p95.
2. **Steady-state throughput** with a backlog: ``--backlog`` images (200 by default) sent
   in one association, then the completion rate over the last 90 % of them (images/min).
3. **The model's own throughput**: preprocess + forward + Grad-CAM of the same images,
   in-process, no I/O (``Classifier.predict_display``), one image at a time as the worker
   does; its median per image is the "single-image model time".

Targets: pipeline throughput >= 0.85 x model throughput; p95 low-load latency <= 2 x the
single-image model time. The output prints both ratios and PASS/MISS.

Services: Orthanc on free loopback ports (the PACS), ``cxr node`` + ``cxr worker``
subprocesses, Redis (127.0.0.1:6379, DB 14, flushed) as the broker when reachable
(``--broker embedded`` for the SQLite broker), an SQLite audit DB (``--db-url`` for
PostgreSQL). Images: the shared chest samples (``../shared/dicom-samples/chest``), copied
with new UIDs. Model: ``--model``, else the shipped ``ml/models/cxr-densenet169-v2`` when
present, else a tiny random test model (then the output says so).

    python benchmarks/pipeline_pacs.py [--backlog 200] [--low-load 20] [--concurrency 1]
"""

from __future__ import annotations

import argparse
import os
import platform
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

SAMPLES = REPO.parent / "shared" / "dicom-samples" / "chest"
# one per distinct image (two samples are the same image in two encodings)
SAMPLE_FILES = (
    "dx_thorax_monochrome1.dcm",
    "cr_chest_monochrome1_10bit_no_part10_header.dcm",
    "cr_chest_monochrome1_jpeg_baseline.dcm",
    "cr_jpeg_lossless_modality_lut_sequence.dcm",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


CACHE = Path(tempfile.gettempdir()) / "cxr-bench-pipeline-cache"  # stand-in + ONNX export


def pick_model(arg: str | None, work: Path) -> tuple[Path, str]:
    from cxr.settings import default_model_dir

    if arg == "densenet169-random":
        # the shipped architecture (DenseNet169, 256 px, GAP head) with random weights:
        # the same compute per image as the shipped model, for when it is not built yet
        import keras

        from ml.artifact import save_artifact
        from ml.model import build_model

        d = CACHE / "densenet169-random"
        kind = "DenseNet169 256 px, RANDOM weights (stand-in with the shipped model's cost)"
        if (d / "model_card.json").is_file():
            return d, kind
        keras.utils.set_random_seed(0)
        m = build_model(
            image_size=256, backbone="densenet169", head="gap", weights=None, dropout=0.0
        )
        save_artifact(
            m,
            d,
            {
                "name": "cxr-densenet169-random",
                "version": "bench-0",
                "image_size": 256,
                "architecture": {"backbone": "densenet169", "head": "gap", "dropout": 0.0},
                "temperature": 1.0,
                "limitations": ["random weights: a benchmark stand-in"],
            },
        )
        return d, kind
    if arg:
        return Path(arg), "given"
    shipped = default_model_dir()
    if (shipped / "model_card.json").is_file():
        return shipped, "shipped"
    from ml.artifact import make_tiny_artifact

    return make_tiny_artifact(work / "tiny-model", image_size=64), "TINY random test model"


def make_images(out: Path, n: int) -> list[Path]:
    """``n`` copies of the chest samples, each with new Study/Series/SOP Instance UIDs."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid

    out.mkdir(parents=True, exist_ok=True)
    bases = [pydicom.dcmread(SAMPLES / f, force=True) for f in SAMPLE_FILES]
    paths = []
    for i in range(n):
        ds = bases[i % len(bases)]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
            generate_uid(),
            generate_uid(),
            generate_uid(),
        )
        if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = out / f"img{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


class Sender:
    """A C-STORE SCU to our node (pynetdicom), one association per batch."""

    def __init__(self, port: int, files: list[Path]) -> None:
        import pydicom
        from pynetdicom import AE

        self.port = port
        self.ae = AE(ae_title="BENCH")
        ctx = set()
        for f in files[: len(SAMPLE_FILES)]:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            ctx.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        for sop, ts in sorted(ctx):
            self.ae.add_requested_context(sop, ts)

    def send(self, files: list[Path]) -> None:
        import pydicom

        assoc = self.ae.associate("127.0.0.1", self.port, ae_title="CXR_WORKER")
        if not assoc.is_established:
            raise RuntimeError("association with the node failed")
        try:
            for f in files:
                st = assoc.send_c_store(pydicom.dcmread(f))
                if getattr(st, "Status", None) != 0x0000:  # PS3.4 B.2.3 Success
                    raise RuntimeError(f"node answered {st}")
        finally:
            assoc.release()


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def sc_times(db_url: str, uids: list[str]) -> dict[str, tuple[datetime, datetime | None]]:
    """{source SOP UID: (received_at, SC delivered_at or None)}."""
    from sqlalchemy import select

    from db.models import Delivery, Instance
    from db.session import session_scope

    out: dict[str, tuple[datetime, datetime | None]] = {}
    with session_scope(db_url) as s:
        rows = s.execute(
            select(
                Instance.sop_instance_uid,
                Instance.received_at,
                Instance.state,
                Delivery.delivered_at,
            )
            .outerjoin(Delivery, (Delivery.instance_id == Instance.id) & (Delivery.kind == "SC"))
            .where(Instance.sop_instance_uid.in_(uids))
        ).all()
    for uid, rec, state, dlv in rows:
        if state in ("failed", "delivery_failed", "ignored"):
            raise RuntimeError(f"instance {uid} ended {state}")
        out[uid] = (_aware(rec), _aware(dlv) if dlv and state == "delivered" else None)
    return out


def wait_done(
    db_url: str, uids: list[str], procs: list[subprocess.Popen], timeout: float, orthanc=None
) -> dict:  # type: ignore[type-arg,no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = sc_times(db_url, uids)
        if len(t) == len(uids) and all(v[1] for v in t.values()):
            return t
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a subprocess exited with {p.returncode}")
        if orthanc is not None:
            check_alive(orthanc, procs)
        time.sleep(0.1)
    raise TimeoutError(f"not all {len(uids)} instances delivered within {timeout} s")


def check_alive(orthanc, procs) -> None:  # type: ignore[no-untyped-def]
    if orthanc.proc is None or orthanc.proc.poll() is not None:
        rc = None if orthanc.proc is None else orthanc.proc.returncode
        raise RuntimeError(f"Orthanc died (exit {rc}): {orthanc.tail(500)}")


def _tree(pids: list[int]) -> set[int]:
    """``pids`` and all their descendants (from /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                parent[int(d.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo += [c for c, pp in parent.items() if pp == pid]
    return out


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) used so far by ``pids`` and their descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _tree(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


STAGES = ("decode", "preprocess", "forward", "cam", "build", "send", "total")


def stage_means(db_url: str, uids: list[str]) -> dict[str, float]:
    """Mean per-stage times (ms) the worker recorded for these instances (``t_*_ms``);
    ``total`` is the classify task's own time (with the delivery lane, sending is not in
    it)."""
    from sqlalchemy import select

    from db.models import Inference, Instance
    from db.session import session_scope

    cols = [getattr(Inference, f"t_{k}_ms") for k in STAGES]
    with session_scope(db_url) as s:
        rows = s.execute(
            select(*cols)
            .join(Instance, Instance.id == Inference.instance_id)
            .where(Instance.sop_instance_uid.in_(uids))
        ).all()
    out = {}
    for i, k in enumerate(STAGES):
        vals = [r[i] for r in rows if r[i] is not None]
        out[k] = statistics.fmean(vals) if vals else float("nan")
    return out


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def model_throughput(
    model: Path, engine: str, cache: Path, files: list[Path], n: int
) -> tuple[float, float]:
    """(median ms per image, images/min) of predict_display, no I/O (displays decoded first)."""
    import pydicom

    from ml.preprocess import dicom_to_display
    from ml.runtime import Classifier

    clf = Classifier.load(model, engine=engine, cache_dir=cache)  # type: ignore[arg-type]
    displays = [dicom_to_display(pydicom.dcmread(f)) for f in files[: len(SAMPLE_FILES)]]
    for d in displays:  # warm-up
        clf.predict_display(d)
    per = []
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        t = time.perf_counter()
        clf.predict_display(displays[i % len(displays)])
        per.append((time.perf_counter() - t) * 1000)
    total = time.perf_counter() - t0
    global MODEL_CPU_MS
    MODEL_CPU_MS = (time.process_time() - c0) / n * 1000
    return statistics.median(per), n / total * 60


MODEL_CPU_MS = float("nan")  # CPU time per image of the model alone (all its threads)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backlog", type=int, default=200)
    ap.add_argument("--low-load", type=int, default=20, help="images for the latency run")
    ap.add_argument("--concurrency", type=int, default=1, help="worker pool processes")
    ap.add_argument(
        "--model",
        default=None,
        help="model dir, or 'densenet169-random' for an untrained stand-in of the shipped one",
    )
    ap.add_argument(
        "--delivery-threads", type=int, default=1, help="CXR_DELIVERY_THREADS (0: inline)"
    )
    ap.add_argument(
        "--association-idle", type=float, default=10.0, help="CXR_DELIVERY_ASSOCIATION_IDLE"
    )
    ap.add_argument("--engine", default="auto", choices=["auto", "onnx", "keras"])
    ap.add_argument("--broker", default="redis", choices=["redis", "embedded"])
    ap.add_argument("--db-url", default=None, help="audit DB (default: SQLite in the scratch dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    a = ap.parse_args()
    if not SAMPLES.is_dir():
        print(f"{SAMPLES} is absent: the shared samples are needed", file=sys.stderr)
        return 2

    from tests.worker.orthanc import Orthanc

    work = Path(tempfile.mkdtemp(prefix="cxr-bench-pipeline-"))
    model, kind = pick_model(a.model, work)
    db_url = a.db_url or f"sqlite:///{work / 'audit.db'}"
    broker = ""
    if a.broker == "redis":
        import redis

        broker = "redis://127.0.0.1:6379/14"
        r = redis.Redis.from_url(broker)
        r.ping()
        r.flushdb()
    n_warm = a.concurrency
    files = make_images(work / "in", n_warm + a.low_load + a.backlog)
    warm, low, backlog = (
        files[:n_warm],
        files[n_warm : n_warm + a.low_load],
        files[n_warm + a.low_load :],
    )

    import pydicom

    def uids(fs: list[Path]) -> list[str]:
        return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in fs]

    orthanc = Orthanc(work / "orthanc", free_port(), free_port()).start()
    node_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        CXR_DATABASE_URL=db_url,
        CXR_SPOOL_DIR=str(work / "spool"),
        CXR_MODEL_DIR=str(model),
        CXR_MODEL_CACHE_DIR=str(CACHE / "model-cache"),
        CXR_INFERENCE_ENGINE=a.engine,
        CXR_EMBEDDED_BROKER_PATH=str(work / "broker.sqlite"),
        CXR_BROKER_URL=broker,
        CXR_DESTINATIONS=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        CXR_DICOM_HOST="127.0.0.1",
        CXR_DICOM_PORT=str(node_port),
        CXR_METRICS_PORT="0",
        CXR_LOG_LEVEL="WARNING",
        CXR_WORKER_CONCURRENCY=str(a.concurrency),
        CXR_DELIVERY_THREADS=str(a.delivery_threads),
        CXR_DELIVERY_ASSOCIATION_IDLE=str(a.association_idle),
        CXR_REQUEUE_STALE_AFTER="600",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    procs: list[subprocess.Popen] = []  # type: ignore[type-arg]
    try:
        for args in (["worker"], ["node"]):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "apps.cli", *args],
                    env=env,
                    cwd=REPO,
                    stdout=open(work / f"{args[0]}.log", "wb"),
                    stderr=subprocess.STDOUT,  # noqa: SIM115
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 60
        while not port_open(node_port):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"node/worker did not start; logs in {work}")
            time.sleep(0.2)
        sender = Sender(node_port, files)

        # warm-up: every pool process loads the model at its first task
        sender.send(warm)
        wait_done(db_url, uids(warm), procs, 300, orthanc)

        # 1. low load: one at a time
        lat = []
        for f in low:
            sender.send([f])
            ((rec, dlv),) = wait_done(db_url, uids([f]), procs, 120, orthanc).values()
            lat.append((dlv - rec).total_seconds() * 1000)

        # 2. backlog
        b_uids = uids(backlog)
        watched = [p.pid for p in procs] + ([orthanc.proc.pid] if orthanc.proc else [])
        groups = {"worker": [procs[0].pid], "node": [procs[1].pid]}
        if orthanc.proc:
            groups["Orthanc"] = [orthanc.proc.pid]
        cpu0 = cpu_seconds(watched)
        group0 = {k: cpu_seconds(v) for k, v in groups.items()}
        t_send = time.perf_counter()
        sender.send(backlog)
        t_sent = time.perf_counter() - t_send
        times = wait_done(db_url, b_uids, procs, 60 + 30 * len(backlog), orthanc)
        cpu_per_image = (cpu_seconds(watched) - cpu0) / len(backlog) * 1000
        cpu_by_process = {
            k: (cpu_seconds(v) - group0[k]) / len(backlog) * 1000 for k, v in groups.items()
        }
        done = sorted(v[1] for v in times.values())  # type: ignore[type-var]
        k = max(1, len(done) // 10)
        span = (done[-1] - done[k - 1]).total_seconds()
        steady = (len(done) - k) / span * 60 if span > 0 else float("nan")
        first_rec = min(v[0] for v in times.values())
        overall = len(done) / (done[-1] - first_rec).total_seconds() * 60
        n_pacs = len(orthanc.instances())
        stages = stage_means(db_url, b_uids)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        orthanc.stop()

    # 3. the model alone (after the pipeline stopped: no contention)
    model_ms, model_ipm = model_throughput(
        model, a.engine, CACHE / "model-cache", files, max(20, min(100, a.backlog))
    )

    p50, p95 = statistics.median(lat), pct(lat, 0.95)
    ratio = steady / model_ipm
    lat_ratio = p95 / model_ms
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"broker {'redis' if broker else 'embedded SQLite'}, audit DB {db_url.split(':')[0]}, "
        f"{a.concurrency} worker process(es)"
    )
    print(f"model: {model} ({kind}), engine {a.engine}")
    print(
        f"images: the {len(SAMPLE_FILES)} shared chest samples (169x211 .. 1576x1976) cycled, new UIDs"
    )
    print(f"PACS holds {n_pacs} objects (expected {3 * len(files)} = SC+SR+heat map per image)")
    print()
    print("| figure | value |")
    print("|---|---|")
    print(
        f"| low-load latency p50 (receipt -> SC acknowledged by Orthanc), n={len(lat)} | {p50:.0f} ms |"
    )
    print(f"| low-load latency p95 | {p95:.0f} ms |")
    print(f"| backlog sent (images / seconds to receive all) | {len(backlog)} / {t_sent:.1f} s |")
    print(
        f"| steady-state pipeline throughput (last 90 % of {len(backlog)}) | {steady:.1f} images/min |"
    )
    print(f"| overall backlog throughput (first receipt -> last SC) | {overall:.1f} images/min |")
    print(f"| model alone: single-image time (median) | {model_ms:.0f} ms |")
    print(f"| model alone: throughput | {model_ipm:.1f} images/min |")
    print()
    print(
        "mean per image in the backlog (ms): "
        + ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
    )
    print(f"pipeline time per image at steady state: {60000 / steady:.0f} ms")
    ncpu = os.cpu_count() or 1
    print(
        f"CPU used per image in the backlog (node + worker + Orthanc): {cpu_per_image:.0f} ms; "
        f"the model alone {MODEL_CPU_MS:.0f} ms of CPU in {model_ms:.0f} ms; "
        f"bound on {ncpu} cores: pipeline/model <= {ncpu * model_ms / cpu_per_image:.2f}"
    )
    print(
        "CPU per image by process (ms): "
        + ", ".join(f"{k} {v:.0f}" for k, v in cpu_by_process.items())
        + f"; the worker's CPU beside the model's: "
        f"{cpu_by_process['worker'] - MODEL_CPU_MS:.0f} ms"
    )
    outside = cpu_per_image - cpu_by_process["worker"]
    print(
        f"even with a worker that did nothing but the model, node + PACS would cap "
        f"pipeline/model at {ncpu * model_ms / (MODEL_CPU_MS + outside):.2f} on {ncpu} cores"
    )
    print()
    ok1, ok2 = ratio >= 0.85, lat_ratio <= 2.0
    print(
        f"pipeline / model throughput = {ratio:.2f} (target >= 0.85): {'PASS' if ok1 else 'MISS'}"
    )
    print(
        f"p95 latency / single-image model time = {lat_ratio:.2f} (target <= 2): {'PASS' if ok2 else 'MISS'}"
    )
    if not a.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"scratch kept in {work}")
    print(f"ratios: pipeline/model {ratio:.2f} p95/model {lat_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
