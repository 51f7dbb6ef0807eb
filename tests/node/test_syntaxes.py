"""Each offered transfer syntax, proved with a real compressed file sent and decoded back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid

from dicom_node.status import SUCCESS
from dicom_node.syntaxes import COMPRESSED_SYNTAXES, accepted_transfer_syntaxes, can_decode
from tests.conftest import dcmtk, make_chest_dataset
from tests.node.conftest import instances, scu_send

# syntax -> (how to make it, lossless?)
PYDICOM_ENCODED = {
    uid.RLELossless: {},
    uid.JPEGLSLossless: {},
    uid.JPEGLSNearLossless: {"jls_error": 2},
    uid.JPEG2000Lossless: {},
    uid.JPEG2000: {"j2k_cr": [10]},
}
DCMTK_ENCODED = {
    uid.JPEGBaseline8Bit: ("+eb", 8),
    uid.JPEGExtended12Bit: ("+ee", 12),
    uid.JPEGLossless: ("+el", 12),
    uid.JPEGLosslessSV1: ("+e1", 12),
}
LOSSY = {uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLSNearLossless, uid.JPEG2000}


def test_every_offered_syntax_is_decodable_and_covered():
    offered = accepted_transfer_syntaxes()
    for ts in offered:
        assert can_decode(ts)
    assert set(COMPRESSED_SYNTAXES) == set(PYDICOM_ENCODED) | set(DCMTK_ENCODED)
    assert not can_decode("1.2.3.4.5.6.7")  # an unknown syntax is never offered


def _make(ts: str, tmp: Path, seed: int) -> Path:
    out = tmp / f"{ts}.dcm"
    if ts in PYDICOM_ENCODED:
        ds = make_chest_dataset(rows=96, cols=80, bits=12, seed=seed)
        ds.compress(ts, **PYDICOM_ENCODED[ts])
        ds.save_as(out, enforce_file_format=True)
        return out
    flag, bits = DCMTK_ENCODED[ts]
    src = tmp / f"{ts}.raw.dcm"
    make_chest_dataset(rows=96, cols=80, bits=bits, seed=seed).save_as(
        src, enforce_file_format=True
    )
    subprocess.run([dcmtk("dcmcjpeg"), flag, str(src), str(out)], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("ts", list(COMPRESSED_SYNTAXES), ids=lambda t: uid.UID(t).keyword)
def test_compressed_syntax_round_trip(ts, node_factory, sqlite_url, tmp_path):
    if not can_decode(ts):
        pytest.skip(f"no decoder installed for {uid.UID(ts).name}: not offered")
    f = _make(ts, tmp_path, seed=hash(ts) % 1000)
    sent = pydicom.dcmread(f)
    assert sent.file_meta.TransferSyntaxUID == ts
    node = node_factory(sqlite_url)
    assert scu_send(node.address, [f]).statuses == [SUCCESS]
    (row,) = instances(sqlite_url)
    assert row.transfer_syntax_uid == ts
    stored = pydicom.dcmread(node.spool.resolve(row.spool_path))
    assert stored.file_meta.TransferSyntaxUID == ts
    got = stored.pixel_array.astype(np.int32)
    want = sent.pixel_array.astype(np.int32)
    assert got.shape == want.shape == (96, 80)
    if ts in LOSSY:
        assert np.abs(got - want).mean() < 0.05 * want.max()
    else:
        assert np.array_equal(got, want)


@pytest.mark.parametrize(
    "name",
    [
        "chest/cr_chest_sc_jpeg_baseline.dcm",
        "chest/cr_jpeg_lossless_modality_lut_sequence.dcm",
        "not-chest/deflated.dcm",
    ],
)
def test_shared_sample_syntaxes_decode(name, dicom_samples):
    ds = pydicom.dcmread(dicom_samples / name)
    assert ds.file_meta.TransferSyntaxUID in accepted_transfer_syntaxes()
    assert ds.pixel_array.size > 0


def test_deflated_transfer_syntax(node_factory, sqlite_url, tmp_path):
    ds = make_chest_dataset(seed=60)
    f = tmp_path / "deflated.dcm"
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    ds.save_as(f, enforce_file_format=True)
    node = node_factory(sqlite_url)
    assert scu_send(node.address, [f]).statuses == [SUCCESS]
    (row,) = instances(sqlite_url)
    stored = pydicom.dcmread(node.spool.resolve(row.spool_path))
    assert stored.file_meta.TransferSyntaxUID == uid.DeflatedExplicitVRLittleEndian
    assert np.array_equal(stored.pixel_array, ds.pixel_array)


def test_syntax_without_decoder_not_offered(monkeypatch):
    import dicom_node.syntaxes as sx

    monkeypatch.setattr(sx, "can_decode", lambda u: u != uid.JPEG2000)
    offered = sx.accepted_transfer_syntaxes()
    assert uid.JPEG2000 not in offered and uid.JPEG2000Lossless in offered
    cr = [
        c
        for c in sx.supported_contexts()
        if c.abstract_syntax == uid.ComputedRadiographyImageStorage
    ]
    assert len(cr) == 1 and uid.JPEG2000 not in cr[0].transfer_syntax


def test_unsupported_syntax_context_rejected_and_recorded(node_factory, sqlite_url):
    from pynetdicom import AE

    from tests.node.conftest import associations

    node = node_factory(sqlite_url)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(uid.ComputedRadiographyImageStorage, uid.HTJ2KLossless)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(*node.address, ae_title="CXR_WORKER")
    assert assoc.is_established
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == ["1.2.840.10008.1.1"]
    assoc.release()
    (row,) = associations(sqlite_url)
    assert uid.ComputedRadiographyImageStorage in row.reason


def test_deflated_header_is_parsed_once(tmp_path, monkeypatch):
    """A deflated data set is inflated and read once (not a header pass, then a second
    full read for its pixel element)."""
    import io

    import dicom_node.filters as filters

    ds = make_chest_dataset(seed=61)
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    reads = []
    real = pydicom.dcmread

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        reads.append(kw.get("stop_before_pixels", False))
        return real(*a, **kw)

    monkeypatch.setattr(filters.pydicom, "dcmread", counting)
    h = filters.parse_header(data)
    assert len(reads) == 1
    assert h.pixels.present and h.pixels.length == len(ds.PixelData)
    assert str(h.ds.SOPInstanceUID) == str(ds.SOPInstanceUID)
    # a plain (not deflated) one still stops before its pixels
    reads.clear()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    h2 = filters.parse_header(buf.getvalue())
    assert reads == [True] and h2.pixels.present
