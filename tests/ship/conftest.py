"""Fixtures for the ship tests: a tiny model artifact and a supervised ``cxr run`` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small deterministic model artifact (ml.artifact.make_tiny_artifact), built once."""
    out = tmp_path_factory.mktemp("model") / "tiny"
    # in a subprocess: keeps TensorFlow out of the pytest process
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from ml.artifact import make_tiny_artifact; make_tiny_artifact({str(out)!r})",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )
    return out


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CXR_", "PROMETHEUS_"))}
    env.update(extra)
    return env


@dataclass
class RunningPipeline:
    proc: subprocess.Popen[bytes]
    workdir: Path
    dicom_port: int
    metrics_port: int
    db_url: str
    stdout_path: Path
    stderr_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"cxr run exited early ({self.proc.returncode}):\n{self.stderr[-4000:]}"
                )
            if "cxr run: ready" in self.stdout:
                return
            time.sleep(0.3)
        raise AssertionError(f"cxr run not ready in {timeout}s:\n{self.stderr[-4000:]}")

    def children(self) -> list[int]:
        return child_pids(self.proc.pid)


def child_pids(ppid: int) -> list[int]:
    """Direct children of ``ppid`` (from /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid:
            pids.append(int(stat.parent.name))
    return pids


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = child_pids(todo.pop())
        out += kids
        todo += kids
    return out


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def run_pipeline(tmp_path: Path, tiny_model: Path) -> Iterator[object]:
    """Factory: start ``cxr run`` on free ports in a scratch folder; always cleaned up."""
    started: list[RunningPipeline] = []

    def start(
        args: list[str] | None = None, web: bool = False, **env_extra: str
    ) -> RunningPipeline:
        """``web``: also start the web console (off by default: most tests do not need it
        and it loads the model once more)."""
        work = tmp_path / f"run{len(started)}"
        work.mkdir()
        dicom_port, metrics_port = free_port(), free_port()
        db_url = f"sqlite:///{work / 'audit.db'}"
        env = clean_env(
            CXR_DICOM_HOST="127.0.0.1",
            CXR_DICOM_PORT=str(dicom_port),
            CXR_METRICS_PORT=str(metrics_port),
            CXR_METRICS_HOST="127.0.0.1",
            CXR_SPOOL_DIR=str(work / "spool"),
            CXR_DATABASE_URL=db_url,
            CXR_EMBEDDED_BROKER_PATH=str(work / "broker.sqlite"),
            CXR_MODEL_DIR=str(tiny_model),
            CXR_MODEL_CACHE_DIR=str(work / "model-cache"),
            CXR_REQUEUE_INTERVAL="5",
            **env_extra,
        )
        out, err = work / "stdout.txt", work / "stderr.txt"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "apps.cli",
                    "run",
                    *(args or []),
                    *([] if web else ["--no-web"]),
                ],
                cwd=work,
                env=env,
                stdout=fo,
                stderr=fe,
                start_new_session=True,
            )
        rp = RunningPipeline(proc, work, dicom_port, metrics_port, db_url, out, err, env)
        started.append(rp)
        return rp

    try:
        yield start
    finally:
        for rp in started:
            kids = descendants(rp.proc.pid)
            if rp.proc.poll() is None:
                rp.proc.send_signal(signal.SIGTERM)
                try:
                    rp.proc.wait(60)
                except subprocess.TimeoutExpired:
                    rp.proc.kill()
                    rp.proc.wait()
            for pid in kids:
                if pid_alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


@dataclass
class ResultScp:
    ae_title: str
    port: int
    received: list[tuple[str, str]]  # (SOP Class UID, calling AE)

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"


@pytest.fixture
def result_scp() -> Iterator[ResultScp]:
    """A pynetdicom Storage SCP standing in for the PACS that receives SC/SR results."""
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    received: list[tuple[str, str]] = []

    def on_store(event: evt.Event) -> int:
        received.append(
            (str(event.request.AffectedSOPClassUID), event.assoc.requestor.ae_title.strip())
        )
        return 0x0000  # PS3.4 B.2.3 Success

    ae = AE(ae_title="TEST_PACS")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield ResultScp("TEST_PACS", port, received)
    finally:
        server.shutdown()
