"""The log filters of every process (cxr.logconfig): PHI never reaches a log line, and a
peer's garbage makes one line per connection."""

from __future__ import annotations

import logging
import threading

from cxr.logconfig import PeerNoiseFilter, PhiFilter, register_dataset_phi


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_peer_values_quoted_by_pynetdicom_are_dropped() -> None:
    """Found by the fuzz test: a mutated data set whose SOP Instance UID swallowed the next
    elements made pynetdicom log the "UID", patient name included, before any PHI could be
    registered."""
    msg = (
        "Invalid 'Affected SOP Instance UID' value '1.2.826.0.1.3680043.8.498.39\\x08"
        "\\x00Fuzzname^Qwerty' - must not exceed 64 characters"
    )
    rec = _record("pynetdicom.utils", logging.ERROR, msg)
    assert PeerNoiseFilter().filter(rec)
    out = logging.Formatter().format(rec)
    assert "Fuzzname" not in out and "must not exceed 64 characters" in out
    assert rec.levelno == logging.WARNING
    warn = _record("pynetdicom.dsutils", logging.WARNING, "bad value 'Doe^Jane' for PN")
    assert PeerNoiseFilter().filter(warn) and "Doe" not in warn.getMessage()


def test_one_line_per_connection_thread() -> None:
    f = PeerNoiseFilter()
    kept = [
        f.filter(_record("pynetdicom.dul", logging.ERROR, f"Unknown PDU type {i}"))
        for i in range(5)
    ]
    assert kept == [True, False, False, False, False]
    f.connection_closed(threading.get_ident())
    assert f.filter(_record("pynetdicom.dul", logging.ERROR, "next connection"))
    assert f.filter(_record("dicom_node.node", logging.ERROR, "ours are never dropped"))


def test_undecodable_names_are_masked_from_their_raw_bytes() -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag

    ds = Dataset()
    ds._dict[Tag(0x00100010)] = RawDataElement(
        Tag(0x00100010), "PN", 12, b"Zqxw^Vbnm\xff\xfe ", 0, False, True
    )
    register_dataset_phi(ds)
    rec = _record("x", logging.WARNING, "value b'Zqxw^Vbnm\\xff\\xfe' cannot be decoded")
    assert PhiFilter().filter(rec)
    assert "Zqxw" not in rec.getMessage() and "Vbnm" not in rec.getMessage()
