"""HL7 v2 ORU^R01 results to a RIS over MLLP, against a REAL MLLP listener of the test
(python-hl7's ``start_hl7_server`` in a thread with its own asyncio loop): the fields of
the message, AA = delivered, AE = a failure retried until ``delivery_failed``, a listener
that is down at first = retried, then delivered exactly once; no ACK = unreachable."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import hl7
import pydicom
import pytest
from hl7.mllp import start_hl7_server
from sqlalchemy import select

from cxr.contracts import hash_patient_id
from cxr.settings import Hl7Destination, load_settings
from db.lifecycle import ReportFacts
from db.models import Delivery, Inference, Instance, State
from db.session import init_db, session_scope
from tests.conftest import free_port
from tests.worker.conftest import insert_instance
from worker import pipeline
from worker.delivery import FAILURE_OUTCOME, SUCCESS_OUTCOME, UNREACHABLE_OUTCOME
from worker.oru import RESEARCH_NOTE, build_oru, control_id, send_oru

SAMPLE = "dx_thorax_monochrome1.dcm"


class MllpListener:
    """A real MLLP server (python-hl7) in a thread with its own event loop. It records
    every message received and answers each with an ACK of ``ack_code`` (``None``: no
    answer at all)."""

    def __init__(self, port: int | None = None, ack_code: str | None = "AA") -> None:
        self.port = port or free_port()
        self.ack_code = ack_code
        self.received: list[hl7.Message] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    async def _client(self, reader, writer) -> None:  # type: ignore[no-untyped-def]
        try:
            while not writer.is_closing():
                msg = await reader.readmessage()
                self.received.append(msg)
                if self.ack_code is None:
                    continue
                writer.writemessage(msg.create_ack(self.ack_code))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def start(self) -> MllpListener:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def serve() -> None:
                self._server = await start_hl7_server(self._client, "127.0.0.1", self.port)
                ready.set()

            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "MLLP listener did not start"
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def close() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = self._server = None

    @property
    def dest(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def listeners() -> Iterator:  # type: ignore[type-arg]
    started: list[MllpListener] = []

    def make(**kw) -> MllpListener:  # type: ignore[no-untyped-def]
        lst = MllpListener(**kw)
        started.append(lst)
        return lst

    try:
        yield make
    finally:
        for lst in started:
            lst.stop()


def _settings(tmp_path: Path, db_url: str, model_dir: Path, **kw):  # type: ignore[no-untyped-def]
    s = load_settings(
        database_url=db_url,
        spool_dir=tmp_path / "spool",
        model_dir=model_dir,
        model_cache_dir=tmp_path / "model-cache",
        metrics_port=0,
        hl7_ack_timeout=3,
        **kw,
    )
    init_db(s.database_url)
    return s


def _field(msg: hl7.Message, seg: str, n: int) -> str:
    return str(msg.segment(seg)[n])


def _obx(msg: hl7.Message) -> dict[str, tuple[str, str]]:
    """OBX-3 code -> (OBX-2 value type, OBX-5 value)."""
    return {str(s[3][0][0]): (str(s[2]), str(s[5])) for s in msg.segments("OBX")}


def _facts(verdict: str, probs: tuple[float, float, float], **kw) -> ReportFacts:  # type: ignore[no-untyped-def]
    base = dict(
        accession_number="ACC-42",
        study_instance_uid="1.2.3.4",
        sop_instance_uid="1.2.3.4.5",
        patient_id="ab" * 32,
        verdict=verdict,
        probabilities=dict(zip(("COVID", "Normal", "Other"), probs, strict=True)),
        model_version="2.0.1",
        ood=False,
        classified_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        sc_sop_instance_uid="1.2.3.4.5.6",
    )
    base.update(kw)
    return ReportFacts(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------ settings
def test_hl7_settings() -> None:
    s = load_settings(
        hl7_destinations="ris.example:2575, hl7://10.0.0.9:6661", urgent_threshold=0.7
    )
    assert s.hl7_destinations == [
        Hl7Destination(host="ris.example", port=2575),
        Hl7Destination(host="10.0.0.9", port=6661),
    ]
    assert [str(d) for d in s.delivery_destinations] == [
        "hl7://ris.example:2575",
        "hl7://10.0.0.9:6661",
    ]
    assert load_settings().urgent_threshold == 0.5
    for kw in ({"hl7_destinations": "ris.example"}, {"urgent_threshold": 1.5}):
        with pytest.raises(SystemExit):
            load_settings(**kw)


# ------------------------------------------------------------------ message + ACK
def test_oru_fields_and_urgent_priority_over_a_real_listener(listeners) -> None:  # type: ignore[no-untyped-def]
    lst = listeners().start()
    cases = [
        (_facts("COVID", (0.9, 0.05, 0.05)), "S"),  # COVID above the threshold: STAT
        (_facts("COVID", (0.45, 0.30, 0.25)), "R"),  # COVID, but not above it
        (_facts("Normal", (0.05, 0.9, 0.05)), "R"),
        (_facts("Other", (0.2, 0.1, 0.7), ood=True), "R"),
    ]
    for facts, _ in cases:
        msg = build_oru(facts, "cxr-densenet169", urgent_threshold=0.5, sending_facility="H|1")
        out = send_oru("hl7://x", "127.0.0.1", lst.port, msg, facts.sc_sop_instance_uid, 5)
        assert (out.category, out.status) == (SUCCESS_OUTCOME, "AA")
    assert len(lst.received) == len(cases)
    texts = {"COVID": "COVID-19 suspected", "Normal": "Normal", "Other": "Other lung disease"}
    for got, (facts, priority) in zip(lst.received, cases, strict=True):
        assert _field(got, "MSH", 3) == "CXR-TRIAGE"
        assert _field(got, "MSH", 4) == "H\\F\\1"  # escaped delimiter
        assert _field(got, "MSH", 9) == "ORU^R01^ORU_R01"
        assert _field(got, "MSH", 10) == control_id(facts.sc_sop_instance_uid)
        assert _field(got, "MSH", 12) == "2.5.1"
        assert _field(got, "PID", 3) == f"{'ab' * 32}^^^CXR-TRIAGE^HASH"
        assert _field(got, "OBR", 2) == _field(got, "OBR", 3) == "ACC-42"
        assert _field(got, "OBR", 5) == priority
        assert str(got.segment("OBR")[27][0][5]) == priority  # OBR-27.6 (TQ priority)
        assert _field(got, "OBR", 25) == "F"
        obx = _obx(got)
        assert obx["CXR-VERDICT"] == ("CWE", f"{facts.verdict}^{texts[facts.verdict]}^L")
        for code, cls in (("CXR-P-COVID", "COVID"), ("CXR-P-NORMAL", "Normal")):
            assert obx[code][0] == "NM"
            assert float(obx[code][1]) == pytest.approx(facts.probabilities[cls], abs=1e-4)
        assert float(obx["CXR-P-OTHER"][1]) == pytest.approx(facts.probabilities["Other"])
        assert obx["CXR-MODEL"] == ("ST", "cxr-densenet169")
        assert obx["CXR-MODEL-VERSION"] == ("ST", "2.0.1")
        assert obx["CXR-STUDY-UID"] == ("ST", "1.2.3.4")
        assert all(str(s[11]) == "F" for s in got.segments("OBX"))
        notes = [str(s[3]) for s in got.segments("NTE")]
        assert RESEARCH_NOTE in notes[0]
        assert (len(notes) == 2) == bool(facts.ood)
    # distinct results, distinct control IDs
    assert len({_field(m, "MSH", 10) for m in lst.received}) == 1  # same SC UID in _facts
    assert control_id("1.2.3") != control_id("1.2.4")


def test_ack_codes_and_no_answer(listeners) -> None:  # type: ignore[no-untyped-def]
    facts = _facts("Normal", (0.1, 0.8, 0.1))
    msg = build_oru(facts, "m", urgent_threshold=0.5)
    for code, expected in (
        ("AE", FAILURE_OUTCOME),
        ("AR", FAILURE_OUTCOME),
        ("CA", SUCCESS_OUTCOME),
    ):
        lst = listeners(ack_code=code).start()
        out = send_oru("hl7://x", "127.0.0.1", lst.port, msg, "1.2", 5)
        assert (out.category, out.status) == (expected, code)
    silent = listeners(ack_code=None).start()
    out = send_oru("hl7://x", "127.0.0.1", silent.port, msg, "1.2", 1)
    assert out.category == UNREACHABLE_OUTCOME and "no ACK" in (out.error or "")
    assert len(silent.received) == 1
    out = send_oru("hl7://x", "127.0.0.1", free_port(), msg, "1.2", 2)  # nobody listens
    assert out.category == UNREACHABLE_OUTCOME


def test_pipeline_oru_priority_follows_cxr_urgent_threshold(listeners) -> None:  # type: ignore[no-untyped-def]
    """The pipeline's MLLP sender builds the message with the site's CXR_URGENT_THRESHOLD
    and the model name it is given (the SC's ManufacturerModelName)."""
    lst = listeners().start()
    dest = Hl7Destination(host="127.0.0.1", port=lst.port)
    facts = _facts("COVID", (0.7, 0.2, 0.1))
    for threshold, priority in ((0.6, "S"), (0.8, "R")):
        s = load_settings(urgent_threshold=threshold, hl7_ack_timeout=5)
        out = pipeline._send_oru(dest, facts, "cxr-tiny-test", s)
        assert (out.category, out.status) == (SUCCESS_OUTCOME, "AA")
        msg = lst.received[-1]
        assert _field(msg, "OBR", 5) == priority, threshold
        assert _obx(msg)["CXR-MODEL"] == ("ST", "cxr-tiny-test")
        assert _obx(msg)["CXR-VERDICT"][1] == "COVID^COVID-19 suspected^L"
    assert len(lst.received) == 2


# ------------------------------------------------------------------ the pipeline
def _rows(settings, iid: int) -> dict[tuple[str, str], Delivery]:  # type: ignore[no-untyped-def]
    with session_scope(settings.database_url) as ss:
        rows = ss.execute(select(Delivery).where(Delivery.instance_id == iid)).scalars().all()
        for r in rows:
            ss.expunge(r)
    return {(r.destination, r.kind): r for r in rows}


def _inference(settings, iid: int) -> Inference:  # type: ignore[no-untyped-def]
    with session_scope(settings.database_url) as ss:
        inf = ss.execute(select(Inference).where(Inference.instance_id == iid)).scalar_one()
        ss.expunge(inf)
        return inf


def _state(settings, iid: int) -> Instance:  # type: ignore[no-untyped-def]
    with session_scope(settings.database_url) as ss:
        inst = ss.get(Instance, iid)
        assert inst is not None
        ss.expunge(inst)
        return inst


@pytest.mark.orthanc
def test_pipeline_sends_one_oru_per_image_beside_the_dicom_results(
    tmp_path, db_url, tiny_model_dir, orthanc, dicom_samples, listeners
):  # type: ignore[no-untyped-def]
    lst = listeners().start()
    s = _settings(
        tmp_path,
        db_url,
        tiny_model_dir,
        destinations=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        hl7_destinations=lst.dest,
    )
    src = dicom_samples / "chest" / SAMPLE
    source = pydicom.dcmread(src, stop_before_pixels=True)
    iid = insert_instance(s, src)
    assert pipeline.process_instance(s, iid).action == "delivered"
    assert _state(s, iid).state == State.DELIVERED.value
    assert len(lst.received) == 1
    msg = lst.received[0]
    inf = _inference(s, iid)
    hl7_dest = f"hl7://{lst.dest}"
    rows = _rows(s, iid)
    assert rows[(hl7_dest, "ORU")].state == "delivered" and rows[(hl7_dest, "ORU")].attempts == 1
    assert rows[(hl7_dest, "ORU")].last_status == "AA"
    assert rows[(hl7_dest, "ORU")].sop_instance_uid == inf.sc_sop_instance_uid
    # the DICOM results (SC, SR, heat map) went by C-STORE, the ORU is one per image
    assert {k for _, k in rows} == {"SC", "SR", "HM", "ORU"}
    assert all(r.state == "delivered" for r in rows.values())
    # the message tells what the audit DB holds
    assert _field(msg, "OBR", 2) == str(source.AccessionNumber)
    obx = _obx(msg)
    assert obx["CXR-STUDY-UID"][1] == str(source.StudyInstanceUID)
    assert obx["CXR-VERDICT"][1].split("^")[0] == inf.verdict
    assert float(obx["CXR-P-COVID"][1]) == pytest.approx(inf.p_covid, abs=1e-4)
    assert float(obx["CXR-P-NORMAL"][1]) == pytest.approx(inf.p_normal, abs=1e-4)
    assert float(obx["CXR-P-OTHER"][1]) == pytest.approx(inf.p_other, abs=1e-4)
    assert obx["CXR-MODEL-VERSION"][1] == inf.model_version
    # the model name is the SC's ManufacturerModelName (the audit DB holds the version)
    sc_tags = {t["SOPInstanceUID"]: t for t in orthanc.all_instance_tags()}
    assert sc_tags[inf.sc_sop_instance_uid]["ManufacturerModelName"] == "cxr-tiny-test"
    assert obx["CXR-MODEL"] == ("ST", "cxr-tiny-test")
    urgent = inf.verdict == "COVID" and inf.p_covid > s.urgent_threshold
    assert _field(msg, "OBR", 5) == ("S" if urgent else "R")
    # no PHI: the PatientID only as the stored hash, never the name or the plain ID
    text = str(msg)
    assert str(source.PatientID) not in text.replace(_field(msg, "PID", 3), "")
    assert _field(msg, "PID", 3).split("^")[0] == hash_patient_id(s, str(source.PatientID))
    for part in str(source.PatientName).split("^"):
        assert not part or part not in text
    # exactly once: a later message for the delivered instance sends nothing
    assert pipeline.deliver(s, iid).action == "skipped"
    assert len(lst.received) == 1


def test_ae_is_retried_then_delivery_failed(
    tmp_path, sqlite_url, tiny_model_dir, dicom_samples, listeners
):  # type: ignore[no-untyped-def]
    lst = listeners(ack_code="AE").start()
    s = _settings(tmp_path, sqlite_url, tiny_model_dir, hl7_destinations=lst.dest)
    iid = insert_instance(s, dicom_samples / "chest" / SAMPLE)
    with pytest.raises(pipeline.DeliveryIncomplete) as exc:
        pipeline.process_instance(s, iid)
    assert "ORU" in exc.value.detail and "AE" in exc.value.detail
    assert _state(s, iid).state == State.CLASSIFIED.value
    with pytest.raises(pipeline.DeliveryIncomplete):
        pipeline.deliver(s, iid, final_attempt=False)
    assert pipeline.deliver(s, iid, final_attempt=True).action == "delivery_failed"
    inst = _state(s, iid)
    assert inst.state == State.DELIVERY_FAILED.value and "hl7://" in (inst.reason or "")
    row = _rows(s, iid)[(f"hl7://{lst.dest}", "ORU")]
    assert (row.state, row.attempts, row.last_status) == ("failed", 3, "AE")
    assert len(lst.received) == 3
    # every attempt re-sent the same message (same control ID: a RIS may drop duplicates)
    assert len({_field(m, "MSH", 10) for m in lst.received}) == 1


def test_listener_down_at_first_then_delivered_exactly_once(
    tmp_path, sqlite_url, tiny_model_dir, dicom_samples, listeners
):  # type: ignore[no-untyped-def]
    port = free_port()
    s = _settings(tmp_path, sqlite_url, tiny_model_dir, hl7_destinations=f"127.0.0.1:{port}")
    iid = insert_instance(s, dicom_samples / "chest" / SAMPLE)
    with pytest.raises(pipeline.DeliveryIncomplete) as exc:
        pipeline.process_instance(s, iid)  # nobody listens yet
    assert "unreachable" in exc.value.detail
    row = _rows(s, iid)[(f"hl7://127.0.0.1:{port}", "ORU")]
    assert (row.state, row.attempts) == ("failed", 1)
    lst = listeners(port=port).start()
    assert pipeline.deliver(s, iid, final_attempt=False).action == "delivered"
    assert _state(s, iid).state == State.DELIVERED.value
    row = _rows(s, iid)[(f"hl7://127.0.0.1:{port}", "ORU")]
    assert (row.state, row.attempts, row.last_status) == ("delivered", 2, "AA")
    assert pipeline.deliver(s, iid).action == "skipped"
    assert len(lst.received) == 1
