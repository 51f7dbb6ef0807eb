"""Chunked C-STORE receive (CXR_RECEIVE_CHUNKED, dicom_node/chunked.py): the data set is
written to the spool's tmp/ while it arrives and renamed into incoming/; what is stored is
the same Part 10 file as with the buffered receive, and no tmp/ file outlives a C-STORE."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, _config, evt
from pynetdicom.dsutils import encode_file_meta

from db.models import State
from dicom_node import chunked
from dicom_node.status import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from tests.conftest import dcmtk, make_chest_dataset
from tests.node.conftest import (
    NODE_AET,
    instances,
    scu_send,
    spool_files,
    tmp_files,
    wait_for,
)
from tests.node.test_robustness import _dataset_offset


@pytest.fixture
def rx_seen(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """One entry per data set the node's handler took from a chunked file."""
    seen: list[dict[str, Any]] = []
    real = chunked.RxFile.finish

    def finish(self: chunked.RxFile) -> None:
        real(self)
        seen.append({"name": self.name, "ino": os.fstat(self.fileno()).st_ino, "size": self.size})

    monkeypatch.setattr(chunked.RxFile, "finish", finish)
    return seen


def _large_file(tmp_path: Path, seed: int = 7, rows: int = 3000, cols: int = 3000) -> Path:
    """An 18 MB CR (16-bit native pixels, random so that nothing compresses or repeats)."""
    pixels = np.random.default_rng(seed).integers(0, 4096, (rows, cols), dtype=np.uint16)
    ds = make_chest_dataset(rows=rows, cols=cols, seed=seed, pixels=pixels)
    path = tmp_path / f"large{seed}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _storescu(node: Any, path: Path) -> subprocess.CompletedProcess[str]:
    host, port = node.address
    return subprocess.run(
        [dcmtk("storescu"), "-aet", "PACS", "-aec", NODE_AET, host, str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_large_instance_from_storescu_arrives_intact(node_factory, sqlite_url, tmp_path, rx_seen):
    node = node_factory(sqlite_url)
    src = _large_file(tmp_path)
    original = src.read_bytes()
    assert len(original) > 15_000_000
    r = _storescu(node, src)
    assert r.returncode == 0, r.stderr

    (row,) = instances(sqlite_url)
    assert row.state in (State.RECEIVED.value, State.QUEUED.value)
    stored_path = node.spool.resolve(row.spool_path)
    stored = stored_path.read_bytes()
    # it came through the chunked file, and that very file (a rename) is the spool file
    (rx,) = rx_seen
    assert Path(rx["name"]).parent == node.spool.tmp
    assert rx["size"] == len(stored) == row.size_bytes
    assert os.stat(stored_path).st_ino == rx["ino"]
    assert hashlib.sha256(stored).hexdigest() == row.content_sha256
    # the data set byte for byte as sent, pixel data included
    assert stored[_dataset_offset(stored) :] == original[_dataset_offset(original) :]
    got, want = pydicom.dcmread(stored_path), pydicom.dcmread(src)
    assert got.PixelData == want.PixelData
    # the file meta the node writes: the request's UIDs, the context's transfer syntax
    meta = got.file_meta
    assert meta.MediaStorageSOPInstanceUID == want.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == want.SOPClassUID
    assert meta.TransferSyntaxUID == want.file_meta.TransferSyntaxUID
    assert meta.ImplementationClassUID == PYNETDICOM_IMPLEMENTATION_UID
    # nothing left in tmp/, no copy in the system temporary directory
    assert tmp_files(node) == []
    assert not Path(rx["name"]).exists()


def test_chunked_and_buffered_store_the_same_bytes(node_factory, sqlite_url, dicom_samples):
    """The chunked file is exactly what the buffered receive writes
    (preamble + encode_file_meta(event.file_meta) + the data set as received)."""
    files = sorted((dicom_samples / "chest").glob("*.dcm"))
    stored: dict[bool, dict[str, bytes]] = {}
    for on in (True, False):
        node = node_factory(sqlite_url.replace("audit.db", f"audit-{on}.db"), receive_chunked=on)
        assert scu_send(node.address, files).statuses == [SUCCESS] * len(files)
        stored[on] = {p.name: p.read_bytes() for p in spool_files(node)}
        assert tmp_files(node) == []
    assert stored[True] == stored[False] and len(stored[True]) == len(files)
    for data in stored[True].values():  # and starts with the file meta the node encodes
        meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
        assert data[:132] == b"\x00" * 128 + b"DICM"
        assert data[132 : 132 + len(encode_file_meta(meta))] == encode_file_meta(meta)


def _no_pixels(ds: pydicom.Dataset) -> pydicom.Dataset:
    del ds.PixelData
    return ds


@pytest.mark.parametrize(
    "make,status",
    [
        (lambda: make_chest_dataset(seed=40, body_part="KNEE"), SUCCESS),  # ignored
        (lambda: _no_pixels(make_chest_dataset(seed=41)), DATASET_DOES_NOT_MATCH_SOP_CLASS),
        (lambda: make_chest_dataset(seed=42, rows=800, cols=800), OUT_OF_RESOURCES),  # size
        (lambda: make_chest_dataset(seed=43, rows=500, cols=500), OUT_OF_RESOURCES),  # pixels
    ],
    ids=["ignored", "no-pixels-a900", "over-size-limit-a700", "over-pixel-limit-a700"],
)
def test_refusals_and_ignores_leave_no_tmp_file(node_factory, sqlite_url, rx_seen, make, status):
    node = node_factory(sqlite_url, max_instance_bytes=1_000_000, max_pixels=200_000)
    assert scu_send(node.address, [make()]).statuses == [status]
    assert len(rx_seen) == 1  # through the chunked path
    assert tmp_files(node) == [] and spool_files(node) == []
    (row,) = instances(sqlite_url)
    assert row.state in (State.IGNORED.value, State.FAILED.value)
    if "CXR_MAX_INSTANCE_BYTES" in (row.reason or ""):
        assert rx_seen[0]["size"] > 1_000_000  # counted in full, not all written
    assert all(not Path(r["name"]).exists() for r in rx_seen)


def test_over_size_limit_writes_no_more_than_the_limit(
    node_factory, sqlite_url, tmp_path, monkeypatch
):
    node = node_factory(sqlite_url, max_instance_bytes=2_000_000)
    sizes: list[int] = []
    real = chunked.RxFile.finish

    def finish(self: chunked.RxFile) -> None:
        real(self)
        sizes.append(os.fstat(self.fileno()).st_size)

    monkeypatch.setattr(chunked.RxFile, "finish", finish)
    src = _large_file(tmp_path, seed=8)
    assert scu_send(node.address, [src]).statuses == [OUT_OF_RESOURCES]
    assert sizes and sizes[0] <= 2_000_000
    assert tmp_files(node) == []
    (row,) = instances(sqlite_url)
    assert "CXR_MAX_INSTANCE_BYTES" in row.reason


def test_unparseable_data_set_leaves_no_tmp_file(node_factory, sqlite_url, tmp_path, rx_seen):
    """BitsAllocated with 3 bytes (as in test_bad_input): C000, and the file is gone."""
    from tests.node.test_robustness import _send_raw

    node = node_factory(sqlite_url)
    ds = make_chest_dataset(seed=44)
    src = tmp_path / "bad.dcm"
    ds.save_as(src, enforce_file_format=True)
    raw = src.read_bytes()
    bits_el = b"\x28\x00\x00\x01US\x02\x00" + int(ds.BitsAllocated).to_bytes(2, "little")
    src.write_bytes(raw.replace(bits_el, b"\x28\x00\x00\x01US\x03\x00\x10\x00\x00"))
    assert _send_raw(node.address, src) == CANNOT_UNDERSTAND
    assert len(rx_seen) == 1
    assert tmp_files(node) == [] and spool_files(node) == []
    (row,) = instances(sqlite_url)
    assert row.reason.startswith("refused 0xC000")


def test_connection_lost_mid_data_set_leaves_no_tmp_file(
    node_factory, sqlite_url, tmp_path, monkeypatch
):
    """The peer's connection goes away half way through an 18 MB data set: the partial file
    pynetdicom was writing is deleted when the connection closes."""
    created: list[str] = []
    real_init = chunked.RxFile.__init__

    def init(self: chunked.RxFile, *args: Any) -> None:
        real_init(self, *args)
        created.append(self.name)

    monkeypatch.setattr(chunked.RxFile, "__init__", init)
    node = node_factory(sqlite_url)
    src = _large_file(tmp_path, seed=9)
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    sent = [0]
    cut = threading.Event()

    def on_pdu_sent(event: Any) -> None:
        sent[0] += 1
        if sent[0] == 5 and not cut.is_set():  # ~4 MB in the node's 1 MiB P-DATA PDUs
            cut.set()
            event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    assoc = ae.associate(
        *node.address, ae_title=NODE_AET, evt_handlers=[(evt.EVT_PDU_SENT, on_pdu_sent)]
    )
    assert assoc.is_established
    try:
        assoc.send_c_store(src)
    except Exception:
        pass
    finally:
        assoc.abort()
    assert cut.is_set()
    assert node.ae.maximum_pdu_size == 1 << 20
    assert len(created) == 1 and Path(created[0]).parent == node.spool.tmp
    assert wait_for(lambda: tmp_files(node) == [], timeout=20)
    assert spool_files(node) == [] and instances(sqlite_url) == []


def test_scope_is_the_node_ae_only(node_factory, sqlite_url, tmp_path):
    """The pynetdicom flag is process-global; here it is true only for the node's own
    associations: another SCP in the same process keeps receiving into memory."""
    node = node_factory(sqlite_url)
    assert bool(_config.STORE_RECV_CHUNKED_DATASET) is False  # this (test) thread
    got: list[tuple[bool, int]] = []

    def on_store(event: Any) -> int:
        got.append((chunked.rx_file(event.request) is not None, len(event.encoded_dataset())))
        return 0

    other = AE(ae_title="OTHER")
    other.add_supported_context(pydicom.uid.ComputedRadiographyImageStorage)
    server = other.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        ds = make_chest_dataset(seed=45)
        port = server.server_address[1]
        assert scu_send(("127.0.0.1", port), [ds], called="OTHER").statuses == [0]
        assert scu_send(node.address, [make_chest_dataset(seed=46)]).statuses == [SUCCESS]
    finally:
        server.shutdown()
    assert len(got) == 1 and got[0][0] is False and got[0][1] > 8000
    assert len(instances(sqlite_url)) == 1
