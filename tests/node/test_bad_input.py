"""Issue 9, defects 3 and 4: damaged images and unparseable data sets get their PS3.4
status (A900, C000), an audit row with the reason, and one clean log line (no traceback)."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pydicom.errors
import pytest

from db.models import State
from dicom_node.status import CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS
from tests.conftest import make_chest_dataset
from tests.node.conftest import instances, scu_send, spool_files
from tests.node.test_robustness import _send_raw

SC = "1.2.840.10008.5.1.4.1.1.7"
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def _short_pixels(ds):
    ds.PixelData = bytes(ds.PixelData)[: len(ds.PixelData) // 3]
    return ds


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda: _no_pixels(make_chest_dataset(seed=80)), "without pixel data"),
        (lambda: _no_pixels(make_chest_dataset(seed=81, view="LL")), "without pixel data"),
        (
            lambda: _short_pixels(make_chest_dataset(seed=82, modality="DX", sop_class=DX)),
            "expected",
        ),
        (
            lambda: _short_pixels(
                make_chest_dataset(seed=83, modality="OT", sop_class=SC, body_part="KNEE")
            ),
            "expected",
        ),
    ],
    ids=["cr-no-pixels", "cr-lateral-no-pixels", "dx-short-pixels", "sc-knee-short-pixels"],
)
def test_damaged_image_is_refused_a900(node_factory, sqlite_url, make, reason):
    node = node_factory(sqlite_url)
    res = scu_send(node.address, [make()])
    assert res.statuses == [DATASET_DOES_NOT_MATCH_SOP_CLASS]
    (row,) = instances(sqlite_url)
    assert row.state == State.FAILED.value
    assert row.reason.startswith("refused 0xA900") and reason in row.reason
    assert not spool_files(node)


def _no_pixels(ds):
    del ds.PixelData
    return ds


def test_unparseable_value_is_cannot_understand(node_factory, sqlite_url, tmp_path: Path, caplog):
    """BitsAllocated encoded with 3 bytes: the data set parses, but a value the filters
    read cannot be (pydicom's BytesLengthException): C000, not 0110 + a traceback."""
    caplog.set_level(logging.INFO)
    node = node_factory(sqlite_url)
    ds = make_chest_dataset(seed=84)
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    bits_el = b"\x28\x00\x00\x01US\x02\x00" + int(ds.BitsAllocated).to_bytes(2, "little")
    assert raw.count(bits_el) == 1
    path.write_bytes(raw.replace(bits_el, b"\x28\x00\x00\x01US\x03\x00\x10\x00\x00"))
    with pytest.raises(pydicom.errors.BytesLengthException):
        int(pydicom.dcmread(path).BitsAllocated)  # pydicom itself cannot read it
    status = _send_raw(node.address, path)
    assert status == CANNOT_UNDERSTAND
    (row,) = instances(sqlite_url)
    assert row.state == State.FAILED.value and row.reason.startswith("refused 0xC000")
    text = caplog.text
    assert "Traceback" not in text
    refused = [r for r in caplog.records if "C-STORE refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.INFO
    # the line names the sender and the instance, for the admin to find them
    line = refused[0].getMessage()
    assert "from " in line and f"SOP Instance UID {ds.SOPInstanceUID}" in line, line


def test_damaged_header_puts_no_phi_in_the_audit(node_factory, sqlite_url, tmp_path: Path):
    """Issue 9, defect 2: an AccessionNumber whose length swallows the next elements, the
    PatientName among them, used to put the name into ``accession_number`` (shown by
    ``cxr audit list/export``). A value that breaks its VR is not stored."""
    node = node_factory(sqlite_url)
    ds = make_chest_dataset(seed=85)
    ds.AccessionNumber = "ACC1"
    path = tmp_path / "acc.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    el = b"\x08\x00\x50\x00SH\x04\x00ACC1"
    at = raw.index(el)
    end = raw.index(b"Doe^Jane", at) + len(b"Doe^Jane")
    length = end - (at + 8)
    length += length % 2
    path.write_bytes(raw[: at + 6] + length.to_bytes(2, "little") + raw[at + 8 :])
    assert "Doe^Jane" in str(pydicom.dcmread(path, force=True).AccessionNumber)
    status = _send_raw(node.address, path)
    assert status is not None
    (row,) = instances(sqlite_url)
    for col in (
        "accession_number",
        "study_instance_uid",
        "series_instance_uid",
        "modality",
        "body_part",
        "view_position",
        "reason",
    ):
        v = getattr(row, col) or ""
        assert "Doe" not in v and "Jane" not in v and "PID-12345" not in v, (col, v)
    assert row.accession_number is None
