"""Issue 9: a mutation fuzz of the live node, 2,000+ inputs in CI.

A seeded mutation corpus (reproducible: the seed is in the test) is built from small
generated chest images and real samples of ``../shared/dicom-samples``, each with its own
UIDs and a known patient name/ID:

* bytes flipped, deleted or inserted; truncation; wrong VRs; huge lengths;
* pixel bombs (Rows x Columns far over the limit); UID mismatches between the C-STORE
  request and the data set; raw garbage as the data set;
* half-open and idle TCP connections, and garbage PDUs, between the batches.

Checked: after every batch the node answers C-ECHO; every answer is Success or a named
PS3.4 refusal (never 0110, "processing failure": that would be our bug); every refusal has
an audit row with its reason; the node's memory stays bounded; no patient name or ID of
the inputs appears in a log line or an audit column.
"""

from __future__ import annotations

import io
import logging
import random
import re
import socket
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from db.models import Instance
from dicom_node.status import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from tests.conftest import make_chest_dataset
from tests.node.conftest import echo, instances

SEED = 20261202
N_INPUTS = 2000
BATCH = 100
PHI_NAME, PHI_ID = "Fuzzname^Qwertyuiop", "FUZZID-778899"
ALLOWED = {SUCCESS, OUT_OF_RESOURCES, DATASET_DOES_NOT_MATCH_SOP_CLASS, CANNOT_UNDERSTAND}
REAL = [
    "chest/cr_chest_monochrome1_10bit_no_part10_header.dcm",
    "chest/dx_thorax_monochrome1.dcm",
    "not-chest/mr.dcm",
]
VRS = [
    b"US",
    b"UI",
    b"CS",
    b"PN",
    b"LO",
    b"SH",
    b"DA",
    b"TM",
    b"IS",
    b"DS",
    b"OW",
    b"OB",
    b"SQ",
    b"UL",
    b"FD",
    b"AT",
    b"UN",
    b"UT",
]
_VR_AT = re.compile(rb"(?<=[\x00-\xff]{4})(" + b"|".join(VRS) + rb")")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _bases(dicom_samples: Path) -> list[pydicom.Dataset]:
    bases = [
        make_chest_dataset(seed=900 + i, rows=48, cols=40, patient_name=PHI_NAME, patient_id=PHI_ID)
        for i in range(3)
    ]
    for name in REAL:
        ds = pydicom.dcmread(dicom_samples / name, force=True)
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            from pydicom.dataset import FileMetaDataset

            ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.PatientName, ds.PatientID = PHI_NAME, PHI_ID
        bases.append(ds)
    return bases


def _uid(rng: random.Random) -> str:
    return generate_uid(entropy_srcs=[str(rng.getrandbits(64))])  # reproducible from SEED


def _fresh(base: pydicom.Dataset, rng: random.Random) -> tuple[bytes, int]:
    """The base with new UIDs, encoded; and where its data set starts."""
    ds = base.copy()
    ds.file_meta = base.file_meta.copy()
    uid = _uid(rng)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    raw = _encode(ds)
    fp = io.BytesIO(raw)
    from pydicom.filereader import _read_file_meta_info, read_preamble

    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return raw, fp.tell()


def _mutate(rng: random.Random, base: pydicom.Dataset) -> tuple[str, bytes]:
    kind = rng.choice(
        [
            "flip",
            "delete",
            "insert",
            "truncate",
            "vr",
            "length",
            "bomb",
            "uid_mismatch",
            "garbage",
            "flip",
            "vr",
            "length",
        ]
    )
    if kind == "bomb":
        ds = base.copy()
        ds.file_meta = base.file_meta.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(rng)
        ds.Rows, ds.Columns = rng.choice([(60000, 60000), (65535, 40000), (30000, 30000)])
        return kind, _encode(ds)
    if kind == "uid_mismatch":
        ds = base.copy()
        ds.file_meta = base.file_meta.copy()
        ds.file_meta.MediaStorageSOPInstanceUID = _uid(rng)
        ds.SOPInstanceUID = _uid(rng)
        return kind, _encode(ds)
    raw, start = _fresh(base, rng)
    buf = bytearray(raw)
    head_end = min(len(buf), start + 1500)  # the header, where parsing decides
    if kind == "garbage":
        return kind, bytes(buf[:start]) + rng.randbytes(rng.randint(1, 4000))
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(start, head_end)] = rng.randrange(256)
    elif kind == "delete":
        at = rng.randrange(start, head_end)
        del buf[at : at + rng.randint(1, 64)]
    elif kind == "insert":
        at = rng.randrange(start, head_end)
        buf[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == "truncate":
        buf = buf[: rng.randrange(start + 1, len(buf))]
    else:
        spots = [m.start() for m in _VR_AT.finditer(bytes(buf), start, head_end)]
        if not spots:
            return kind, bytes(buf)
        at = rng.choice(spots)
        if kind == "vr":
            buf[at : at + 2] = rng.choice(VRS)
        else:  # a huge length after the VR (2-byte or 4-byte form)
            if bytes(buf[at : at + 2]) in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
                buf[at + 4 : at + 8] = rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 0xFFFFFFFE]).to_bytes(
                    4, "little"
                )
            else:
                buf[at + 2 : at + 4] = rng.choice([0xFFFF, 0xFFF0, 0x8000]).to_bytes(2, "little")
    return kind, bytes(buf)


