"""The web console's test stack: a real ``cxr run`` (node, worker, web) with the shipped
model, a result PACS (pynetdicom SCP) that can refuse a study, and real radiographs from
../shared/data/cxr pushed with DCMTK's dcmsend. The audit DB it fills is what the API and
the pages are tested against."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import CXR_DATA, REPO, dcmtk, free_port, make_chest_dataset, need_shared
from tests.ship.conftest import clean_env, descendants, pid_alive

PHI_NAME = "Zyxquor^Phineas"
PHI_ID = "PHI-WEB-55123"
VIEWER_PASSWORD = "viewer-pass-4711"
MAX_UPLOAD = 6 * 1024 * 1024
COVID_PNG = "COVID/hannover__006f3a8a.png"
NORMAL_PNG = "Normal/jsrt__JPCNN002.png"
FINAL = {"delivered", "delivered_with_warning", "delivery_failed", "failed", "ignored"}


@pytest.fixture(scope="session")
def shipped_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX cache of the shipped model, exported once (about 30 s) for the session."""
    cache = tmp_path_factory.mktemp("shipped-model-cache")
    png = need_shared(CXR_DATA / NORMAL_PNG)
    env = clean_env(CXR_MODEL_CACHE_DIR=str(cache))
    res = subprocess.run(
        [sys.executable, "-m", "apps.cli", "predict", "--json", str(png)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return cache


def radiograph_dataset(png: Path, accession: str, **kw: object):  # type: ignore[no-untyped-def]
    """A DX instance carrying the pixels of a real radiograph (8 bit)."""
    import cv2

    grey = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    assert grey is not None, png
    ds = make_chest_dataset(pixels=np.ascontiguousarray(grey), bits=8, modality="DX", **kw)  # type: ignore[arg-type]
    ds.AccessionNumber = accession
    return ds


@dataclass
class ResultPacs:
    """A Storage SCP for the results; it answers 0xA700 for studies in ``refuse``."""

    port: int
    received: list[tuple[str, str]] = field(default_factory=list)  # (study, SOP class)
    refuse: set[str] = field(default_factory=set)  # StudyInstanceUIDs answered 0xA700
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class WebStack:
    proc: subprocess.Popen[bytes]
    work: Path
    base_url: str
    dicom_port: int
    admin_password: str
    pacs: ResultPacs
    stdout_path: Path
    stderr_path: Path
    studies: dict[str, str] = field(default_factory=dict)  # name -> StudyInstanceUID
    sops: dict[str, str] = field(default_factory=dict)  # name -> SOPInstanceUID

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def admin(self) -> tuple[str, str]:
        return ("admin", self.admin_password)

    @property
    def viewer(self) -> tuple[str, str]:
        return ("viewer", VIEWER_PASSWORD)

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kw)  # type: ignore[arg-type]

    def states(self) -> dict[str, str]:
        with self.client(auth=self.admin) as c:
            items = c.get("/api/v1/instances", params={"limit": 500}).json()["items"]
        return {i["sop_instance_uid"]: i["state"] for i in items}

    def wait_states(self, want: dict[str, set[str]], timeout: float = 180.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        got: dict[str, str] = {}
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"cxr run died:\n{self.stderr[-4000:]}"
            got = self.states()
            if all(got.get(uid) in states for uid, states in want.items()):
                return got
            time.sleep(0.5)
        raise AssertionError(f"states not reached in {timeout}s: {got}\n{self.stderr[-4000:]}")


def _start_pacs() -> tuple[ResultPacs, object]:
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    pacs = ResultPacs(port=free_port())

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        study = str(ds.StudyInstanceUID)
        with pacs.lock:
            if study in pacs.refuse:
                return 0xA700  # Refused: Out of Resources (PS3.4 B.2.3)
            pacs.received.append((study, str(ds.SOPClassUID)))
        return 0x0000

    ae = AE(ae_title="WEB_PACS")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    ae.add_supported_context(Verification)
    server = ae.start_server(
        ("127.0.0.1", pacs.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    return pacs, server


def _dcmsend(port: int, files: list[Path]) -> None:
    res = subprocess.run(
        [dcmtk("dcmsend"), "-aet", "MODALITY1", "-aec", "CXR_WORKER", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="package")
def stack(
    tmp_path_factory: pytest.TempPathFactory, shipped_model_cache: Path
) -> Iterator[WebStack]:
    data = need_shared(CXR_DATA)
    work = tmp_path_factory.mktemp("webstack")
    pacs, server = _start_pacs()
    dicom_port, metrics_port, web_port = free_port(), free_port(), free_port()
    env = clean_env(
        CXR_DICOM_HOST="127.0.0.1",
        CXR_DICOM_PORT=str(dicom_port),
        CXR_METRICS_HOST="127.0.0.1",
        CXR_METRICS_PORT=str(metrics_port),
        CXR_WEB_HOST="127.0.0.1",
        CXR_WEB_PORT=str(web_port),
        CXR_WEB_VIEWER_PASSWORD=VIEWER_PASSWORD,
        CXR_WEB_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        CXR_SPOOL_DIR=str(work / "spool"),
        CXR_DATABASE_URL=f"sqlite:///{work / 'audit.db'}",
        CXR_EMBEDDED_BROKER_PATH=str(work / "broker.sqlite"),
        CXR_MODEL_CACHE_DIR=str(shipped_model_cache),
        CXR_DESTINATIONS=f"WEB_PACS@127.0.0.1:{pacs.port}",
        CXR_DELIVERY_MAX_ATTEMPTS="1",
        CXR_REQUEUE_INTERVAL="5",
        CXR_LOG_JSON="true",
    )
    out, err = work / "stdout.txt", work / "stderr.txt"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "apps.cli", "run", "--workers", "1"],
            cwd=work,
            env=env,
            stdout=fo,
            stderr=fe,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        text = ""
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"cxr run exited:\n{err.read_text()[-4000:]}"
            text = out.read_text(errors="replace")
            if "cxr run: ready" in text:
                break
            time.sleep(0.3)
        m_url = re.search(r"web console\s*:\s*(http://\S+?)/?\s", text)
        m_pw = re.search(r"admin password\s*:\s*(\S+)", text)
        assert m_url and m_pw, text
        st = WebStack(proc, work, m_url.group(1), dicom_port, m_pw.group(1), pacs, out, err)
        # the web child has started and its model is loaded
        while time.monotonic() < deadline:
            try:
                h = httpx.get(st.base_url + "/api/v1/health", timeout=5).json()
                if h["checks"].get("model", {}).get("ok") and h["checks"]["node"]["ok"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"web not healthy:\n{st.stderr[-4000:]}")
        # real radiographs: a COVID one (with PHI in its header), a normal one, and two
        # whose studies the PACS refuses (delivery_failed; the API test retries the first,
        # the browser test the second)
        files = []
        for name, rel, kw in (
            ("covid", COVID_PNG, {"patient_name": PHI_NAME, "patient_id": PHI_ID}),
            ("normal", NORMAL_PNG, {}),
            ("refused", NORMAL_PNG, {}),
            ("refused2", NORMAL_PNG, {}),
        ):
            ds = radiograph_dataset(data / rel, f"ACC-{name.upper()}", **kw)
            st.studies[name] = str(ds.StudyInstanceUID)
            st.sops[name] = str(ds.SOPInstanceUID)
            path = work / f"{name}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        pacs.refuse.update({st.studies["refused"], st.studies["refused2"]})
        _dcmsend(dicom_port, files)
        st.wait_states(
            {
                st.sops["covid"]: {"delivered"},
                st.sops["normal"]: {"delivered"},
                st.sops["refused"]: {"delivery_failed"},
                st.sops["refused2"]: {"delivery_failed"},
            }
        )
        yield st
    finally:
        kids = descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in kids:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        server.shutdown()  # type: ignore[attr-defined]
