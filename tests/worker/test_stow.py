"""STOW-RS (DICOMweb) destinations: the pipeline delivers the SC, SR and heat map to a real
Orthanc with Debian's orthanc-dicomweb plugin (the results join the source's study and
reference it); a wrong path (HTTP 404) is a failure that is retried and ends
``delivery_failed``; a STOW-RS response body that lists a failure
(FailedSOPSequence), a warning (WarningReason), a 202 partial answer or a 409, which
Orthanc cannot be made to answer, come from a tiny HTTP server of the test itself."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from cxr.settings import DicomWebDestination, load_settings
from db.models import Delivery, Instance, State
from db.session import init_db, session_scope
from tests.conftest import free_port, make_chest_dataset
from tests.worker.conftest import insert_instance
from tests.worker.result_refs import RESULT_CLASSES, check_references, wait_results
from worker import pipeline
from worker.delivery import FAILURE_OUTCOME, SUCCESS_OUTCOME, UNREACHABLE_OUTCOME, WARNING_OUTCOME
from worker.stow import stow_datasets

SAMPLE = "dx_thorax_monochrome1.dcm"


def _settings(tmp_path: Path, db_url: str, model_dir: Path, dest: str = "", **kw):  # type: ignore[no-untyped-def]
    s = load_settings(
        database_url=db_url,
        spool_dir=tmp_path / "spool",
        model_dir=model_dir,
        model_cache_dir=tmp_path / "model-cache",
        destinations=dest,
        metrics_port=0,
        **kw,
    )
    init_db(s.database_url)
    return s


def _rows(settings, iid: int) -> dict[tuple[str, str], Delivery]:  # type: ignore[no-untyped-def]
    with session_scope(settings.database_url) as ss:
        rows = ss.execute(select(Delivery).where(Delivery.instance_id == iid)).scalars().all()
        for r in rows:
            ss.expunge(r)
    return {(r.destination, r.kind): r for r in rows}


def _state(settings, iid: int) -> Instance:  # type: ignore[no-untyped-def]
    with session_scope(settings.database_url) as ss:
        inst = ss.get(Instance, iid)
        assert inst is not None
        ss.expunge(inst)
        return inst


# ------------------------------------------------------------------ settings
def test_dicomweb_destinations_parse_beside_cstore_ones() -> None:
    s = load_settings(
        destinations="PACS@10.0.0.5:104, dicomweb+https://pacs.example:8443/dicom-web/ ,"
        "dicomweb+http://127.0.0.1:8042/dicom-web"
    )
    assert [d.kind for d in s.destinations] == ["dimse", "dicomweb", "dicomweb"]
    assert str(s.destinations[1]) == "dicomweb+https://pacs.example:8443/dicom-web"
    assert s.destinations[1].url == "https://pacs.example:8443/dicom-web"  # type: ignore[union-attr]
    for bad in (
        "dicomweb+http://user:secret@pacs/dicom-web",  # credentials belong in settings
        "dicomweb+ftp://pacs/dicom-web",
        "dicomweb+http://pacs:70000/x",
        "dicomweb+http:///nohost",
    ):
        with pytest.raises(SystemExit) as exc:
            load_settings(destinations=bad)
        assert "CXR_DESTINATIONS" in str(exc.value) and "secret" not in str(exc.value)
    with pytest.raises(SystemExit):
        load_settings(dicomweb_username="u", dicomweb_token="t")


# ------------------------------------------------------------------ real Orthanc
@pytest.mark.orthanc
def test_pipeline_delivers_sc_sr_and_heat_map_by_stow_rs_to_orthanc(
    tmp_path, sqlite_url, tiny_model_dir, orthanc_dicomweb, dicom_samples
):  # type: ignore[no-untyped-def]
    o = orthanc_dicomweb
    dest = f"dicomweb+{o.dicomweb_root}"
    s = _settings(tmp_path, sqlite_url, tiny_model_dir, dest)
    # the source image is in the PACS (as when it pushed it to us); the results join its study
    src_id = o.upload(dicom_samples / "chest" / SAMPLE)["ID"]
    source = o.tags(src_id)
    iid = insert_instance(s, dicom_samples / "chest" / SAMPLE)
    out = pipeline.process_instance(s, iid)
    assert out.action == "delivered", out
    assert _state(s, iid).state == State.DELIVERED.value

    rows = _rows(s, iid)
    assert set(rows) == {(dest, kind) for kind in RESULT_CLASSES}
    for r in rows.values():
        assert r.state == "delivered" and r.attempts == 1 and r.last_status == "HTTP 200"
    # Orthanc holds exactly the SC, the SR and the heat map, in the source's study, stored
    # via STOW-RS, each referencing the source image (and the SR the heat map)
    results = wait_results(o, source)
    check_references(results, source)
    assert {k: str(ds.SOPInstanceUID) for k, ds in results.items()} == {
        kind: rows[(dest, kind)].sop_instance_uid for kind in RESULT_CLASSES
    }
    assert results["HM"].Modality == "SEG" and results["HM"].SeriesNumber == 9903
    assert results["SC"].ManufacturerModelName == "cxr-tiny-test"
    # exactly once: a later message for the delivered instance sends nothing
    assert pipeline.deliver(s, iid).action == "skipped"
    assert all(r.attempts == 1 for r in _rows(s, iid).values())
    assert len(o.instances()) == 4  # the source + the three results


@pytest.mark.orthanc
def test_stow_rs_404_is_a_failure_retried_then_delivery_failed(
    tmp_path, sqlite_url, tiny_model_dir, orthanc_dicomweb, dicom_samples
):  # type: ignore[no-untyped-def]
    o = orthanc_dicomweb
    good = f"dicomweb+{o.dicomweb_root}"
    bad = f"dicomweb+{o.base}/no-such-dicomweb-root"
    s = _settings(tmp_path, sqlite_url, tiny_model_dir, f"{bad},{good}")
    iid = insert_instance(s, dicom_samples / "chest" / SAMPLE)
    with pytest.raises(pipeline.DeliveryIncomplete) as exc:
        pipeline.process_instance(s, iid)
    assert "HTTP 404" in exc.value.detail
    assert _state(s, iid).state == State.CLASSIFIED.value  # waits for its retry
    with pytest.raises(pipeline.DeliveryIncomplete):
        pipeline.deliver(s, iid, final_attempt=False)  # retry 1
    out = pipeline.deliver(s, iid, final_attempt=True)  # the last attempt
    assert out.action == "delivery_failed"
    inst = _state(s, iid)
    assert inst.state == State.DELIVERY_FAILED.value and "no-such-dicomweb-root" in inst.reason
    rows = _rows(s, iid)
    assert set(rows) == {(d, kind) for d in (bad, good) for kind in RESULT_CLASSES}
    for kind in RESULT_CLASSES:
        assert rows[(bad, kind)].state == "failed" and rows[(bad, kind)].attempts == 3
        assert rows[(bad, kind)].last_status == "HTTP 404"
        # the good destination got each result once, on the first attempt
        assert rows[(good, kind)].state == "delivered" and rows[(good, kind)].attempts == 1
    assert len(o.instances()) == 3  # SC, SR and heat map, from the good destination


# ------------------------------------------------------------------ STOW-RS answers
class StowServer:
    """A tiny STOW-RS server: answers each POST with the next (status, body builder) and
    records the requests (path, headers, SOP Instance UIDs in the multipart body)."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.delay = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                uids = _uids_in_multipart(body)
                outer.requests.append({"path": self.path, "headers": dict(self.headers)})
                if outer.delay:
                    time.sleep(outer.delay)
                status, make = outer.answers.pop(0) if outer.answers else (200, None)
                payload = json.dumps(make(uids)).encode() if make else b""
                self.send_response(status)
                if payload:
                    self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def destination(self) -> DicomWebDestination:
        return DicomWebDestination.parse(f"dicomweb+http://127.0.0.1:{self.port}/dicomweb")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _uids_in_multipart(body: bytes) -> list[str]:
    import io

    uids = []
    for part in body.split(b"--0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"):
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep or b"application/dicom" not in head:
            continue
        data = data[:-2] if data.endswith(b"\r\n") else data
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def _ref(uid: str, **extra: Any) -> dict[str, Any]:
    item = {"00081155": {"vr": "UI", "Value": [uid]}, "00081150": {"vr": "UI", "Value": ["1.2"]}}
    for tag, value in extra.items():
        item[tag] = {"vr": "US", "Value": [value]}
    return item


