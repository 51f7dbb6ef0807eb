"""Real associations: the shared sample files, DCMTK peers, duplicates/versions, PHI in logs."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from db.models import State
from dicom_node.status import SUCCESS
from tests.conftest import dcmtk, make_chest_dataset
from tests.node.conftest import (
    associations,
    echo,
    events,
    instances,
    redis_queue_len,
    scu_send,
    spool_files,
)


def test_chest_samples_stored_and_queued(node_factory, db_url, dicom_samples, node_redis):
    node = node_factory(db_url)
    files = sorted((dicom_samples / "chest").glob("*.dcm"))
    assert files
    res = scu_send(node.address, files)
    assert res.established and res.statuses == [SUCCESS] * len(files)
    assert node.flush(30)
    rows = instances(db_url)
    assert len(rows) == len(files)
    assert {r.state for r in rows} == {State.QUEUED.value}
    # two of the samples share a SOP Instance UID with different content: a new version
    assert sorted(r.version for r in rows) == [1, 1, 1, 1, 2]
    assert redis_queue_len(node_redis) == len(files)
    import pydicom

    for r in rows:
        stored = node.spool.resolve(r.spool_path)
        assert stored.stat().st_size == r.size_bytes
        # what was stored decodes (JPEG Baseline, JPEG Lossless SV1, implicit/explicit VR)
        ds = pydicom.dcmread(stored)
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        assert r.patient_id_hash is None or len(r.patient_id_hash) == 64  # salted hash
    assert len(spool_files(node)) == len(files)
    # the association audit row counts outcomes
    a = associations(db_url)[-1]
    assert (a.calling_ae, a.called_ae, a.outcome, a.n_stored) == (
        "PACS",
        "CXR_WORKER",
        "released",
        5,
    )
    assert a.ended_at is not None and a.started_at <= a.ended_at


def test_not_chest_samples_ignored_or_refused(node_factory, db_url, dicom_samples):
    """Every not-chest file ends ignored (recorded with a reason) or refused with a reason."""
    node = node_factory(db_url)
    dcmsend = dcmtk("dcmsend")
    files = sorted((dicom_samples / "not-chest").glob("*.dcm"))
    for f in files:
        subprocess.run(
            [
                dcmsend,
                "-aet",
                "PACS",
                "-aec",
                "CXR_WORKER",
                node.address[0],
                str(node.address[1]),
                str(f),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
    rows = {r.sop_instance_uid: r for r in instances(db_url)}
    assert len(rows) >= 4  # CT, CT RLE, MR, whole-slide: acknowledged and recorded
    assoc_reasons = " ".join(a.reason or "" for a in associations(db_url))
    import pydicom

    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        row = rows.get(ds.SOPInstanceUID)
        if row is not None:
            assert row.state in (State.IGNORED.value, State.FAILED.value), f.name
            assert row.reason, f.name
            assert row.spool_path is None  # ignored objects are not kept
        else:  # refused at negotiation: the association row names the SOP class
            assert ds.SOPClassUID in assoc_reasons, f.name
    assert not spool_files(node)
    assert instances(db_url, state=State.QUEUED.value) == []


def test_dcmtk_peers(node_factory, sqlite_url, tmp_path):
    node = node_factory(sqlite_url)
    host, port = node.address
    r = subprocess.run(
        [dcmtk("echoscu"), "-aet", "PACS", "-aec", "CXR_WORKER", host, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    f1 = tmp_path / "a.dcm"
    make_chest_dataset(seed=1).save_as(f1, enforce_file_format=True)
    r = subprocess.run(
        [dcmtk("storescu"), "-aet", "PACS", "-aec", "CXR_WORKER", host, str(port), str(f1)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    f2 = tmp_path / "b.dcm"
    make_chest_dataset(seed=2, modality="DX", view="AP").save_as(f2, enforce_file_format=True)
    r = subprocess.run(
        [dcmtk("dcmsend"), "-aet", "PACS", "-aec", "CXR_WORKER", host, str(port), str(f2)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    node.flush()
    rows = instances(sqlite_url)
    assert [r.state for r in rows] == [State.QUEUED.value] * 2
    assert [r.modality for r in rows] == ["CR", "DX"]
    assert [a.n_echo for a in associations(sqlite_url)][:1] == [1]
    # the stored bytes are the dataset exactly as sent (no decode/re-encode)
    import pydicom

    for src, row in zip((f1, f2), rows, strict=True):
        sent = pydicom.dcmread(src)
        got = pydicom.dcmread(node.spool.resolve(row.spool_path))
        assert got.PixelData == sent.PixelData
        assert got.SOPInstanceUID == sent.SOPInstanceUID


def test_duplicates_and_versions(node_factory, db_url):
    node = node_factory(db_url)
    ds = make_chest_dataset(seed=3)
    assert scu_send(node.address, [ds]).statuses == [SUCCESS]
    assert scu_send(node.address, [ds]).statuses == [SUCCESS]  # identical: duplicate
    node.flush()
    rows = instances(db_url)
    assert len(rows) == 1 and rows[0].version == 1
    kinds = [e.kind for e in events(db_url, rows[0].id)]
    assert kinds.count("duplicate") == 1 and kinds.count(State.RECEIVED.value) == 1
    assert associations(db_url)[-1].n_duplicate == 1
    # different content under the same UID: a new version, processed
    ds.InstitutionName = "Corrected"
    assert scu_send(node.address, [ds]).statuses == [SUCCESS]
    node.flush()
    rows = instances(db_url)
    assert [r.version for r in rows] == [1, 2]
    assert rows[1].state == State.QUEUED.value
    assert rows[0].content_sha256 != rows[1].content_sha256
    assert len(spool_files(node)) == 2


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"body_part": "KNEE"}, "body part"),
        ({"view": "LL"}, "view"),
        ({"modality": "MG"}, "modality"),
    ],
)
def test_filter_rules(node_factory, sqlite_url, kwargs, reason):
    node = node_factory(sqlite_url)
    assert scu_send(node.address, [make_chest_dataset(**kwargs)]).statuses == [SUCCESS]
    (row,) = instances(sqlite_url)
    assert row.state == State.IGNORED.value and reason in row.reason


def test_empty_body_part_and_view_are_chest_frontal(node_factory, sqlite_url):
    node = node_factory(sqlite_url)
    ds = make_chest_dataset(body_part=None, view="")
    assert scu_send(node.address, [ds]).statuses == [SUCCESS]
    node.flush()
    assert [r.state for r in instances(sqlite_url)] == [State.QUEUED.value]


def test_our_real_results_coming_back_are_ignored(node_factory, sqlite_url):
    """What the worker really builds - SC, SR and the heat map Segmentation, with their
    verdict-first series descriptions - is recognised as own output when a PACS routes it
    back (the markers of cxr.contracts)."""
    from ml.preprocess import dicom_to_display
    from tests.worker.conftest import FakePrediction
    from worker.results import (
        ModelInfo,
        build_heatmap,
        build_secondary_capture,
        build_structured_report,
    )
    from worker.uids import output_uids

    node = node_factory(sqlite_url)
    src = make_chest_dataset(seed=8)
    model = ModelInfo(name="cxr-test-model", version="1.0", sha256="ef" * 32)
    uids = output_uids(src.SOPInstanceUID, model.version)
    pred = FakePrediction(label="Other", probs=(0.1, 0.2, 0.7))
    sc = build_secondary_capture(src, dicom_to_display(src), pred, model, uids)
    hm = build_heatmap(src, pred, model, uids)
    sr = build_structured_report(src, pred, model, uids, sc=sc, heatmap=hm)
    res = scu_send(node.address, [sc, sr, hm])
    assert res.statuses == [SUCCESS] * 3
    rows = instances(sqlite_url)
    assert {r.sop_instance_uid for r in rows} == {uids.sc_sop, uids.sr_sop, uids.hm_sop}
    assert all(r.state == State.IGNORED.value for r in rows)
    assert all(r.reason.startswith("own output") for r in rows)


def test_filter_rules_configurable(node_factory, sqlite_url):
    node = node_factory(sqlite_url, chest_body_parts="CHEST", frontal_views="PA")
    res = scu_send(
        node.address, [make_chest_dataset(body_part=None), make_chest_dataset(view="AP")]
    )
    assert res.statuses == [SUCCESS, SUCCESS]
    assert [r.state for r in instances(sqlite_url)] == [State.IGNORED.value] * 2


def test_own_outputs_and_non_image_ignored(node_factory, sqlite_url):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    node = node_factory(sqlite_url)
    a = make_chest_dataset(seed=4)
    a.Manufacturer = "cxr-triage"
    b = make_chest_dataset(seed=5, modality="OT", sop_class="1.2.840.10008.5.1.4.1.1.7")
    b.SeriesDescription = "AI TRIAGE result (research use only)"
    c = make_chest_dataset(seed=6)
    eq = Dataset()
    eq.Manufacturer = "cxr-triage"
    c.ContributingEquipmentSequence = Sequence([eq])
    d = make_chest_dataset(seed=7, sop_class="1.2.840.10008.5.1.4.1.1.88.22")  # Enhanced SR
    del d.PixelData
    res = scu_send(node.address, [a, b, c, d])
    assert res.statuses == [SUCCESS] * 4
    rows = instances(sqlite_url)
    assert [r.state for r in rows] == [State.IGNORED.value] * 4
    assert [r.reason.split(" (")[0] for r in rows[:3]] == ["own output"] * 3
    assert rows[3].reason.startswith("non-image object")
    assert not spool_files(node)


def test_no_phi_in_logs(node_factory, sqlite_url, caplog, dicom_samples):
    caplog.set_level(logging.DEBUG)
    node = node_factory(sqlite_url)
    name, pid = "Zyxwvutsr^Qponmlkji", "PIDX-98765-ZQ"
    ok = make_chest_dataset(seed=8, patient_name=name, patient_id=pid)
    ignored = make_chest_dataset(seed=9, patient_name=name, patient_id=pid, body_part="HAND")
    bad = make_chest_dataset(seed=10, patient_name=name, patient_id=pid)
    bad.PixelData = b""
    res = scu_send(node.address, [ok, ignored, bad])
    assert res.statuses[:2] == [SUCCESS, SUCCESS] and res.statuses[2] != SUCCESS
    node.flush()
    assert echo(node.address) == SUCCESS
    text = caplog.text + " ".join(r.getMessage() for r in caplog.records)
    assert "stored" in text  # the node did log
    for needle in ("Zyxwvutsr", "Qponmlkji", pid):
        assert needle not in text
    # PatientID is kept only as a salted hash
    from dicom_node import hash_patient_id

    rows = instances(sqlite_url)
    assert all(r.patient_id_hash == hash_patient_id(node.settings, pid) for r in rows)
    assert all(pid not in (r.patient_id_hash or "") for r in rows)


def test_spool_file_is_exact_bytes(node_factory, sqlite_url, tmp_path):
    """What is stored is event.encoded_dataset(): Part 10 meta + the data set as received."""
    node = node_factory(sqlite_url)
    src = tmp_path / "x.dcm"
    make_chest_dataset(seed=11).save_as(src, enforce_file_format=True)
    assert scu_send(node.address, [src]).statuses == [SUCCESS]
    (row,) = instances(sqlite_url)
    stored = node.spool.resolve(row.spool_path).read_bytes()
    original = Path(src).read_bytes()
    assert _dataset_part(stored) == _dataset_part(original)


def _dataset_part(data: bytes) -> bytes:
    import io

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(data)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return data[fp.tell() :]


def test_encoded_parts_equal_encoded_dataset(node_factory, sqlite_url, dicom_samples):
    """What the node writes is byte-for-byte event.encoded_dataset() (the buffered receive;
    tests/node/test_chunked.py shows the chunked one stores the same bytes)."""
    import dicom_node.node as node_mod

    seen: list[bool] = []
    real = node_mod.encoded_parts

    def checking(event):
        head, body = real(event)
        seen.append(head + bytes(body) == event.encoded_dataset())
        return head, body

    node = node_factory(sqlite_url, receive_chunked=False)
    orig = node_mod.encoded_parts
    node_mod.encoded_parts = checking
    try:
        files = sorted((dicom_samples / "chest").glob("*.dcm"))
        assert scu_send(node.address, files).statuses == [SUCCESS] * len(files)
    finally:
        node_mod.encoded_parts = orig
    assert seen == [True] * len(files)
    for row in instances(sqlite_url):
        import hashlib

        data = node.spool.resolve(row.spool_path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.content_sha256


def test_concurrent_identical_sends_are_one_instance(node_factory, db_url):
    """Four associations racing with the same content: one instance, the rest duplicates."""
    from concurrent.futures import ThreadPoolExecutor

    node = node_factory(db_url)
    ds = make_chest_dataset(rows=256, cols=256, seed=13)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: scu_send(node.address, [ds]), range(4)))
    assert [r.statuses for r in results] == [[SUCCESS]] * 4
    node.flush()
    (row,) = instances(db_url)
    kinds = [e.kind for e in events(db_url, row.id)]
    assert kinds.count("duplicate") == 3
    assert len(spool_files(node)) == 1
    assert sum(a.n_stored for a in associations(db_url)) == 1
    assert sum(a.n_duplicate for a in associations(db_url)) == 3
