"""Delivery SCU against real pynetdicom Storage SCPs on free loopback ports: Success,
Warning, Failure, no response, rejected association, closed port, unsupported SOP class,
and DICOM TLS."""

from __future__ import annotations

import io
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from cxr.scu import AssociationPool
from cxr.settings import Destination, Settings, load_settings
from dicom_node.status import (
    CANNOT_UNDERSTAND,
    COERCION_OF_DATA_ELEMENTS,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
    ELEMENTS_DISCARDED,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from ml.preprocess import dicom_to_display
from tests.conftest import free_port, make_chest_dataset
from tests.worker.conftest import FakePrediction
from worker.delivery import (
    FAILURE_OUTCOME,
    SUCCESS_OUTCOME,
    UNREACHABLE_OUTCOME,
    WARNING_OUTCOME,
    classify_status,
    delivery_pool,
    store_datasets,
)
from worker.results import (
    SC_SOP_CLASS_UID,
    SR_SOP_CLASS_UID,
    VERDICT_TRACKING_ID,
    ModelInfo,
    build_secondary_capture,
    build_structured_report,
)
from worker.uids import output_uids

SCP_AET = "TEST_PACS"
OUR_AET = "CXR_TEST_SCU"


class StorageSCP:
    """A real pynetdicom Storage SCP answering a fixed status."""

    def __init__(
        self,
        status: int = SUCCESS,
        sop_classes: tuple[str, ...] = (SC_SOP_CLASS_UID, SR_SOP_CLASS_UID),
        syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
        delay: float = 0.0,
        ssl_context=None,  # type: ignore[no-untyped-def]
        network_timeout: float | None = None,
    ) -> None:
        self.status = status
        self.delay = delay
        self.port = free_port()
        self.received: list[tuple[str, Dataset]] = []
        self.associations = 0  # accepted
        self.releases = 0  # ended by the requestor's A-RELEASE
        self._lock = threading.Lock()
        ae = AE(ae_title=SCP_AET)
        ae.require_called_aet = True
        if network_timeout is not None:
            ae.network_timeout = network_timeout  # aborts an association idle that long
        for uid in sop_classes:
            ae.add_supported_context(uid, list(syntaxes))
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_ACCEPTED, self._on_accepted),
                (evt.EVT_RELEASED, self._on_released),
            ],
            ssl_context=ssl_context,
        )

    def _on_accepted(self, _event) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self.associations += 1

    def _on_released(self, _event) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self.releases += 1

    def _on_store(self, event) -> Dataset:  # type: ignore[no-untyped-def]
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append((event.assoc.requestor.ae_title, ds))
        if self.delay:
            time.sleep(self.delay)
        rsp = Dataset()
        rsp.Status = self.status
        if self.status != SUCCESS:
            rsp.ErrorComment = "test scp says so"
        return rsp

    def destination(self, aet: str = SCP_AET) -> Destination:
        return Destination(ae_title=aet, host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp_factory() -> Iterator:  # type: ignore[type-arg]
    started: list[StorageSCP] = []

    def make(**kw) -> StorageSCP:  # type: ignore[no-untyped-def]
        scp = StorageSCP(**kw)
        started.append(scp)
        return scp

    try:
        yield make
    finally:
        for scp in started:
            scp.stop()


@pytest.fixture(scope="module")
def results() -> list[Dataset]:
    src = make_chest_dataset(rows=80, cols=64)
    model = ModelInfo(name="cxr-test-model", version="9.9", sha256="cd" * 32)
    uids = output_uids(src.SOPInstanceUID, model.version)
    pred = FakePrediction()
    sc = build_secondary_capture(src, dicom_to_display(src), pred, model, uids)
    sr = build_structured_report(src, pred, model, uids, sc=sc)
    return [sc, sr]


def _settings(workdir: Path, **kw) -> Settings:  # type: ignore[no-untyped-def]
    base = {"ae_title": OUR_AET, "acse_timeout": 5, "dimse_timeout": 5, "network_timeout": 5}
    base.update(kw)
    return load_settings(**base)


def test_classify_status_named_codes() -> None:
    assert classify_status(SUCCESS) == SUCCESS_OUTCOME
    for code in (
        COERCION_OF_DATA_ELEMENTS,
        DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
        ELEMENTS_DISCARDED,
    ):
        assert classify_status(code) == WARNING_OUTCOME
    for code in (
        OUT_OF_RESOURCES,
        0xA7FF,
        DATASET_DOES_NOT_MATCH_SOP_CLASS,
        CANNOT_UNDERSTAND,
        0xC123,
    ):
        assert classify_status(code) == FAILURE_OUTCOME


def test_success(workdir: Path, scp_factory, results) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory()
    out = store_datasets(scp.destination(), results, _settings(workdir))
    assert [o.category for o in out] == [SUCCESS_OUTCOME, SUCCESS_OUTCOME]
    assert all(o.delivered and o.status == SUCCESS and o.status_text == "0x0000" for o in out)
    assert [o.sop_instance_uid for o in out] == [ds.SOPInstanceUID for ds in results]
    assert [o.sop_class_uid for o in out] == [SC_SOP_CLASS_UID, SR_SOP_CLASS_UID]
    assert {aet for aet, _ in scp.received} == {OUR_AET}  # calling AE = CXR_AE_TITLE
    got = {ds.SOPInstanceUID: ds for _, ds in scp.received}
    assert set(got) == {ds.SOPInstanceUID for ds in results}
    sc = got[results[0].SOPInstanceUID]
    assert (sc.pixel_array == results[0].pixel_array).all()  # the image arrived intact


@pytest.mark.parametrize(
    "status",
    [COERCION_OF_DATA_ELEMENTS, DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING, ELEMENTS_DISCARDED],
)
def test_warning_counts_as_delivered(workdir: Path, scp_factory, results, status: int) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(status=status)
    out = store_datasets(scp.destination(), results, _settings(workdir))
    assert [o.category for o in out] == [WARNING_OUTCOME] * 2
    assert all(o.delivered and o.status == status for o in out)
    assert out[0].status_text == f"0x{status:04X}"
    assert "Warning" in (out[0].error or "") and "test scp says so" in (out[0].error or "")
    assert len(scp.received) == 2


@pytest.mark.parametrize(
    "status", [OUT_OF_RESOURCES, DATASET_DOES_NOT_MATCH_SOP_CLASS, CANNOT_UNDERSTAND]
)
def test_failure_is_not_delivered(workdir: Path, scp_factory, results, status: int) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(status=status)
    out = store_datasets(scp.destination(), results, _settings(workdir))
    assert [o.category for o in out] == [FAILURE_OUTCOME] * 2
    assert not any(o.delivered for o in out)
    assert out[0].status == status and out[0].error


def test_closed_port_is_unreachable(workdir: Path, results) -> None:  # type: ignore[no-untyped-def]
    dest = Destination(ae_title=SCP_AET, host="127.0.0.1", port=free_port())
    t0 = time.monotonic()
    out = store_datasets(dest, results, _settings(workdir))
    assert time.monotonic() - t0 < 15  # refused at once, not a timeout
    assert [o.category for o in out] == [UNREACHABLE_OUTCOME] * 2
    assert all(o.status is None and not o.delivered and o.error for o in out)


def test_rejected_association_is_unreachable(workdir: Path, scp_factory, results) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory()
    out = store_datasets(scp.destination("WRONG_AET"), results, _settings(workdir))
    assert [o.category for o in out] == [UNREACHABLE_OUTCOME] * 2
    assert "rejected" in (out[0].error or "")
    assert scp.received == []


def test_no_response_is_unreachable(workdir: Path, scp_factory, results) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(delay=10)  # far beyond the 1 s DIMSE timeout, even on a loaded box
    out = store_datasets(scp.destination(), results[:1], _settings(workdir, dimse_timeout=1))
    assert [o.category for o in out] == [UNREACHABLE_OUTCOME]
    assert out[0].status is None


def test_unsupported_sop_class_is_a_failure(workdir: Path, scp_factory, results) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(sop_classes=(SC_SOP_CLASS_UID,))
    out = store_datasets(scp.destination(), results, _settings(workdir))
    assert [o.category for o in out] == [SUCCESS_OUTCOME, FAILURE_OUTCOME]
    assert "not accepted" in (out[1].error or "")
    assert [ds.SOPInstanceUID for _, ds in scp.received] == [results[0].SOPInstanceUID]


def test_implicit_vr_only_peer(workdir: Path, scp_factory, results) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(syntaxes=(ImplicitVRLittleEndian,))
    out = store_datasets(scp.destination(), results, _settings(workdir))
    assert [o.category for o in out] == [SUCCESS_OUTCOME] * 2
    assert {ds.SOPInstanceUID for _, ds in scp.received} == {ds.SOPInstanceUID for ds in results}


def test_empty_list_opens_nothing(workdir: Path) -> None:
    dest = Destination(ae_title=SCP_AET, host="127.0.0.1", port=free_port())
    assert store_datasets(dest, [], _settings(workdir)) == []


# ------------------------------------------------------------- association reuse
def _wait_for(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def test_association_is_reused_then_released_when_idle(workdir: Path, scp_factory, results) -> None:  # type: ignore[no-untyped-def]
    """Two instances' results over one association; it is released (A-RELEASE, not an
    abort) once it has been idle for CXR_DELIVERY_ASSOCIATION_IDLE."""
    scp = scp_factory()
    s = _settings(workdir, delivery_association_idle=1.0)
    pool = delivery_pool(s)
    assert pool is not None
    opened = pool.opened
    for _ in range(2):
        out = store_datasets(scp.destination(), results, s)
        assert [o.category for o in out] == [SUCCESS_OUTCOME] * 2
    assert len(scp.received) == 4
    assert scp.associations == 1 and pool.opened == opened + 1
    assert scp.releases == 0  # still open, for the next instance
    assert _wait_for(lambda: scp.releases == 1, 10)
    assert scp.associations == 1
    # the next instance opens a new one
    store_datasets(scp.destination(), results[:1], s)
    assert scp.associations == 2 and len(scp.received) == 5


def test_association_closed_by_the_peer_while_idle_is_reopened(
    workdir: Path, scp_factory, results
) -> None:  # type: ignore[no-untyped-def]
    """A PACS that drops idle associations sooner than we keep them costs no failure."""
    scp = scp_factory(network_timeout=0.3)
    s = _settings(workdir, delivery_association_idle=2.0)
    assert [o.category for o in store_datasets(scp.destination(), results, s)] == [
        SUCCESS_OUTCOME
    ] * 2
    time.sleep(1.0)  # the SCP has aborted it by now
    pool = delivery_pool(s)
    assert pool is not None
    opened, reused = pool.opened, pool.reused
    out = store_datasets(scp.destination(), results, s)
    assert [o.category for o in out] == [SUCCESS_OUTCOME] * 2
    assert scp.associations == 2 and len(scp.received) == 4
    # our side had seen the abort: the dead one was dropped, not tried
    assert (pool.opened, pool.reused) == (opened + 1, reused)


class _DroppedUnnoticed:
    """A pooled association whose peer went away before our side noticed: it still
    looks established, and the first write fails."""

    is_established = True

    def send_c_store(self, ds):  # type: ignore[no-untyped-def]
        raise ConnectionResetError("peer gone")

    def release(self) -> None:
        self.is_established = False

    def abort(self) -> None:
        self.is_established = False


def _scu_ae() -> AE:
    ae = AE(ae_title=OUR_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    for uid in (SC_SOP_CLASS_UID, SR_SOP_CLASS_UID):
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae


def test_a_dropped_pooled_association_is_replaced_within_the_call(scp_factory, results) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory()
    pool = AssociationPool(5.0)
    stale = _DroppedUnnoticed()
    pool._give_back("k", stale)  # type: ignore[arg-type]
    out = pool.store_each(
        "k", _scu_ae(), "127.0.0.1", scp.port, SCP_AET, results, load=lambda ds: ds
    )
    assert [r.kind for _, r in out] == ["status", "status"]
    assert [r.status for _, r in out] == [SUCCESS, SUCCESS]
    assert stale.is_established is False  # closed, not kept
    assert (pool.opened, pool.reused, scp.associations) == (1, 0, 1)
    assert pool.idle_count("k") == 1  # the new one is kept
    pool.close_all()
    assert _wait_for(lambda: scp.releases == 1, 5)


def test_an_unanswered_item_is_not_repeated_and_its_association_not_kept(
    scp_factory, results
) -> None:  # type: ignore[no-untyped-def]
    """No C-STORE response (DIMSE timeout): the PACS may hold the object, so the call is
    not repeated, and the association is not reused (a late response could be read as
    the next instance's status)."""
    scp = scp_factory(delay=4)
    pool = AssociationPool(5.0)
    ae = _scu_ae()
    ae.dimse_timeout = 1
    out = pool.store_each("k", ae, "127.0.0.1", scp.port, SCP_AET, results[:1], load=lambda d: d)
    assert [r.kind for _, r in out] == ["unreachable"]
    assert "no C-STORE response" in out[0][1].comment
    assert pool.idle_count() == 0 and pool.opened == 1
    assert _wait_for(lambda: len(scp.received) == 1, 5)
    time.sleep(0.5)
    assert len(scp.received) == 1  # sent once


def test_no_reuse_when_the_idle_time_is_zero(workdir: Path, scp_factory, results) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory()
    s = _settings(workdir, delivery_association_idle=0)
    assert delivery_pool(s) is None
    for _ in range(2):
        store_datasets(scp.destination(), results[:1], s)
    assert scp.associations == 2
    assert _wait_for(lambda: scp.releases == 2, 5)


# ------------------------------------------------------------------------------ TLS
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away CA, a server (PACS) and a client (worker) certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        cwd=d,
    )
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            cwd=d,
        )
    return d


def _server_ctx(pki: Path):  # type: ignore[no-untyped-def]
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED  # the PACS demands our client certificate
    ctx.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
    return ctx


def test_tls_delivery(workdir: Path, scp_factory, results, pki: Path) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(ssl_context=_server_ctx(pki))
    s = _settings(
        workdir,
        delivery_tls=True,
        tls_cert=pki / "client.pem",
        tls_key=pki / "client.key",
        tls_ca=pki / "ca.pem",
    )
    out = store_datasets(scp.destination(), results, s)
    assert [o.category for o in out] == [SUCCESS_OUTCOME] * 2
    assert len(scp.received) == 2


def test_tls_peer_without_tls_settings_is_unreachable(
    workdir: Path, scp_factory, results, pki: Path
) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(ssl_context=_server_ctx(pki))
    out = store_datasets(scp.destination(), results, _settings(workdir))  # plain TCP
    assert [o.category for o in out] == [UNREACHABLE_OUTCOME] * 2
    assert scp.received == []


def test_tls_untrusted_server_is_unreachable(
    workdir: Path, scp_factory, results, pki: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # our CA bundle is another CA: the PACS certificate must not be accepted
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "other.key",
        "-out",
        "other.pem",
        "-days",
        "2",
        "-subj",
        "/CN=other-ca",
        cwd=tmp_path,
    )
    scp = scp_factory(ssl_context=_server_ctx(pki))
    s = _settings(
        workdir,
        delivery_tls=True,
        tls_cert=pki / "client.pem",
        tls_key=pki / "client.key",
        tls_ca=tmp_path / "other.pem",
    )
    out = store_datasets(scp.destination(), results, s)
    assert [o.category for o in out] == [UNREACHABLE_OUTCOME] * 2
    assert scp.received == []


def test_received_objects_parse(workdir: Path, scp_factory, results, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """What the PACS got is a readable Part 10 object (written out and read back)."""
    scp = scp_factory()
    store_datasets(scp.destination(), results, _settings(workdir))
    for _, ds in scp.received:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        back = pydicom.dcmread(path)
        assert back.SeriesDescription.startswith("AI TRIAGE")


# ------------------------------------------------------------------ a real PACS (Orthanc)
@pytest.mark.orthanc
def test_orthanc_stores_results_in_the_study_once(
    workdir: Path, orthanc, tmp_path: Path, model_info
) -> None:  # type: ignore[no-untyped-def]
    """Orthanc accepts both objects into the source's study; a re-run (same UIDs, e.g. a
    redelivered task) is acknowledged and does not duplicate: still exactly one SC and one
    SR instance, each in its own series."""
    src = make_chest_dataset(rows=96, cols=80, seed=7)
    path = tmp_path / "src.dcm"
    src.save_as(path, enforce_file_format=True)
    orthanc.upload(path)
    dest = Destination(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
    uids = output_uids(src.SOPInstanceUID, model_info.version)
    for run, label in enumerate(("COVID", "Normal")):
        pred = FakePrediction(
            label=label, probs=(0.7, 0.2, 0.1) if label == "COVID" else (0.1, 0.8, 0.1)
        )
        sc = build_secondary_capture(src, dicom_to_display(src), pred, model_info, uids)
        sr = build_structured_report(src, pred, model_info, uids, sc=sc)
        out = store_datasets(dest, [sc, sr], _settings(workdir))
        assert [o.category for o in out] == [SUCCESS_OUTCOME] * 2, (run, out)
    series = orthanc.series_of_study(src.StudyInstanceUID)
    by_uid = {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in series}
    assert set(by_uid) == {src.SeriesInstanceUID, uids.sc_series, uids.sr_series}
    assert all(len(by_uid[u]["Instances"]) == 1 for u in (uids.sc_series, uids.sr_series))
    assert by_uid[uids.sc_series]["MainDicomTags"]["SeriesDescription"].startswith("AI TRIAGE")
    sc_tags = orthanc.tags(by_uid[uids.sc_series]["Instances"][0])
    assert sc_tags["SOPInstanceUID"] == uids.sc_sop
    sr_file = pydicom.dcmread(io.BytesIO(orthanc.file(by_uid[uids.sr_series]["Instances"][0])))
    verdict = [
        c.ConceptCodeSequence[0].CodeValue
        for g in _walk(sr_file.ContentSequence)
        if g.ValueType == "CONTAINER"
        and any(
            getattr(c, "TextValue", None) == VERDICT_TRACKING_ID
            for c in g.get("ContentSequence", [])
        )
        for c in g.ContentSequence
        if c.ValueType == "CODE" and c.ConceptNameCodeSequence[0].CodeValue == "121071"
    ]
    # one verdict: the first run's (Orthanc's default OverwriteInstances=false keeps the
    # stored copy) or the second's (when the PACS overwrites); never both
    assert verdict in (["840539006"], ["17621005"]), verdict


def _walk(seq):  # type: ignore[no-untyped-def]
    for item in seq:
        yield item
        yield from _walk(item.get("ContentSequence", []))