def _body(referenced: list[dict[str, Any]], failed: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if referenced:
        out["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        out["00081198"] = {"vr": "SQ", "Value": failed}
    return out


@pytest.fixture
def stow_server() -> Iterator[StowServer]:
    srv = StowServer()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def two_results() -> list[pydicom.Dataset]:
    a, b = (
        make_chest_dataset(rows=32, cols=32, seed=1),
        make_chest_dataset(rows=32, cols=32, seed=2),
    )
    return [a, b]


def test_failures_in_the_stow_rs_response_body_are_failures(stow_server, two_results, tmp_path):  # type: ignore[no-untyped-def]
    s = load_settings(spool_dir=tmp_path / "spool")
    dest = stow_server.destination()
    a, b = (str(ds.SOPInstanceUID) for ds in two_results)
    stow_server.answers = [
        # 200 but the second one listed as failed (A700 out of resources)
        (200, lambda u: _body([_ref(u[0])], [_ref(u[1], **{"00081197": 0xA700})])),
        # 202 partial: one stored with a warning (B000 coercion), one failed
        (
            202,
            lambda u: _body(
                [_ref(u[0], **{"00081196": 0xB000})], [_ref(u[1], **{"00081197": 0xC000})]
            ),
        ),
        # 202 that leaves one out of the response: not acknowledged = not delivered
        (202, lambda u: _body([_ref(u[0])], [])),
        # 409 conflict with a FailedSOPSequence, and a bare 415
        (
            409,
            lambda u: _body(
                [], [_ref(u[0], **{"00081197": 0x0110}), _ref(u[1], **{"00081197": 0x0110})]
            ),
        ),
        (415, None),
        # all well
        (200, lambda u: _body([_ref(u[0]), _ref(u[1])], [])),
        # 200 listing neither (only a RetrieveURL): 200 means every instance stored
        (200, lambda u: {"00081190": {"vr": "UR", "Value": ["http://x/studies/1"]}}),
        # 200 listing one only: the other was not acknowledged
        (200, lambda u: _body([_ref(u[1])], [])),
    ]
    cats = []
    for _ in range(8):
        outs = stow_datasets(dest, two_results, s)
        assert [o.sop_instance_uid for o in outs] == [a, b]
        cats.append([(o.category, o.status) for o in outs])
    assert cats == [
        [(SUCCESS_OUTCOME, "HTTP 200"), (FAILURE_OUTCOME, "0xA700")],
        [(WARNING_OUTCOME, "0xB000"), (FAILURE_OUTCOME, "0xC000")],
        [(SUCCESS_OUTCOME, "HTTP 202"), (FAILURE_OUTCOME, "HTTP 202")],
        [(FAILURE_OUTCOME, "0x0110"), (FAILURE_OUTCOME, "0x0110")],
        [(FAILURE_OUTCOME, "HTTP 415"), (FAILURE_OUTCOME, "HTTP 415")],
        [(SUCCESS_OUTCOME, "HTTP 200"), (SUCCESS_OUTCOME, "HTTP 200")],
        [(SUCCESS_OUTCOME, "HTTP 200"), (SUCCESS_OUTCOME, "HTTP 200")],
        [(FAILURE_OUTCOME, "HTTP 200"), (SUCCESS_OUTCOME, "HTTP 200")],
    ]
    # one request per attempt, to <root>/studies, both results in it
    assert len(stow_server.requests) == 8
    assert all(r["path"] == "/dicomweb/studies" for r in stow_server.requests)


def test_stow_rs_unreachable_and_timeout(stow_server, two_results, tmp_path):  # type: ignore[no-untyped-def]
    s = load_settings(spool_dir=tmp_path / "spool", dicomweb_timeout=1)
    closed = DicomWebDestination.parse(f"dicomweb+http://127.0.0.1:{free_port()}/dicomweb")
    outs = stow_datasets(closed, two_results, s)
    assert [o.category for o in outs] == [UNREACHABLE_OUTCOME] * 2
    stow_server.delay = 3.0  # longer than CXR_DICOMWEB_TIMEOUT
    outs = stow_datasets(stow_server.destination(), two_results, s)
    assert [o.category for o in outs] == [UNREACHABLE_OUTCOME] * 2


def test_stow_rs_auth_from_settings_never_logged(stow_server, two_results, tmp_path, caplog):  # type: ignore[no-untyped-def]
    caplog.set_level("DEBUG")
    dest = stow_server.destination()
    basic = load_settings(dicomweb_username="cxr", dicomweb_password="pw-s3cret")
    bearer = load_settings(dicomweb_token="tok-s3cret")
    stow_server.answers = [(401, None), (200, None)]
    assert [o.category for o in stow_datasets(dest, two_results, basic)] == [FAILURE_OUTCOME] * 2
    assert [o.category for o in stow_datasets(dest, two_results, bearer)] == [SUCCESS_OUTCOME] * 2
    sent = [r["headers"].get("Authorization") for r in stow_server.requests]
    assert sent == ["Basic " + base64.b64encode(b"cxr:pw-s3cret").decode(), "Bearer tok-s3cret"]
    assert "s3cret" not in caplog.text
    assert "s3cret" not in repr(basic) and "s3cret" not in str(bearer.model_dump())