class _Sender:
    """Sends encoded files over associations it keeps open (a new one after an abort)."""

    def __init__(self, address: tuple[str, int], contexts: set[tuple[str, str]]) -> None:
        self.address = address
        self.ae = AE(ae_title="FUZZ")
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 15
        for sop, ts in sorted(contexts):
            self.ae.add_requested_context(sop, ts)
        self.assoc = None

    def send(self, path: Path) -> int | None:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate(*self.address, ae_title="CXR_WORKER")
            if not self.assoc.is_established:
                self.assoc = None
                return None
        try:
            rsp = self.assoc.send_c_store(path)
        except Exception:
            return None  # the SCU could not build a request from these bytes
        return int(rsp.Status) if "Status" in rsp else None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def _connection_faults(address: tuple[str, int], rng: random.Random) -> list[socket.socket]:
    """Half-open (a partial A-ASSOCIATE-RQ) and idle connections, and garbage PDUs."""
    held = []
    for _ in range(5):
        s = socket.create_connection(address, timeout=5)
        s.sendall(b"\x01\x00\x00\x00\x10\x00" + rng.randbytes(rng.randint(0, 20)))  # half-open
        held.append(s)
        held.append(socket.create_connection(address, timeout=5))  # idle
    for _ in range(3):
        with socket.create_connection(address, timeout=5) as s:
            s.sendall(rng.randbytes(rng.randint(1, 600)))
    return held


@pytest.mark.slow
def test_fuzz_live_node(node_factory, sqlite_url, dicom_samples, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    node = node_factory(sqlite_url, max_pixels=10_000_000, request_timeout=2.0)
    rng = random.Random(SEED)
    bases = _bases(dicom_samples)
    contexts = {(str(b.SOPClassUID), str(b.file_meta.TransferSyntaxUID)) for b in bases}
    sender = _Sender(node.address, contexts)
    statuses: dict[int | None, int] = {}
    kinds: dict[str, int] = {}
    refused = 0
    held: list[socket.socket] = []
    rss0 = _rss_mb()
    rss_peak = rss0
    path = tmp_path / "input.dcm"
    answered = 0
    i = 0
    try:
        # inputs the SCU itself cannot encode never reach the node: go on until N_INPUTS
        # have been answered by it
        while answered < N_INPUTS and i < 3 * N_INPUTS:
            i += 1
            kind, data = _mutate(rng, rng.choice(bases))
            path.write_bytes(data)
            st = sender.send(path)
            statuses[st] = statuses.get(st, 0) + 1
            if st is None:
                continue
            kinds[kind] = kinds.get(kind, 0) + 1
            answered += 1
            assert st in ALLOWED, (i, kind, hex(st))
            refused += st != SUCCESS
            if answered % BATCH == 0:
                assert echo(node.address) == SUCCESS, f"no C-ECHO after input {i}"
                for s in held:
                    s.close()
                held = _connection_faults(node.address, rng)
                rss_peak = max(rss_peak, _rss_mb())
    finally:
        sender.close()
        for s in held:
            s.close()
    assert echo(node.address) == SUCCESS
    assert answered >= N_INPUTS, statuses  # the inputs really reached the node
    assert refused >= 0.2 * answered, statuses  # the mutations really were refused often
    # every refusal has an audit row with its status and reason
    rows = instances(sqlite_url)
    failed = [r for r in rows if r.state == "failed"]
    assert len(failed) >= refused
    assert all(r.reason and re.match(r"refused 0x(A700|A900|C000) ", r.reason) for r in failed)
    # memory is bounded: the node (in this process) grew by less than this over the run
    assert rss_peak - rss0 < 300, (rss0, rss_peak)
    # no PHI in any log line or audit column
    # what the node's log handler writes: each record through the production filters
    # (cxr.logconfig: peer-noise reduction, PHI masking) and its formatter
    import copy

    from cxr.logconfig import PeerNoiseFilter, PhiFilter

    noise, phi, fmt = PeerNoiseFilter(), PhiFilter(), logging.Formatter()
    for rec in caplog.records:
        r = copy.copy(rec)
        if not (noise.filter(r) and phi.filter(r)):
            continue
        line = fmt.format(r)
        for secret in (PHI_NAME, PHI_ID, "Qwertyuiop", "Fuzzname"):
            assert secret not in line, (rec.name, rec.levelname, line[:500])
    columns = [c.key for c in Instance.__table__.columns]
    for r in rows:
        for c in columns:
            v = getattr(r, c)
            if isinstance(v, str):
                assert PHI_ID not in v and "Fuzzname" not in v and "Qwertyuiop" not in v, c
    print(
        f"fuzz: {answered} answered inputs {kinds}; statuses "
        f"{ {('none' if k is None else hex(k)): v for k, v in statuses.items()} }; "
        f"rss {rss0:.0f} -> peak {rss_peak:.0f} MB"
    )
