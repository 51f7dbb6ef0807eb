"""End to end with the other destination kinds (issue 11): Orthanc (with Debian's
orthanc-dicomweb plugin) pushes a chest X-ray to a `cxr node` subprocess, a `cxr worker`
subprocess (real Celery, embedded broker) classifies it and delivers the SC, SR and heat
map back to Orthanc by STOW-RS and an ORU^R01 to a real MLLP listener of the test; the
retries are the deliver task's own (backoff, attempts counted in the audit DB)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Delivery, Inference, State
from db.session import session_scope
from tests.conftest import free_port
from tests.worker.conftest import Stack, wait_for
from tests.worker.result_refs import RESULT_CLASSES, check_references, wait_results
from tests.worker.test_hl7 import MllpListener, _field, _obx

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, pytest.mark.timeout(300)]

SAMPLE = "dx_thorax_monochrome1.dcm"


@pytest.fixture
def dw_stack(tmp_path, orthanc_dicomweb, tiny_model_dir, model_cache_dir):  # type: ignore[no-untyped-def]
    stacks: list[Stack] = []

    def make(**env: object) -> Stack:
        st = Stack(
            tmp_path,
            orthanc_dicomweb,
            f"sqlite:///{tmp_path / 'audit.db'}",
            tiny_model_dir,
            model_cache_dir,
            CXR_RETRY_BACKOFF_BASE=1,
            CXR_RETRY_BACKOFF_MAX=2,
            CXR_HL7_ACK_TIMEOUT=5,
            **env,
        )
        stacks.append(st)
        return st

    yield make
    for st in stacks:
        st.close()


@pytest.fixture
def mllp() -> list[MllpListener]:
    started: list[MllpListener] = []
    yield started
    for lst in started:
        lst.stop()


def _deliveries(stack: Stack) -> dict[tuple[str, str], Delivery]:
    with session_scope(stack.db_url) as s:
        rows = s.execute(select(Delivery)).scalars().all()
        for r in rows:
            s.expunge(r)
    return {(r.destination, r.kind): r for r in rows}


def _push_sample(stack: Stack, dicom_samples: Path) -> dict[str, str]:
    o = stack.orthanc
    ans = o.upload(dicom_samples / "chest" / SAMPLE)
    src = o.tags(ans["ID"])
    o.push("cxr", [ans["ID"]])
    return src


def test_e2e_stow_rs_and_hl7_delivered(dw_stack, mllp, dicom_samples):  # type: ignore[no-untyped-def]
    lst = MllpListener().start()
    mllp.append(lst)
    token = "tok-e2e-s3cret"
    threshold = 0.4
    stack = dw_stack(
        CXR_HL7_DESTINATIONS=lst.dest, CXR_DICOMWEB_TOKEN=token, CXR_URGENT_THRESHOLD=threshold
    )
    dest = f"dicomweb+{stack.orthanc.dicomweb_root}"
    stack.env["CXR_DESTINATIONS"] = dest  # STOW-RS only: no C-STORE destination
    stack.start_worker()
    stack.start_node()
    src = _push_sample(stack, dicom_samples)
    rows = stack.wait_all_final(1, 150)
    assert rows[0].state == State.DELIVERED.value, (rows[0].state, rows[0].reason)

    # the SC, SR and heat map arrived in the source study, by STOW-RS (the only
    # destination), and reference the source image (the SR also the heat map)
    results = wait_results(stack.orthanc, src)
    check_references(results, src)
    dels = _deliveries(stack)
    hl7_dest = f"hl7://{lst.dest}"
    assert set(dels) == {(dest, kind) for kind in RESULT_CLASSES} | {(hl7_dest, "ORU")}
    assert {kind: dels[(dest, kind)].sop_instance_uid for kind in RESULT_CLASSES} == {
        kind: str(ds.SOPInstanceUID) for kind, ds in results.items()
    }
    assert all(d.state == "delivered" and d.attempts == 1 for d in dels.values())
    assert all(dels[(dest, kind)].last_status == "HTTP 200" for kind in RESULT_CLASSES)
    # one ORU^R01 for the image, telling what the audit DB holds
    assert len(lst.received) == 1
    msg = lst.received[0]
    with session_scope(stack.db_url) as s:
        inf = s.execute(select(Inference)).scalar_one()
        verdict, version = inf.verdict, inf.model_version
        p_covid, p_normal, p_other = inf.p_covid, inf.p_normal, inf.p_other
    obx = _obx(msg)
    assert obx["CXR-VERDICT"][1].split("^")[0] == verdict
    assert float(obx["CXR-P-COVID"][1]) == pytest.approx(p_covid, abs=1e-4)
    assert obx["CXR-MODEL-VERSION"][1] == version
    # the model name: the SC's ManufacturerModelName
    assert obx["CXR-MODEL"] == ("ST", str(results["SC"].ManufacturerModelName))
    assert results["SC"].ManufacturerModelName == "cxr-tiny-test"
    assert float(obx["CXR-P-NORMAL"][1]) == pytest.approx(p_normal, abs=1e-4)
    assert float(obx["CXR-P-OTHER"][1]) == pytest.approx(p_other, abs=1e-4)
    urgent = verdict == "COVID" and p_covid > threshold
    assert _field(msg, "OBR", 5) == ("S" if urgent else "R")
    assert obx["CXR-STUDY-UID"][1] == src["StudyInstanceUID"]
    assert _field(msg, "OBR", 2) == src["AccessionNumber"]
    # the bearer token was sent (Orthanc ignores it) but never reached a log
    assert token not in stack.logs()


def test_e2e_stow_rs_404_retried_to_delivery_failed_hl7_late_listener_once(
    dw_stack, mllp, dicom_samples
):  # type: ignore[no-untyped-def]
    """A wrong DICOMweb path (HTTP 404) is retried by the deliver task until the last
    attempt, then ``delivery_failed``; the RIS is down at first and started after the
    first attempt failed: its message is delivered on a retry and, though the instance
    keeps being retried for the STOW-RS destination, never sent again."""
    port = free_port()
    stack = dw_stack(CXR_HL7_DESTINATIONS=f"127.0.0.1:{port}", CXR_DELIVERY_MAX_ATTEMPTS=4)
    bad = f"dicomweb+{stack.orthanc.base}/no-such-dicomweb-root"
    stack.env["CXR_DESTINATIONS"] = bad
    stack.start_worker()
    stack.start_node()
    _push_sample(stack, dicom_samples)
    hl7_dest = f"hl7://127.0.0.1:{port}"

    def first_attempt_failed():  # type: ignore[no-untyped-def]
        row = _deliveries(stack).get((hl7_dest, "ORU"))
        return row if row is not None and row.state == "failed" else None

    first = wait_for(first_attempt_failed, 120, what="first HL7 attempt failed")
    assert first.attempts == 1 and first.last_status is None  # unreachable: no ACK
    lst = MllpListener(port=port).start()
    mllp.append(lst)
    rows = stack.wait_all_final(1, 120)
    inst = rows[0]
    assert inst.state == State.DELIVERY_FAILED.value
    assert "no-such-dicomweb-root" in (inst.reason or "") and "hl7" not in (inst.reason or "")
    dels = _deliveries(stack)
    assert set(dels) == {(bad, kind) for kind in RESULT_CLASSES} | {(hl7_dest, "ORU")}
    for kind in RESULT_CLASSES:
        assert dels[(bad, kind)].state == "failed"
        assert dels[(bad, kind)].attempts == 4  # CXR_DELIVERY_MAX_ATTEMPTS, by the task
        assert dels[(bad, kind)].last_status == "HTTP 404"
    oru = dels[(hl7_dest, "ORU")]
    assert oru.state == "delivered" and oru.last_status == "AA" and oru.attempts >= 2
    assert len(lst.received) == 1  # exactly once
    assert len(stack.orthanc.instances()) == 1  # only the source: nothing was stored
