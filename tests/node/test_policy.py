"""Association policy, TLS, limits, and the ``cxr node`` command."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from db.models import State
from dicom_node.status import (
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from tests.conftest import free_port, make_chest_dataset
from tests.node.conftest import associations, echo, instances, scu_send, wait_for


def test_calling_ae_allow_list_with_ip(node_factory, db_url):
    node = node_factory(db_url, allowed_calling_aets="PACS@127.0.0.1,OTHER@10.9.9.9")
    assert echo(node.address, calling="PACS") == SUCCESS
    assert echo(node.address, calling="INTRUDER") is None
    assert echo(node.address, calling="OTHER") is None  # right AE, wrong source address
    rows = associations(db_url)
    assert [r.outcome for r in rows] == ["released", "rejected", "rejected"]
    assert "INTRUDER" in rows[1].reason and "not allowed" in rows[1].reason
    assert rows[2].calling_ae == "OTHER" and rows[2].peer_host == "127.0.0.1"


def test_called_ae_checked(node_factory, sqlite_url):
    node = node_factory(sqlite_url)
    assert echo(node.address, called="WRONG_AE") is None
    (row,) = associations(sqlite_url)
    assert row.outcome == "rejected" and "called AE" in row.reason


def test_max_associations(node_factory, sqlite_url):
    node = node_factory(sqlite_url, max_associations=1)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    first = ae.associate(*node.address, ae_title="CXR_WORKER")
    assert first.is_established
    try:
        assert echo(node.address) is None  # the second one is refused (local limit)
    finally:
        first.release()
    assert echo(node.address) == SUCCESS
    reasons = [r.reason or "" for r in associations(sqlite_url)]
    assert any("too many associations" in r for r in reasons)


def test_instance_size_limit(node_factory, sqlite_url):
    node = node_factory(sqlite_url, max_instance_bytes=4096)
    res = scu_send(node.address, [make_chest_dataset(rows=128, cols=128)])
    assert res.statuses == [OUT_OF_RESOURCES]
    (row,) = instances(sqlite_url)
    assert row.state == State.FAILED.value and "CXR_MAX_INSTANCE_BYTES" in row.reason
    assert echo(node.address) == SUCCESS


def test_decompression_bomb_and_empty_pixels_refused(node_factory, db_url):
    node = node_factory(db_url, max_pixels=1_000_000)
    bomb = make_chest_dataset(seed=30)
    bomb.Rows, bomb.Columns = 60000, 60000  # claims 3.6e9 pixels, carries 8 KiB
    empty = make_chest_dataset(seed=31)
    empty.PixelData = b""
    short = make_chest_dataset(seed=32)
    short.PixelData = short.PixelData[:100]
    res = scu_send(node.address, [bomb, empty, short])
    assert res.statuses == [
        OUT_OF_RESOURCES,
        DATASET_DOES_NOT_MATCH_SOP_CLASS,
        DATASET_DOES_NOT_MATCH_SOP_CLASS,
    ]
    rows = instances(db_url)
    assert [r.state for r in rows] == [State.FAILED.value] * 3
    assert "CXR_MAX_PIXELS" in rows[0].reason and "0xA700" in rows[0].reason
    assert "empty pixel data" in rows[1].reason and "0xA900" in rows[1].reason
    assert "expected" in rows[2].reason
    assert not list((node.spool.root / "incoming").rglob("*.dcm"))
    assert associations(db_url)[-1].n_refused == 3
    assert echo(node.address) == SUCCESS


def _make_ca(tmp: Path) -> dict[str, Path]:
    """A self-signed CA, a server and a client certificate (cryptography package)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test CA"))
        .issuer_name(name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": tmp / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    import ipaddress

    for who in ("server", "client"):
        k = key()
        b = (
            x509.CertificateBuilder()
            .subject_name(name(who))
            .issuer_name(ca.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if who == "server":
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = b.sign(ca_key, hashes.SHA256())
        out[f"{who}_cert"] = tmp / f"{who}.pem"
        out[f"{who}_key"] = tmp / f"{who}.key"
        out[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"].write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return out


def test_tls_association(node_factory, sqlite_url, tmp_path):
    pki = _make_ca(tmp_path)
    node = node_factory(
        sqlite_url, tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_ca=pki["ca"]
    )
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    res = scu_send(
        node.address, [make_chest_dataset(seed=40)], ssl_context=ctx, tls_hostname="localhost"
    )
    assert res.statuses == [SUCCESS]
    (row,) = associations(sqlite_url)
    assert row.tls is True and row.n_stored == 1
    # a client without a certificate signed by the CA cannot associate
    bare = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    res = scu_send(
        node.address, [make_chest_dataset(seed=41)], ssl_context=bare, tls_hostname="localhost"
    )
    assert not res.established
    # nor can a plain-TCP client
    assert echo(node.address) is None
    assert len(instances(sqlite_url)) == 1

    # each failed handshake has an audit row with its reason (issue 9: there was none)
    def rejected() -> list:
        return [a for a in associations(sqlite_url, settle=0.5) if a.outcome == "rejected"]

    wait_for(lambda: len(rejected()) >= 2, timeout=15)
    failed = rejected()
    assert len(failed) >= 2 and all(a.reason.startswith("TLS handshake failed") for a in failed), [
        (a.reason, a.calling_ae) for a in associations(sqlite_url)
    ]
    assert all(a.tls and a.peer_host == "127.0.0.1" for a in failed)


def _run_cli(env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "apps.cli", "node"],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _cli_env(tmp_path: Path, port: int, node_redis: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        {
            "CXR_DICOM_HOST": "127.0.0.1",
            "CXR_DICOM_PORT": str(port),
            "CXR_SPOOL_DIR": str(tmp_path / "spool"),
            "CXR_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
            "CXR_BROKER_URL": node_redis,
            "CXR_METRICS_PORT": "0",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        }
    )
    env.update(extra)
    return env


def test_cli_sigterm_lets_association_finish(tmp_path, node_redis):
    port = free_port()
    proc = _run_cli(_cli_env(tmp_path, port, node_redis), tmp_path)
    out = ""
    try:
        assert wait_for(lambda: echo(("127.0.0.1", port)) == SUCCESS, timeout=60)
        ae = AE(ae_title="PACS")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_WORKER")
        assert assoc.is_established
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # the association in flight still works after SIGTERM
        assert assoc.send_c_store(make_chest_dataset(seed=50)).Status == SUCCESS
        assoc.release()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"listening on CXR_WORKER@127.0.0.1:{port}" in out
    assert "CXR_ALLOWED_CALLING_AETS is empty" in out
    rows = instances(f"sqlite:///{tmp_path / 'cli.db'}")
    assert len(rows) == 1 and rows[0].state in (State.QUEUED.value, State.RECEIVED.value)
    assert echo(("127.0.0.1", port)) is None  # no longer listening


def test_cli_invalid_setting_one_line(tmp_path, node_redis):
    env = _cli_env(tmp_path, free_port(), node_redis, CXR_DICOM_PORT="99999")
    r = subprocess.run(
        [sys.executable, "-m", "apps.cli", "node"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "CXR_DICOM_PORT" in lines[0]


def test_stop_waits_for_in_flight(node_factory, sqlite_url):
    node = node_factory(sqlite_url)
    ae = AE(ae_title="PACS")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate(*node.address, ae_title="CXR_WORKER")
    assert assoc.is_established
    stopper = threading.Thread(target=node.stop, kwargs={"timeout": 20})
    stopper.start()
    time.sleep(0.3)
    assert stopper.is_alive()  # waiting for our association
    assert assoc.send_c_store(make_chest_dataset(seed=51)).Status == SUCCESS
    assoc.release()
    stopper.join(20)
    assert not stopper.is_alive()
    assert len(instances(sqlite_url)) == 1


@pytest.mark.parametrize("var,value", [("CXR_AE_TITLE", "A\\B"), ("CXR_MAX_ASSOCIATIONS", "0")])
def test_settings_errors_name_the_variable(var, value, monkeypatch, workdir):
    from cxr.settings import SettingsError, load_settings

    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=var):
        load_settings()


def test_idle_connections_do_not_lock_peers_out(node_factory, sqlite_url):
    """Issue 9, defect 6: 150 idle TCP connections (no A-ASSOCIATE-RQ) used to block every
    association until they closed. Real peers still associate, and the idle connections
    are closed after CXR_REQUEST_TIMEOUT."""
    import socket

    node = node_factory(sqlite_url, request_timeout=2.0, acse_timeout=30, max_associations=5)
    idle = [socket.create_connection(node.address, timeout=10) for _ in range(150)]
    try:
        t0 = time.monotonic()
        assert echo(node.address) == SUCCESS
        res = scu_send(node.address, [make_chest_dataset(seed=60)])
        assert res.statuses == [SUCCESS]
        assert time.monotonic() - t0 < 10
        time.sleep(3.0)  # past the request timeout: the node has closed them
        closed = 0
        for s in idle:
            try:
                s.settimeout(2)
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(idle)
    finally:
        for s in idle:
            s.close()


def test_rejections_are_a_associate_rj_for_dcmtk(node_factory, sqlite_url):
    """Issue 9, defect 7: an unknown calling AE, a wrong called AE and the association
    limit reach the peer as A-ASSOCIATE-RJ with the documented reason (DCMTK's echoscu as
    the third-party peer), not as an abort."""
    from tests.conftest import dcmtk

    echoscu = dcmtk("echoscu")
    node = node_factory(sqlite_url, allowed_calling_aets="GOOD", max_associations=1)
    host, port = node.address

    def run(aet: str, aec: str) -> str:
        r = subprocess.run(
            [echoscu, "-v", "-aet", aet, "-aec", aec, host, str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return r.stdout + r.stderr

    out = run("BAD", "CXR_WORKER")
    assert "Rejected Permanent" in out and "Calling AE Title Not Recognized" in out, out
    out = run("GOOD", "WRONG")
    assert "Rejected Permanent" in out and "Called AE Title Not Recognized" in out, out
    ae = AE(ae_title="GOOD")
    ae.add_requested_context(Verification)
    held = ae.associate(host, port, ae_title="CXR_WORKER")
    assert held.is_established
    try:
        out = run("GOOD", "CXR_WORKER")
        assert "Rejected Transient" in out and "Local Limit Exceeded" in out, out
    finally:
        held.release()
    assert "aborted" not in run("GOOD", "CXR_WORKER").lower()
    outcomes = [a.outcome for a in associations(sqlite_url)]
    assert outcomes.count("rejected") == 3


def test_scu_names_refused_connection_and_rejection(node_factory, sqlite_url):
    """Issue 9, smaller defect: the SCU said "association aborted" when the connection
    was refused. It now tells a refused connection from a rejection."""
    from cxr.scu import store_each

    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    ds = make_chest_dataset(seed=61)
    ((_, res),) = store_each(ae, "127.0.0.1", free_port(), "CXR_WORKER", [ds], lambda d: d)
    assert res.kind == "unreachable" and res.comment == "no connection (refused or unreachable)"
    node = node_factory(sqlite_url, allowed_calling_aets="OTHER")
    ((_, res),) = store_each(ae, *node.address, "CXR_WORKER", [ds], lambda d: d)
    assert res.kind == "unreachable" and res.comment == "association rejected"
