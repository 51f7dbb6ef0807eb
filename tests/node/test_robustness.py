"""Fuzz-style robustness: mutated real files over real associations, garbage on the socket.
After each attack the node still answers C-ECHO."""

from __future__ import annotations

import socket
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE

from db.models import State
from dicom_node.status import SUCCESS
from tests.node.conftest import echo, instances, scu_send

SAMPLE = "chest/dx_thorax_monochrome1.dcm"


def _dataset_offset(data: bytes) -> int:
    import io

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(data)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return fp.tell()


@pytest.fixture
def fuzz_node(node_factory, db_url):
    return node_factory(db_url, max_pixels=10_000_000)


def _send_raw(address: tuple[str, int], path: Path) -> int | None:
    """C-STORE a file's encoded bytes as they are (pynetdicom reads only what it needs)."""
    import pydicom

    ae = AE(ae_title="FUZZ")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        sop_class, ts = str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
        sop_class.encode("ascii")
        ts.encode("ascii")
        ae.add_requested_context(sop_class, ts)
    except Exception:
        return None  # the SCU itself cannot build a request from it
    assoc = ae.associate(*address, ae_title="CXR_WORKER")
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status) if "Status" in rsp else None
    except Exception:
        return None
    finally:
        if assoc.is_established:
            assoc.release()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_real_files(fuzz_node, db_url, dicom_samples, data):
    raw = (dicom_samples / SAMPLE).read_bytes()
    start = _dataset_offset(raw)
    buf = bytearray(raw)
    # mutate the data set: a few random bytes, concentrated on the header where it hurts
    n = data.draw(st.integers(1, 12))
    for _ in range(n):
        pos = data.draw(st.integers(start, min(len(buf) - 1, start + 2000)))
        buf[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(start + 8, len(buf)))]
    with tempfile.NamedTemporaryFile(suffix=".dcm", delete=False) as fh:
        fh.write(buf)
    try:
        _send_raw(fuzz_node.address, Path(fh.name))
    finally:
        Path(fh.name).unlink()
    assert echo(fuzz_node.address) == SUCCESS
    # whatever was accepted for classification is a parseable, durable file
    import pydicom

    for row in instances(db_url, state=State.QUEUED.value):
        ds = pydicom.dcmread(fuzz_node.spool.resolve(row.spool_path), stop_before_pixels=True)
        assert str(ds.SOPInstanceUID) == row.sop_instance_uid


def _raw(address: tuple[str, int], payload: bytes) -> None:
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(payload)
        s.settimeout(0.2)  # read whatever the node answers (A-ABORT/A-ASSOCIATE-RJ), then go
        try:
            s.recv(1024)
        except OSError:
            pass


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(junk=st.binary(min_size=1, max_size=2048))
def test_random_bytes_on_socket(fuzz_node, junk):
    _raw(fuzz_node.address, junk)
    assert echo(fuzz_node.address) == SUCCESS


def test_truncated_pdus(fuzz_node):
    a_associate_rq = struct.pack(">BBI", 0x01, 0x00, 4096) + b"\x00\x01" + b"\x00" * 30
    p_data_tf = struct.pack(">BBI", 0x04, 0x00, 1 << 30) + b"\x00" * 16
    for payload in (a_associate_rq, p_data_tf, b"\x01", struct.pack(">BBI", 0x07, 0, 4)):
        _raw(fuzz_node.address, payload)
        assert echo(fuzz_node.address) == SUCCESS


def test_malformed_and_headerless(fuzz_node, dicom_samples):
    from tests.conftest import make_chest_dataset

    ds = make_chest_dataset(seed=70)
    ds.Rows = 0  # an image without dimensions
    headerless = dicom_samples / "chest" / "cr_chest_monochrome1_10bit_no_part10_header.dcm"
    res = scu_send(fuzz_node.address, [ds, headerless])
    assert res.statuses[0] != SUCCESS and res.statuses[1] == SUCCESS
    assert echo(fuzz_node.address) == SUCCESS
