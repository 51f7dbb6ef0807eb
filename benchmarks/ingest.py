"""Ingest throughput of the DICOM node vs. a bare pynetdicom storescp (baseline).

Generates realistic CR images (12/16-bit, uncompressed and compressed: RLE, JPEG-LS, JPEG 2000
lossless) of 2-20 MB each, then pushes the SAME files, in one run, to

* ``cxr node`` (fsync'ed spool write + audit commit to SQLite + hand-off to the embedded
  broker, all on), and
* ``python -m pynetdicom storescp --ignore`` (accepts and discards: the baseline),

over 1 and over N concurrent associations (one sender process per association). Each target
runs in its own process, started fresh for each measurement. Prints instances/s, MB/s and the
node/baseline ratio (target >= 0.8x), the CPU per instance of the receiver (from /proc) and of
the senders, the node/baseline ratio that CPU alone allows on this machine, and the CPU of the
node's per-instance steps measured alone (``--bookkeeping``); the last line is
``ratios: c1=... c4=...``.

``--small`` sends small images instead (64-512 KB: 256x256 and 512x512, uncompressed and
RLE), where the per-instance cost (audit commit, fsync) dominates. ``--node-env`` passes
settings to the node (e.g. ``--node-env CXR_RECEIVE_CHUNKED=false`` for the buffered
receive).

    python benchmarks/ingest.py --count 200 --concurrency 1 4
    python benchmarks/ingest.py --count 200 --concurrency 1 4 --small
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("benchmarks.ingest")
REPO = Path(__file__).resolve().parent.parent
AET = "CXR_WORKER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- images
def _pixels(rows: int, cols: int, bits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    lungs = np.exp(
        -(((xx - cols * 0.32) / (cols * 0.16)) ** 2 + ((yy - rows * 0.5) / (rows * 0.3)) ** 2)
    )
    lungs += np.exp(
        -(((xx - cols * 0.68) / (cols * 0.16)) ** 2 + ((yy - rows * 0.5) / (rows * 0.3)) ** 2)
    )
    img = 0.65 - 0.35 * lungs + 0.05 * np.sin(yy / 9.0) + 0.04 * rng.standard_normal((rows, cols))
    return (img.clip(0, 1) * (2**bits - 1)).astype(np.uint16)


def _base_dataset(rows: int, cols: int, bits: int, seed: int):  # type: ignore[no-untyped-def]
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Bench^Mark"
    ds.PatientID = f"BENCH{seed:04d}"
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.AccessionNumber = f"A{seed:06d}"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Manufacturer = "BenchCR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = _pixels(rows, cols, bits, seed).tobytes()
    return ds


#: (rows, cols, bits, transfer syntax keyword or None = uncompressed)
BASES = [
    (1024, 1024, 12, None),  # 2 MB
    (2048, 2048, 12, None),  # 8 MB
    (2500, 2048, 16, None),  # 10 MB
    (3000, 3000, 12, None),  # 18 MB
    (2048, 2048, 16, "RLELossless"),
    (2500, 2048, 12, "JPEGLSLossless"),
    (3000, 3000, 16, "JPEG2000Lossless"),
    (2048, 2500, 16, "JPEGLSLossless"),
]
#: --small: 64-512 KB each
SMALL_BASES = [
    (256, 256, 12, None),  # 128 KB
    (512, 512, 12, None),  # 512 KB
    (512, 512, 16, "RLELossless"),
    (256, 256, 16, None),
]


def generate(
    out: Path, count: int, min_mb: float, max_mb: float, bases_spec: list | None = None
) -> list[Path]:
    import pydicom.uid as u
    from pydicom.uid import generate_uid

    out.mkdir(parents=True, exist_ok=True)
    bases = []
    for i, (rows, cols, bits, ts) in enumerate(bases_spec or BASES):
        ds = _base_dataset(rows, cols, bits, seed=i)
        if ts is not None:
            kw = {"encoding_plugin": "pylibjpeg"} if ts == "RLELossless" else {}
            try:
                ds.compress(getattr(u, ts), **kw)
            except Exception as exc:  # encoder missing: keep the uncompressed base
                log.warning("cannot encode %s (%s); skipping that base", ts, exc)
                continue
        size_mb = len(ds.PixelData) / 1e6
        if not min_mb <= size_mb <= max_mb:
            log.warning("base %dx%d %s is %.1f MB, outside range: skipped", rows, cols, ts, size_mb)
            continue
        bases.append(ds)
    files = []
    for k in range(count):
        ds = bases[k % len(bases)]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        p = out / f"img{k:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    return files


# ----------------------------------------------------------------------------- sending
def _send_chunk(address: tuple[str, int], paths: list[str]) -> tuple[int, int, int, float]:
    """One association: C-STORE every path. Returns (ok, failed, bytes, the sender's CPU
    seconds for the association and the C-STOREs)."""
    import pydicom
    from pynetdicom import AE

    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    ae = AE(ae_title="BENCH")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.maximum_pdu_size = 0
    cx = set()
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        cx.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    for sop, ts in sorted(cx):
        ae.add_requested_context(sop, ts)
    cpu0 = time.process_time()
    assoc = ae.associate(*address, ae_title=AET)
    if not assoc.is_established:
        return 0, len(paths), 0, time.process_time() - cpu0
    ok = failed = nbytes = 0
    for p in paths:
        st = assoc.send_c_store(p)
        if getattr(st, "Status", None) == 0x0000:  # Success, PS3.4 B.2.3
            ok += 1
            nbytes += os.path.getsize(p)
        else:
            failed += 1
    assoc.release()
    return ok, failed, nbytes, time.process_time() - cpu0


def _echo_ok(address: tuple[str, int]) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    ae = AE(ae_title="BENCH")
    ae.acse_timeout = 2
    ae.add_requested_context(Verification)
    a = ae.associate(*address, ae_title=AET)
    if not a.is_established:
        return False
    a.send_c_echo()
    a.release()
    return True


@dataclass
class Result:
    target: str
    concurrency: int
    ok: int
    failed: int
    nbytes: int
    seconds: float
    target_cpu: float = 0.0  # CPU seconds of the receiving process (from /proc)
    sender_cpu: float = 0.0  # CPU seconds of the sending processes

    @property
    def target_ms(self) -> float:
        """The receiver's CPU per acknowledged instance (ms)."""
        return self.target_cpu * 1000 / max(self.ok, 1)

    @property
    def sender_ms(self) -> float:
        return self.sender_cpu * 1000 / max(self.ok, 1)

    @property
    def ips(self) -> float:
        return self.ok / self.seconds

    @property
    def mbps(self) -> float:
        return self.nbytes / 1e6 / self.seconds


