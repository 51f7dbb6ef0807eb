"""Shared fixtures: free ports, audit DBs (SQLite and the real PostgreSQL), shared/ data,
and strict generators of small chest DICOM files."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
DICOM_SAMPLES = SHARED / "dicom-samples"
CXR_DATA = SHARED / "data" / "cxr"
PG_ADMIN_URL = os.environ.get(
    "CXR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("CXR_TEST_REDIS_URL", "redis://127.0.0.1:6379")
# pynetdicom installs its own storescu/echoscu on PATH: use DCMTK's binaries explicitly
DCMTK_BIN = Path("/usr/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared test data (../shared) is not checked out here")
    return path


@pytest.fixture(scope="session")
def dicom_samples() -> Path:
    return need_shared(DICOM_SAMPLES)


@pytest.fixture(scope="session")
def cxr_data() -> Path:
    return need_shared(CXR_DATA)


def dcmtk(tool: str) -> str:
    exe = DCMTK_BIN / tool
    if not exe.exists():
        pytest.skip(f"DCMTK {tool} not installed (apt-get install dcmtk; .ci/run does this)")
    return str(exe)


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3
        ):
            return True
    except Exception:
        return False


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'audit.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL schema on the real server (dropped afterwards)."""
    if not _pg_available():
        pytest.fail("PostgreSQL on 127.0.0.1:5432 is not reachable (.ci/run starts it)")
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(
        "host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True
    ) as c:
        c.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    # a component of the test (a node still stopping) may hold locks in the schema: close
    # this process's pooled connections first, and retry the drop if it deadlocks with one
    import time

    from db.session import dispose_engines

    dispose_engines()
    for attempt in range(10):
        try:
            with psycopg.connect(
                "host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True
            ) as c:
                c.execute(f'DROP SCHEMA "{schema}" CASCADE')
            break
        except (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable):
            if attempt == 9:
                raise
            time.sleep(0.5)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Runs a test against SQLite and against the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def redis_db() -> Iterator[str]:
    """A Redis URL on a scratch DB index, flushed before and after."""
    import redis

    url = f"{REDIS_URL}/13"
    r = redis.Redis.from_url(url)
    try:
        r.ping()
    except Exception:
        pytest.fail("Redis on 127.0.0.1:6379 is not reachable (.ci/run starts it)")
    r.flushdb()
    yield url
    r.flushdb()


def make_chest_dataset(
    rows: int = 64,
    cols: int = 64,
    bits: int = 12,
    photometric: str = "MONOCHROME2",
    modality: str = "CR",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    sop_class: str | None = None,
    patient_name: str = "Doe^Jane",
    patient_id: str = "PID-12345",
    seed: int = 0,
    pixels: np.ndarray | None = None,
):
    """A small, valid CR/DX image with a chest-like gradient (pydicom, explicit VR LE)."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    if sop_class is None:
        sop_class = (
            ComputedRadiographyImageStorage
            if modality == "CR"
            else DigitalXRayImageStorageForPresentation
        )
    rng = np.random.default_rng(seed)
    if pixels is None:
        yy, xx = np.mgrid[0:rows, 0:cols]
        base = 0.5 + 0.3 * np.sin(xx / cols * np.pi) * np.cos((yy / rows - 0.5) * np.pi)
        pixels = (base + 0.05 * rng.standard_normal((rows, cols))).clip(0, 1)
        pixels = (pixels * (2**bits - 1)).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC001"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16 if bits > 8 else np.uint8).tobytes()
    return ds


@pytest.fixture
def chest_ds():
    return make_chest_dataset()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a scratch cwd with CXR_* variables cleared, so settings come from the test."""
    for k in list(os.environ):
        if k.startswith("CXR_"):
            monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    from cxr.settings import get_settings

    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- CI guard
# In CI every prerequisite (../shared, DCMTK, Orthanc, dicom3tools, Redis, PostgreSQL, the
# shipped model) is present, so a skipped test means something silently did not run.
# With CXR_FAIL_ON_SKIP=1 (set by .ci/run) any skip turns the run red.
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CXR_FAIL_ON_SKIP") == "1" and _skipped and exitstatus == 0:
        print("\nCXR_FAIL_ON_SKIP=1 and these tests were skipped:", *_skipped, sep="\n  ")
        session.exitstatus = 1
