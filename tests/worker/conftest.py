"""Fixtures of the worker tests (other helpers may append theirs below)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.worker.orthanc import DICOMWEB_PLUGIN, ORTHANC_BIN, Orthanc


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny, fast, deterministic model artifact (random weights) for pipeline tests."""
    from ml.artifact import make_tiny_artifact

    return make_tiny_artifact(tmp_path_factory.mktemp("tiny-model") / "cxr-tiny", image_size=64)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A running Orthanc on free loopback ports; ``orthanc.modalities`` may be set before
    a restart. Killed in teardown."""
    if not ORTHANC_BIN.exists():
        pytest.skip("Debian's Orthanc (/usr/sbin/Orthanc) is not installed")
    o = Orthanc(tmp_path / "orthanc", free_port(), free_port())
    o.start()
    try:
        yield o
    finally:
        o.stop()


@pytest.fixture
def orthanc_dicomweb(tmp_path: Path) -> Iterator[Orthanc]:
    """Like ``orthanc``, with the orthanc-dicomweb plugin loaded (STOW-RS under
    ``orthanc.dicomweb_root``)."""
    if not ORTHANC_BIN.exists():
        pytest.skip("Debian's Orthanc (/usr/sbin/Orthanc) is not installed")
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip(f"Debian's orthanc-dicomweb plugin ({DICOMWEB_PLUGIN}) is not installed")
    o = Orthanc(tmp_path / "orthanc-dicomweb", free_port(), free_port(), dicomweb=True)
    o.start()
    try:
        yield o
    finally:
        o.stop()


def insert_instance(settings, data: bytes | Path, state: str = "queued", version: int = 1) -> int:  # type: ignore[no-untyped-def]
    """Do what the node does on a durable receipt: spool the file and write the
    ``instances`` row (for pipeline tests that run without the node)."""
    import pydicom

    from cxr.contracts import hash_patient_id
    from cxr.storage import Spool
    from db.models import Event, Instance
    from db.session import session_scope

    if isinstance(data, Path):
        data = data.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    sha = hashlib.sha256(data).hexdigest()
    path, _ = Spool(settings.spool_dir).store_incoming(data, sha)
    with session_scope(settings.database_url) as s:
        inst = Instance(
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            study_instance_uid=str(ds.get("StudyInstanceUID", "")),
            series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
            modality=str(ds.get("Modality", "")),
            accession_number=str(ds.get("AccessionNumber", "")) or None,
            patient_id_hash=hash_patient_id(settings, str(ds.get("PatientID", ""))),
            content_sha256=sha,
            size_bytes=len(data),
            spool_path=str(path),
            state=state,
            version=version,
        )
        s.add(inst)
        s.flush()
        s.add(Event(instance_id=inst.id, kind=state, detail="inserted by test"))
        return int(inst.id)


def dataset_bytes(ds) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- results / delivery / audit fixtures (worker.results, worker.delivery, apps.audit_cli) ---
DCIODVFY = Path("/usr/bin/dciodvfy")


class FakePrediction:
    """The fields of :class:`ml.runtime.Prediction` the result builders use, with a CAM
    that peaks at a known place of the square model frame."""

    def __init__(
        self,
        label: str = "COVID",
        probs: tuple[float, float, float] = (0.7, 0.2, 0.1),
        size: int = 64,
        peak: tuple[int, int] | None = (16, 40),
    ) -> None:
        import numpy as np

        self.label = label
        self.probabilities = dict(zip(("COVID", "Normal", "Other"), probs, strict=True))
        if peak is None:
            self.cam = None
        else:
            yy, xx = np.mgrid[0:size, 0:size]
            self.cam = np.exp(-((yy - peak[0]) ** 2 + (xx - peak[1]) ** 2) / (2 * (size / 10) ** 2))
            self.cam = self.cam.astype(np.float32)
        self.model_grey = np.zeros((size, size), np.uint8)
        self.timings_ms = {"preprocess": 1.0, "forward": 2.0, "cam": 0.5}


@pytest.fixture
def model_info():  # type: ignore[no-untyped-def]
    from worker.results import ModelInfo

    return ModelInfo(name="cxr-test-model", version="1.2.3", sha256="ab" * 32)


def read_sample(path: Path):  # type: ignore[no-untyped-def]
    """Read a shared sample like the node does (a file without a Part 10 header gets the
    transfer syntax it was read with)."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
        )
    return ds


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) reported by dicom3tools' dciodvfy for one file."""
    import subprocess

    if not DCIODVFY.exists():
        pytest.skip("dicom3tools' dciodvfy is not installed (apt-get install dicom3tools)")
    out = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    return (
        [ln for ln in lines if ln.startswith("Error")],
        [ln for ln in lines if ln.startswith("Warning")],
    )


# --------------------------------------------------------------------------- end to end
# A whole installation on loopback: Orthanc (the PACS), `cxr node` and `cxr worker`
# subprocesses sharing one audit DB, one spool and one broker. Used by test_e2e_*.py.