NODE_ENV: dict[str, str] = {}  # --node-env


def _start(target: str, port: int, work: Path) -> subprocess.Popen:
    logf = open(work / f"{target}-{port}.log", "w")  # noqa: SIM115 - closed with the process
    if target == "node":
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        env.update(
            CXR_DICOM_HOST="127.0.0.1",
            CXR_DICOM_PORT=str(port),
            CXR_AE_TITLE=AET,
            CXR_SPOOL_DIR=str(work / f"spool-{port}"),
            CXR_DATABASE_URL=f"sqlite:///{work / f'audit-{port}.db'}",
            CXR_BROKER_URL="",  # embedded broker in the temp dir: nothing leaks into Redis
            CXR_EMBEDDED_BROKER_PATH=str(work / f"broker-{port}.sqlite"),
            CXR_METRICS_PORT="0",
            CXR_MAX_ASSOCIATIONS="16",
            PYTHONPATH=str(REPO),
        )
        env.update(NODE_ENV)
        cmd = [sys.executable, "-m", "apps.cli", "node"]
    else:
        env = dict(os.environ)
        cmd = [
            sys.executable,
            "-m",
            "pynetdicom",
            "storescp",
            str(port),
            "--ignore",
            "-aet",
            AET,
            "--max-pdu",
            "0",
        ]
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not _echo_ok(("127.0.0.1", port)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{target} did not start; see {logf.name}")
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and of its threads (``/proc/<pid>/stat``); 0 where
    /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_target(target: str, files: list[Path], concurrency: int, work: Path) -> Result:
    port = free_port()
    proc = _start(target, port, work)
    try:
        chunks = [[str(p) for p in files[i::concurrency]] for i in range(concurrency)]
        with ProcessPoolExecutor(max_workers=concurrency) as pool:
            # warm the worker processes (imports) outside the timed region
            list(pool.map(_noop, range(concurrency)))
            cpu0 = _cpu_seconds(proc.pid)
            t0 = time.perf_counter()
            futures = [pool.submit(_send_chunk, ("127.0.0.1", port), c) for c in chunks]
            parts = [f.result() for f in futures]
            dt = time.perf_counter() - t0
            time.sleep(1.0)  # the node's hand-off to the broker runs after the Success
            target_cpu = _cpu_seconds(proc.pid) - cpu0
    finally:
        _stop(proc)
    ok = sum(p[0] for p in parts)
    res = Result(
        target,
        concurrency,
        ok,
        sum(p[1] for p in parts),
        sum(p[2] for p in parts),
        dt,
        target_cpu,
        sum(p[3] for p in parts),
    )
    if target == "node":
        _check_node(work, port, ok)
    return res


def _noop(_: int) -> None:
    import pynetdicom  # noqa: F401


def _check_node(work: Path, port: int, ok: int) -> None:
    """Every Success must be a durable file + committed audit row."""
    import sqlite3

    db = sqlite3.connect(work / f"audit-{port}.db")
    n_rows = db.execute("select count(*) from instances").fetchone()[0]
    states = dict(db.execute("select state, count(*) from instances group by state").fetchall())
    db.close()
    n_files = sum(1 for _ in (work / f"spool-{port}" / "incoming").rglob("*.dcm"))
    print(f"    node check: {ok} acknowledged, {n_rows} audit rows {states}, {n_files} spool files")
    if not (n_rows == n_files == ok):
        print("    WARNING: acknowledged / rows / files differ")
    shutil.rmtree(work / f"spool-{port}", ignore_errors=True)


def bookkeeping_cost(work: Path, n: int) -> dict[str, float]:
    """CPU ms per instance of what the node does for every stored instance beside the
    DICOM exchange, each step alone, in this process and with the node's defaults (SQLite
    audit DB with synchronous=FULL, the embedded broker): the spool write (fsync'ed,
    renamed), the ``received`` audit transaction, the broker publish and the ``queued``
    transaction."""
    import hashlib

    from cxr.celery_app import make_celery
    from cxr.contracts import send_classify
    from cxr.settings import Settings
    from cxr.storage import Spool
    from db import lifecycle
    from db.session import dispose_engines, init_db

    root = work / "bookkeeping"
    shutil.rmtree(root, ignore_errors=True)
    settings = Settings(
        spool_dir=root / "spool",
        database_url=f"sqlite:///{root / 'audit.db'}",
        broker_url="",
        embedded_broker_path=root / "broker.sqlite",
    )
    root.mkdir(parents=True)
    init_db(settings.database_url)
    spool = Spool(settings.spool_dir)
    app = make_celery(settings)
    payload = os.urandom(300_000)
    cpu = {"spool write": 0.0, "received txn": 0.0, "broker publish": 0.0, "queued txn": 0.0}

    def step(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.process_time()
        out = fn(*args)
        if warm:
            cpu[name] += time.process_time() - t
        return out

    send_classify(app, 0)  # connect the broker outside the measurement
    for i in range(n + 1):  # the first round (statement caches, connections) is not counted
        warm = i > 0
        body = payload + i.to_bytes(8, "little")
        sha = hashlib.sha256(body).hexdigest()
        path, _ = step("spool write", spool.store_incoming, [body], sha)
        receipt = lifecycle.Receipt(
            sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{i + 1}",
            content_sha256=sha,
            calling_ae="BENCH",
            association_id=None,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            modality="CR",
            size_bytes=len(body),
            spool_path=spool.relative(path),
        )
        done = step("received txn", lifecycle.record_receipt, settings.database_url, receipt)
        step("broker publish", send_classify, app, done.instance_id)
        step("queued txn", lifecycle.mark_queued, settings.database_url, [done.instance_id])
    dispose_engines()
    return {k: v * 1000 / n for k, v in cpu.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=200, help="images per run (>= 200 for the record)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--min-mb", type=float, default=None, help="default 2 (--small: 0.05)")
    ap.add_argument("--max-mb", type=float, default=None, help="default 20 (--small: 1)")
    ap.add_argument("--small", action="store_true", help="small images (64-512 KB)")
    ap.add_argument(
        "--node-env",
        action="append",
        default=[],
        metavar="CXR_NAME=VALUE",
        help="a setting for the node process (repeatable)",
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--bookkeeping",
        type=int,
        default=200,
        metavar="N",
        help="also time the node's per-instance steps alone, N times (0: skip)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for item in args.node_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("CXR_"):
            ap.error(f"--node-env takes CXR_NAME=VALUE, not {item!r}")
        NODE_ENV[name] = value
    min_mb = args.min_mb if args.min_mb is not None else (0.05 if args.small else 2.0)
    max_mb = args.max_mb if args.max_mb is not None else (1.0 if args.small else 20.0)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cxr-ingest-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        files = generate(
            work / "images", args.count, min_mb, max_mb, SMALL_BASES if args.small else None
        )
        sizes = np.array([p.stat().st_size for p in files]) / 1e6
        print(
            f"generated {len(files)} images in {time.perf_counter() - t:.1f}s: "
            f"{sizes.sum():.0f} MB, {sizes.min():.1f}-{sizes.max():.1f} MB each "
            f"(mean {sizes.mean():.1f} MB); CPUs: {os.cpu_count()}"
        )
        if NODE_ENV:
            print("node settings: " + " ".join(f"{k}={v}" for k, v in NODE_ENV.items()))
        print(
            f"{'target':<10}{'assocs':>7}{'ok':>6}{'fail':>6}{'seconds':>9}{'inst/s':>9}{'MB/s':>9}"
            f"{'ratio':>8}{'rx CPU ms':>10}{'tx CPU ms':>10}"
        )
        ratios = []
        for conc in args.concurrency:
            base = run_target("storescp", files, conc, work)
            node = run_target("node", files, conc, work)
            for r in (base, node):
                ratio = f"{r.mbps / base.mbps:.2f}x" if r is node else "1.00x"
                print(
                    f"{r.target:<10}{r.concurrency:>7}{r.ok:>6}{r.failed:>6}{r.seconds:>9.2f}"
                    f"{r.ips:>9.2f}{r.mbps:>9.1f}{ratio:>8}{r.target_ms:>10.1f}{r.sender_ms:>10.1f}",
                    flush=True,
                )
            # CPU per instance of receiver + senders: with every core busy, or with one
            # association (receive and send take turns), throughput cannot beat the inverse
            base_cpu, node_cpu = base.target_ms + base.sender_ms, node.target_ms + node.sender_ms
            if node_cpu > 0:
                print(
                    f"    CPU per instance (receiver + sender): storescp {base_cpu:.1f} ms, "
                    f"node {node_cpu:.1f} ms -> CPU-bound node/baseline "
                    f"{base_cpu / node_cpu:.2f}; the node spends {node.target_ms:.1f} ms "
                    f"where storescp spends {base.target_ms:.1f}; 0.8x would need "
                    f"<= {max(base_cpu / 0.8 - node.sender_ms, 0):.1f} ms",
                    flush=True,
                )
            ratios.append(f"c{conc}={node.mbps / base.mbps:.2f}")
        if args.bookkeeping:
            sys.path.insert(0, str(REPO))
            costs = bookkeeping_cost(work, args.bookkeeping)
            print(
                "node's per-instance steps alone, CPU ms: "
                + ", ".join(f"{k} {v:.1f}" for k, v in costs.items())
                + f"; sum {sum(costs.values()):.1f}",
                flush=True,
            )
        print(f"ratios: {' '.join(ratios)}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
