"""``cxr send`` against a real pynetdicom Storage SCP (in-process, loopback, free port)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)

from apps import send
from tests.conftest import REPO, free_port, make_chest_dataset

OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3 Refused: Out of Resources
COERCION = 0xB000  # PS3.4 B.2.3 Warning: Coercion of Data Elements
SUCCESS = 0x0000


@dataclass
class Scp:
    port: int
    ae_title: str = "TEST_SCP"
    statuses: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> status
    received: list[tuple[str, str, str]] = field(default_factory=list)  # (sop, ts, calling)
    pixels_ok: list[bool] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"


@pytest.fixture
def scp() -> Iterator[Scp]:
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, StoragePresentationContexts, evt

    s = Scp(free_port())

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        s.received.append(
            (
                str(ds.SOPInstanceUID),
                str(event.context.transfer_syntax),
                event.assoc.requestor.ae_title.strip(),
            )
        )
        s.pixels_ok.append("PixelData" in ds)
        return s.statuses.get(str(ds.SOPInstanceUID), SUCCESS)

    ae = AE(ae_title=s.ae_title)
    ae.require_called_aet = True
    for cx in StoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    server = ae.start_server(
        ("127.0.0.1", s.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield s
    finally:
        server.shutdown()


def _write(ds: pydicom.Dataset, path: Path, part10: bool = True) -> Path:
    if part10:
        ds.save_as(path, enforce_file_format=True)
    else:  # bare data set, implicit VR: no preamble, no file meta
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


def has_line(out: str, name: str, status: str) -> bool:
    return re.search(rf"^\S*{re.escape(name)}\s+{re.escape(status)}", out, re.M) is not None


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apps.cli", "send", "--no-progress", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_send_folder_all_success(scp: Scp, tmp_path: Path) -> None:
    folder = tmp_path / "study"
    (folder / "sub").mkdir(parents=True)
    a = _write(make_chest_dataset(seed=1), folder / "a.dcm")
    b = _write(make_chest_dataset(seed=2, modality="DX"), folder / "sub" / "b.dcm")
    c = _write(make_chest_dataset(seed=3), folder / "c_no_header", part10=False)
    (folder / "notes.txt").write_text("not DICOM")
    res = run_cli(str(folder), "--to", scp.target, "--calling-ae", "MY_SCU")
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(scp.received) == 3 and all(scp.pixels_ok)
    assert {r[2] for r in scp.received} == {"MY_SCU"}
    # the file without a Part 10 header went out in the syntax it is encoded in
    uid_c = pydicom.dcmread(c, force=True).SOPInstanceUID
    assert (uid_c, ImplicitVRLittleEndian) in [(r[0], r[1]) for r in scp.received]
    for f in (a, b, c):
        assert has_line(res.stdout, str(f), "Success (0x0000)"), res.stdout
    assert has_line(res.stdout, "notes.txt", "Skipped"), res.stdout
    assert "3 Success" in res.stdout


def test_send_reports_failure_and_warning(scp: Scp, tmp_path: Path) -> None:
    ok = make_chest_dataset(seed=1)
    bad = make_chest_dataset(seed=2)
    warn = make_chest_dataset(seed=3)
    scp.statuses[str(bad.SOPInstanceUID)] = OUT_OF_RESOURCES
    scp.statuses[str(warn.SOPInstanceUID)] = COERCION
    files = [
        _write(ok, tmp_path / "ok.dcm"),
        _write(bad, tmp_path / "bad.dcm"),
        _write(warn, tmp_path / "warn.dcm"),
    ]
    res = run_cli(*map(str, files), "--to", scp.target)
    assert res.returncode == 1, res.stdout
    assert has_line(res.stdout, "bad.dcm", "Failure (0xA700)"), res.stdout
    assert has_line(res.stdout, "warn.dcm", "Warning (0xB000)"), res.stdout
    assert has_line(res.stdout, "ok.dcm", "Success (0x0000)"), res.stdout


def test_warning_only_exits_zero(scp: Scp, tmp_path: Path) -> None:
    warn = make_chest_dataset(seed=3)
    scp.statuses[str(warn.SOPInstanceUID)] = COERCION
    res = run_cli(str(_write(warn, tmp_path / "w.dcm")), "--to", scp.target)
    assert res.returncode == 0, res.stdout


def test_rejected_association_fails_every_file(scp: Scp, tmp_path: Path) -> None:
    f = _write(make_chest_dataset(), tmp_path / "a.dcm")
    res = run_cli(str(f), "--to", f"WRONG_AET@127.0.0.1:{scp.port}")
    assert res.returncode == 1
    assert "Failure" in res.stdout and "association rejected" in res.stdout
    assert not scp.received


def test_unreachable_and_usage_errors(tmp_path: Path) -> None:
    f = _write(make_chest_dataset(), tmp_path / "a.dcm")
    res = run_cli(str(f), "--to", f"X@127.0.0.1:{free_port()}", "--timeout", "3")
    assert res.returncode == 1 and "Failure" in res.stdout
    assert run_cli(str(f), "--to", "no-port-here").returncode == 2
    assert run_cli(str(tmp_path / "missing.dcm"), "--to", "X@127.0.0.1:104").returncode == 2
    # a non-DICOM file named explicitly is a failure, not a skip
    txt = tmp_path / "x.txt"
    txt.write_text("hello")
    res = run_cli(str(txt), "--to", f"X@127.0.0.1:{free_port()}")
    assert res.returncode == 1 and "Not sent" in res.stdout


def test_contexts_cover_each_class_and_syntax() -> None:
    items = [
        send.FileItem(Path("1"), "1.2.840.10008.5.1.4.1.1.1", "1", ExplicitVRLittleEndian),
        send.FileItem(Path("2"), "1.2.840.10008.5.1.4.1.1.1", "2", ExplicitVRLittleEndian),
        send.FileItem(Path("3"), SecondaryCaptureImageStorage, "3", JPEGBaseline8Bit),
        send.FileItem(Path("4"), "", "", "", error="not DICOM"),
    ]
    cx = send.contexts_for(items)
    assert cx == [
        ("1.2.840.10008.5.1.4.1.1.1", [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
        (SecondaryCaptureImageStorage, [JPEGBaseline8Bit]),  # compressed: as is, only
    ]
    many = [
        send.FileItem(Path(str(i)), f"1.2.3.{i}", str(i), ExplicitVRLittleEndian)
        for i in range(300)
    ]
    parts = list(send.batches(many))
    assert [len(p) for p in parts] == [128, 128, 44]


def test_compressed_sample_is_sent_as_is(scp: Scp, dicom_samples: Path) -> None:
    f = dicom_samples / "chest" / "cr_chest_sc_jpeg_baseline.dcm"
    res = run_cli(str(f), "--to", scp.target)
    assert res.returncode == 0, res.stdout + res.stderr
    assert scp.received[0][1] == JPEGBaseline8Bit


def _make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl)."""
    import shutil

    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    p = {n: d / n for n in ("ca.key", "ca.pem", "srv.key", "srv.pem", "cli.key", "cli.pem")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    (d / "srv.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("srv", ["-extfile", "srv.ext"]), ("cli", [])):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        run(
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
            *ext,
        )
    return p


def test_send_over_tls_with_client_certificate(tmp_path: Path) -> None:
    import ssl

    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, StoragePresentationContexts, evt

    pki = _make_pki(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca.pem"]))
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: the SCU must present a certificate
    ctx.load_cert_chain(pki["srv.pem"], pki["srv.key"])
    got: list[str] = []

    def on_store(event: evt.Event) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        return SUCCESS

    ae = AE(ae_title="TLS_SCP")
    for cx in StoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=ctx,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        f = _write(make_chest_dataset(), tmp_path / "a.dcm")
        target = f"TLS_SCP@127.0.0.1:{port}"
        ok = run_cli(
            str(f),
            "--to",
            target,
            "--tls",
            "--tls-ca",
            str(pki["ca.pem"]),
            "--tls-cert",
            str(pki["cli.pem"]),
            "--tls-key",
            str(pki["cli.key"]),
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert len(got) == 1
        # without a client certificate the server refuses the TLS handshake
        no_cert = run_cli(
            str(f), "--to", target, "--tls", "--tls-ca", str(pki["ca.pem"]), "--timeout", "5"
        )
        assert no_cert.returncode == 1 and "Failure" in no_cert.stdout
        # a server certificate not signed by the CA we trust is refused
        untrusted = run_cli(
            str(f),
            "--to",
            target,
            "--tls",
            "--tls-cert",
            str(pki["cli.pem"]),
            "--tls-key",
            str(pki["cli.key"]),
            "--timeout",
            "5",
        )
        assert untrusted.returncode == 1
        assert len(got) == 1
        # a bad key file is a usage error
        assert run_cli(str(f), "--to", target, "--tls", "--tls-cert", str(f)).returncode == 2
    finally:
        server.shutdown()
