"""The demo PACS configuration (docker/orthanc.json + docker/cxr-route.lua), run by Debian's
Orthanc on free loopback ports: CR/DX go to the node, other modalities and the node's own
results do not (no routing loop)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, make_chest_dataset

pytestmark = pytest.mark.orthanc

ORTHANC = Path("/usr/sbin/Orthanc")


@pytest.fixture
def node_stub() -> Iterator[tuple[int, list[str]]]:
    """A Storage SCP with the node's AE title, recording the SOP Instance UIDs it gets."""
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    got: list[str] = []

    def on_store(event: evt.Event) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000  # PS3.4 B.2.3 Success

    ae = AE(ae_title="CXR_WORKER")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield port, got
    finally:
        server.shutdown()


@pytest.fixture
def demo_orthanc(tmp_path: Path, node_stub: tuple[int, list[str]]) -> Iterator[int]:
    if not ORTHANC.exists():
        pytest.skip("Debian's Orthanc is not installed (apt-get install orthanc; .ci/run does)")
    cfg = json.loads((REPO / "docker" / "orthanc.json").read_text())
    dicom_port = free_port()
    cfg.update(
        DicomPort=dicom_port,
        HttpPort=free_port(),
        RemoteAccessAllowed=False,
        StorageDirectory=str(tmp_path / "db"),
        IndexDirectory=str(tmp_path / "db"),
        LuaScripts=[str(REPO / "docker" / "cxr-route.lua")],
    )
    cfg["DicomModalities"]["cxr"].update(Host="127.0.0.1", Port=node_stub[0])
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(cfg))
    log = open(tmp_path / "orthanc.log", "wb")
    proc = subprocess.Popen([str(ORTHANC), str(path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited: {(tmp_path / 'orthanc.log').read_text()[-2000:]}")
            if _echo(dicom_port):
                break
            time.sleep(0.3)
        else:
            pytest.fail("Orthanc did not start")
        yield dicom_port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _echo(port: int) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    if not assoc.is_established:
        return False
    assoc.release()
    return True


def _store(port: int, calling: str, datasets: list) -> None:
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000  # PS3.4 B.2.3 Success
    finally:
        assoc.release()


def test_demo_pacs_routes_cr_dx_to_the_node(demo_orthanc: int, node_stub) -> None:
    from pydicom.uid import CTImageStorage

    _, got = node_stub
    cr = make_chest_dataset(modality="CR", seed=1)
    dx = make_chest_dataset(modality="DX", seed=2)
    ct = make_chest_dataset(modality="CT", sop_class=CTImageStorage, seed=3)
    result = make_chest_dataset(modality="CR", seed=4)  # what the node sends back
    _store(demo_orthanc, "MODALITY1", [cr, dx, ct])
    _store(demo_orthanc, "CXR_WORKER", [result])
    deadline = time.monotonic() + 30
    want = {str(cr.SOPInstanceUID), str(dx.SOPInstanceUID)}
    while time.monotonic() < deadline and not want <= set(got):
        time.sleep(0.2)
    time.sleep(2)  # anything else would have been routed by now
    assert sorted(got) == sorted(want)