import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from tests.conftest import REPO  # noqa: E402


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Proc:
    """A `cxr ...` subprocess in its own process group, its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        logf = open(log_path, "ab")  # noqa: SIM115
        self.p = subprocess.Popen(
            [sys.executable, "-m", "apps.cli", *args],
            env=env,
            cwd=REPO,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logf.close()

    def alive(self) -> bool:
        return self.p.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a prefork worker = parent + pool children)."""
        if self.alive():
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            self.p.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
        # leftovers of the group (e.g. pool children) must not outlive the test
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class RedisServer:
    """A private, non-persistent redis-server on a free port (the broker can be stopped)."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.port = port
        self.workdir = workdir
        self.p: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.p = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(lambda: _port_open(self.port), 10, what="redis-server")
        return self

    def stop(self) -> None:
        p, self.p = self.p, None
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(10)


class Stack:
    """Orthanc + node + workers sharing settings given as CXR_* variables."""

    def __init__(
        self,
        tmp: Path,
        orthanc: Orthanc,
        db_url: str,
        model_dir: Path,
        model_cache: Path,
        broker_url: str = "",
        **env: object,
    ) -> None:
        self.tmp = tmp
        self.orthanc = orthanc
        self.db_url = db_url
        self.node_port = free_port()
        self.procs: list[Proc] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        self.env.update(
            {
                "CXR_DATABASE_URL": db_url,
                "CXR_SPOOL_DIR": str(tmp / "spool"),
                "CXR_MODEL_DIR": str(model_dir),
                "CXR_MODEL_CACHE_DIR": str(model_cache),
                "CXR_EMBEDDED_BROKER_PATH": str(tmp / "broker.sqlite"),
                "CXR_DESTINATIONS": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                "CXR_AE_TITLE": "CXR_WORKER",
                "CXR_DICOM_HOST": "127.0.0.1",
                "CXR_DICOM_PORT": str(self.node_port),
                "CXR_METRICS_PORT": "0",
                "CXR_REQUEUE_INTERVAL": "1",
                "CXR_REQUEUE_STALE_AFTER": "20",
                "CXR_RETRY_BACKOFF_MAX": "2",
                "CXR_DELIVERY_MAX_ATTEMPTS": "5",
                "CXR_WORKER_CONCURRENCY": "1",
                "CXR_LOG_LEVEL": "INFO",
                "TF_CPP_MIN_LOG_LEVEL": "2",
            }
        )
        if broker_url:
            self.env["CXR_BROKER_URL"] = broker_url
        self.env.update({k: str(v) for k, v in env.items()})
        orthanc.set_modality("cxr", "CXR_WORKER", "127.0.0.1", self.node_port)

    @property
    def settings(self):  # type: ignore[no-untyped-def]
        from cxr.settings import load_settings

        return load_settings(database_url=self.db_url, spool_dir=self.tmp / "spool")

    def start_node(self) -> Proc:
        p = Proc("node", ["node"], self.env, self.tmp / f"node-{len(self.procs)}.log")
        self.procs.append(p)
        wait_for(lambda: _port_open(self.node_port) or not p.alive(), 120, what="cxr node")
        assert p.alive(), p.log()[-3000:]
        return p

    def start_worker(self, concurrency: int = 1, timeout: float = 180.0, **env: object) -> Proc:
        """Start `cxr worker`; ``timeout`` covers the model warm-up (an ONNX export for a
        model not in the cache yet: about a minute for DenseNet169 on a loaded 2-core box)."""
        e = dict(self.env, CXR_WORKER_CONCURRENCY=str(concurrency))
        e.update({k: str(v) for k, v in env.items()})
        n = len(self.procs)
        p = Proc(
            f"worker{n}", ["worker", "--hostname", f"cxr{n}@e2e"], e, self.tmp / f"worker-{n}.log"
        )
        self.procs.append(p)
        wait_for(lambda: " ready." in p.log() or not p.alive(), timeout, what="cxr worker ready")
        assert p.alive(), p.log()[-3000:]
        return p

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.log()[-4000:]}" for p in self.procs)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    # ------------------------------------------------------------------ audit queries
    def instances(self) -> list[Instance]:  # noqa: F821
        from sqlalchemy import select

        from db.models import Instance
        from db.session import session_scope

        with session_scope(self.db_url) as s:
            rows = s.execute(select(Instance).order_by(Instance.id)).scalars().all()
            for r in rows:
                s.expunge(r)
            return list(rows)

    def wait_all_final(self, n: int, timeout: float) -> list:  # type: ignore[type-arg]
        from worker.pipeline import is_finished

        def done():  # type: ignore[no-untyped-def]
            rows = self.instances()
            if len(rows) >= n and all(is_finished(r.state, r.finished_at) for r in rows):
                return rows
            return None

        try:
            return wait_for(done, timeout, interval=0.5, what=f"{n} instances final")
        except AssertionError as exc:
            states = [(r.id, r.state, r.reason) for r in self.instances()]
            raise AssertionError(f"{exc}\nstates: {states}\n{self.logs()}") from None


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """One ONNX export cache shared by every e2e process of the session, warmed with the
    tiny model (so a worker's first task does not spend many seconds exporting it)."""
    from ml.runtime import Classifier

    cache = tmp_path_factory.mktemp("model-cache")
    Classifier.load(tiny_model_dir, engine="auto", cache_dir=cache)
    return cache


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for one test. The shared server's scratch DB (``redis_db``)
    is flushed by other tests and, when two test sessions run at once, its ``cxr`` queue
    would be consumed by the other session's workers: end-to-end tests use their own."""
    import shutil

    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    r = RedisServer(tmp_path / "redis", free_port()).start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(autouse=True)
def _no_lane_outlives_its_test() -> Iterator[None]:
    """A test that classified through the tasks leaves this process's delivery lane
    running (its heartbeat renews a lease in that test's DB): stop it after each test."""
    yield
    from worker.lane import close_lane

    close_lane(10)
