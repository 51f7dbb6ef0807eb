"""A real PACS for the end-to-end tests: Debian's Orthanc on free loopback ports.

:class:`Orthanc` writes a JSON configuration in a temporary folder (storage and index in
that folder, no remote access, no authentication, AE ``ORTHANC``; no plugins unless
``dicomweb=True``: then Debian's orthanc-dicomweb plugin serves DICOMweb under
``/dicom-web/``, :attr:`Orthanc.dicomweb_root`), knows our
node as modality ``cxr`` (so ``POST /modalities/cxr/store`` pushes to it) and accepts
C-STOREs from anyone. It can be stopped and started again on the same ports and storage
(the "PACS down during delivery" fault). The REST client uses only urllib.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
ORTHANC_AET = "ORTHANC"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMWEB_ROOT = "/dicom-web/"


class Orthanc:
    def __init__(
        self,
        workdir: Path,
        http_port: int,
        dicom_port: int,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        dicomweb: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.modalities = dict(modalities or {})
        self.dicomweb = dicomweb
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{http_port}"
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"

    @property
    def dicomweb_root(self) -> str:
        """The DICOMweb service root URL (with ``dicomweb=True``), no trailing slash."""
        return self.base + DICOMWEB_ROOT.rstrip("/")

    # ------------------------------------------------------------------ process
    def write_config(self) -> Path:
        (self.workdir / "storage").mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "cxr-e2e",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "StableAge": 1,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "DicomScuTimeout": 20,
            "StorageCompression": False,
            "LimitFindResults": 0,
            "HttpTimeout": 30,
            "KeepAlive": True,
        }
        if self.dicomweb:
            cfg["DicomWeb"] = {"Enable": True, "Root": DICOMWEB_ROOT}
        self.config_path.write_text(json.dumps(cfg, indent=2))
        return self.config_path

    def start(self, timeout: float = 30.0) -> Orthanc:
        if not self.config_path.exists():
            self.write_config()
        logf = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [str(ORTHANC_BIN), str(self.config_path)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self.tail()}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer in {timeout} s: {self.tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------ REST
    def _request(
        self, method: str, path: str, body: bytes | None = None, ctype: str | None = None
    ) -> Any:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        if ctype:
            req.add_header("Content-Type", ctype)
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return data

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        if isinstance(payload, bytes):
            return self._request("POST", path, payload, "application/dicom")
        return self._request("POST", path, json.dumps(payload).encode(), "application/json")

    def upload(self, path: Path) -> dict[str, Any]:
        """POST /instances: returns Orthanc's answer (ID, ParentStudy, ...)."""
        return self.post("/instances", Path(path).read_bytes())

    def push(self, modality: str, orthanc_ids: list[str], synchronous: bool = True) -> Any:
        """C-STORE the given Orthanc resources to a configured modality."""
        return self.post(
            f"/modalities/{modality}/store",
            {"Resources": orthanc_ids, "Synchronous": synchronous},
        )

    def put(self, path: str, payload: Any) -> Any:
        return self._request("PUT", path, json.dumps(payload).encode(), "application/json")

    def set_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a DICOM modality now (REST) and in the configuration (for restarts)."""
        self.modalities[name] = (aet, host, port)
        self.write_config()
        if self.proc is not None:
            self.put(f"/modalities/{name}", [aet, host, port])

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def tags(self, orthanc_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def full_tags(self, orthanc_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{orthanc_id}/tags"))

    def file(self, orthanc_id: str) -> bytes:
        return self._request("GET", f"/instances/{orthanc_id}/file")

    def all_instance_tags(self) -> list[dict[str, Any]]:
        out = []
        for oid in self.instances():
            t = self.tags(oid)
            t["_id"] = oid
            out.append(t)
        return out

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        res = self.post(
            "/tools/find",
            {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        )
        return list(res)
