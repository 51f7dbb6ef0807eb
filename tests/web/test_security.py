"""Login, roles, CSRF, the failed-login limit, the no-default-password rule and the port
fallback of ``cxr web``: a real uvicorn server on loopback (no model needed here)."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from cxr.settings import load_settings
from tests.conftest import free_port
from tests.ship.conftest import clean_env
from web.auth import (
    Credentials,
    LoginLimiter,
    ensure_admin_password,
    hash_password,
    verify_password,
)

PASSWORD = "correct-horse-battery"


class Server:
    def __init__(self, app: object) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))  # type: ignore[arg-type]
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def app_server(tmp_path: Path) -> Iterator[Server]:
    from web.app import create_app

    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'a.db'}",
        spool_dir=tmp_path / "spool",
        web_admin_password=PASSWORD,
        web_viewer_password="viewer-pw-1234",
        web_login_max_failures=3,
        web_login_window_seconds=60,
        dicom_port=free_port(),  # nothing listens: the node check says so
        embedded_broker_path=tmp_path / "broker.sqlite",
    )
    with Server(create_app(settings, warm_up=False)) as srv:
        yield srv


def start_web(cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """``cxr web`` as its own process; its first stdout line says where it serves."""
    return subprocess.Popen(
        [sys.executable, "-m", "apps.cli", "web"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


def _login(c: httpx.Client, user: str, password: str) -> httpx.Response:
    tok = _csrf(c.get("/login").text)
    return c.post(
        "/login",
        data={"username": user, "password": password, "csrf_token": tok, "next": "/worklist"},
    )


def test_password_hash_round_trip() -> None:
    h = hash_password("s3cret")
    assert h.startswith("scrypt$") and "s3cret" not in h
    assert verify_password("s3cret", h)
    assert not verify_password("s3cret!", h)
    assert not verify_password("s3cret", "md5$abc")
    assert hash_password("s3cret") != h  # salted


def test_limiter_window() -> None:
    lim = LoginLimiter(2, 10.0)
    lim.failed("1.2.3.4", "admin", now=0.0)
    assert lim.retry_after("1.2.3.4", "admin", now=1.0) is None
    lim.failed("1.2.3.4", "admin", now=1.0)
    assert lim.retry_after("1.2.3.4", "admin", now=2.0) == pytest.approx(8.0)
    assert lim.retry_after("5.6.7.8", "admin", now=2.0) is None  # another client
    assert lim.retry_after("1.2.3.4", "admin", now=11.5) is None  # window passed


def test_session_login_roles_and_csrf(app_server: Server) -> None:
    with httpx.Client(base_url=app_server.url) as c:
        r = _login(c, "admin", "nope")
        assert r.status_code == 401 and "Wrong user name or password" in r.text
        r = _login(c, "admin", PASSWORD)
        assert r.status_code == 303 and r.headers["location"] == "/worklist"
        cookie = r.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        page = c.get("/worklist")
        assert page.status_code == 200 and "admin (admin)" in page.text
        assert "research use only" in page.text.lower()
        assert "not for diagnostic use" in page.text.lower()
        # a POST without the session's CSRF token is refused
        r = c.post("/instances/1.2.3/retry", data={})
        assert r.status_code == 403 and "CSRF" in r.text
        r = c.post("/instances/1.2.3/retry", data={"csrf_token": "forged"})
        assert r.status_code == 403
        # with it, the request gets through to the audit DB (no such instance)
        tok = _csrf(c.get("/worklist").text)
        r = c.post("/instances/1.2.3/retry", data={"csrf_token": tok})
        assert r.status_code == 404
        # the session also authenticates the API (the pages' own scripts)
        assert c.get("/api/v1/instances").status_code == 200
        assert c.post("/api/v1/instances/1.2.3/retry").status_code == 403  # no token
        r = c.post("/api/v1/instances/1.2.3/retry", headers={"X-CSRF-Token": tok})
        assert r.status_code == 404
        # log out ends the session
        c.post("/logout", data={"csrf_token": tok})
        assert c.get("/worklist").status_code == 303
    with httpx.Client(base_url=app_server.url) as c:
        _login(c, "viewer", "viewer-pw-1234")
        tok = _csrf(c.get("/worklist").text)
        r = c.post("/instances/1.2.3/retry", data={"csrf_token": tok})
        assert r.status_code == 403 and "admin role" in r.text


def test_open_redirect_after_login_is_refused(app_server: Server) -> None:
    with httpx.Client(base_url=app_server.url) as c:
        tok = _csrf(c.get("/login").text)
        for target in ("https://evil.example/", "//evil.example/x", "javascript:alert(1)"):
            r = c.post(
                "/login",
                data={"username": "admin", "password": PASSWORD, "csrf_token": tok, "next": target},
            )
            assert r.status_code == 303 and r.headers["location"] == "/", target
            tok = _csrf(c.get("/login").text)


def test_failed_logins_are_limited_and_logged_without_the_password(
    app_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="web.auth")
    secret_guess = "Guess-7781-XYZ"
    with httpx.Client(base_url=app_server.url) as c:
        for _ in range(3):
            assert c.get("/api/v1/stats", auth=("admin", secret_guess)).status_code == 401
        r = c.get("/api/v1/stats", auth=("admin", secret_guess))
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        # the right password is refused too while the limit holds (no guessing through it)
        assert c.get("/api/v1/stats", auth=("admin", PASSWORD)).status_code == 429
        # the login form is limited for the same client and user
        r = _login(c, "admin", PASSWORD)
        assert r.status_code == 429 and "Too many failed logins" in r.text
        # another user name is not locked out by it
        assert c.get("/api/v1/stats", auth=("viewer", "viewer-pw-1234")).status_code == 200
        # health needs no login and is not limited
        assert c.get("/api/v1/health").status_code == 200
    assert "web login failed for user 'admin' from 127.0.0.1" in caplog.text
    assert secret_guess not in caplog.text and PASSWORD not in caplog.text


def test_health_reports_a_down_node(app_server: Server) -> None:
    body = httpx.get(app_server.url + "/api/v1/health").json()
    assert body["status"] == "degraded"
    assert body["checks"]["node"]["ok"] is False
    assert body["checks"]["database"]["ok"] is True


def test_security_headers(app_server: Server) -> None:
    r = httpx.get(app_server.url + "/login")
    assert r.headers["x-frame-options"] == "DENY"
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"


def test_cxr_web_refuses_to_start_without_a_password(tmp_path: Path) -> None:
    env = clean_env(CXR_DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}", CXR_WEB_PORT="0")
    res = subprocess.run(
        [sys.executable, "-m", "apps.cli", "web"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "refusing to start" in res.stderr and "CXR_WEB_ADMIN_PASSWORD" in res.stderr
    assert "cxr run" in res.stderr  # and says how to get one


def test_cxr_run_generates_the_password_once_and_keeps_only_its_hash(tmp_path: Path) -> None:
    s = load_settings(web_admin_password_file=tmp_path / "var" / "web-admin.scrypt")
    pw = ensure_admin_password(s)
    assert pw and len(pw) >= 16
    stored = (tmp_path / "var" / "web-admin.scrypt").read_text()
    assert pw not in stored and stored.startswith("scrypt$")
    assert (tmp_path / "var" / "web-admin.scrypt").stat().st_mode & 0o077 == 0
    assert ensure_admin_password(s) is None  # not again: the hash is there
    assert Credentials.from_settings(s).check("admin", pw) is not None
    assert Credentials.from_settings(s).check("admin", pw + "x") is None


def test_cxr_web_serves_and_moves_off_a_taken_port(tmp_path: Path) -> None:
    """Two processes with the same default port do not fight: the second one says where
    it went, and both answer."""
    env = clean_env(
        CXR_DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}",
        CXR_WEB_ADMIN_PASSWORD=PASSWORD,
        CXR_DICOM_PORT=str(free_port()),
        CXR_EMBEDDED_BROKER_PATH=str(tmp_path / "b.sqlite"),
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env["CXR_WEB_PORT"] = str(busy.getsockname()[1])
        proc = start_web(tmp_path, env)
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            m = re.search(r"serving on (http://127\.0\.0\.1:(\d+))/", line)
            assert m, line + (proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
            assert int(m.group(2)) != busy.getsockname()[1]
            assert "not for diagnostic use" in line.lower()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(m.group(1) + "/api/v1/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.3)
            else:
                raise AssertionError("cxr web did not answer")
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
    assert "is in use" in err and "CXR_WEB_PORT" in err


def test_limiter_counts_a_client_over_all_user_names() -> None:
    lim = LoginLimiter(2, 10.0)
    for i in range(2 * LoginLimiter.CLIENT_FACTOR):
        lim.failed("9.9.9.9", f"name{i}", now=0.0)
    assert lim.retry_after("9.9.9.9", "a-new-name", now=1.0) is not None
    assert lim.retry_after("8.8.8.8", "a-new-name", now=1.0) is None


def test_a_copied_session_cookie_is_dead_after_logout(app_server: Server) -> None:
    with httpx.Client(base_url=app_server.url) as c:
        _login(c, "admin", PASSWORD)
        cookie = c.cookies.get("cxr_session")
        assert cookie and c.get("/worklist").status_code == 200
        tok = _csrf(c.get("/worklist").text)
        c.post("/logout", data={"csrf_token": tok})
    with httpx.Client(base_url=app_server.url, cookies={"cxr_session": cookie}) as thief:
        assert thief.get("/worklist").status_code == 303
        assert thief.get("/api/v1/instances").status_code == 401


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"web_admin_password": "short"}, "shorter than 8"),
        ({"web_admin_password": None, "plain_file": "my-password"}, "holds no scrypt hash"),
        ({"web_admin_password": PASSWORD, "web_secret_key": "too-short"}, "at least 32"),
    ],
)
def test_weak_or_broken_credentials_are_refused(
    tmp_path: Path, overrides: dict[str, object], words: str
) -> None:
    from web.auth import NoPasswordError

    pw_file = tmp_path / "web-admin.scrypt"
    plain = overrides.pop("plain_file", None)
    if plain:
        pw_file.write_text(str(plain))
    s = load_settings(web_admin_password_file=pw_file, **overrides)
    with pytest.raises(NoPasswordError, match=words):
        Credentials.from_settings(s)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    c, k = tmp_path / "web.crt", tmp_path / "web.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return c, k


def test_cxr_web_over_tls_sets_secure_cookies_and_hsts(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    env = clean_env(
        CXR_DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}",
        CXR_WEB_ADMIN_PASSWORD=PASSWORD,
        CXR_WEB_PORT=str(port),
        CXR_WEB_TLS_CERT=str(cert),
        CXR_WEB_TLS_KEY=str(key),
        CXR_DICOM_PORT=str(free_port()),
        CXR_EMBEDDED_BROKER_PATH=str(tmp_path / "b.sqlite"),
    )
    proc = start_web(tmp_path, env)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert f"serving on https://127.0.0.1:{port}/" in line, line
        base = f"https://127.0.0.1:{port}"
        with httpx.Client(base_url=base, verify=str(cert), timeout=10) as c:
            deadline = time.monotonic() + 30
            while True:
                try:
                    r = c.get("/login")
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.3)
            assert r.headers["strict-transport-security"].startswith("max-age=")
            tok = _csrf(r.text)
            r = c.post(
                "/login", data={"username": "admin", "password": PASSWORD, "csrf_token": tok}
            )
            assert r.status_code == 303
            assert "secure" in r.headers["set-cookie"].lower()
            assert c.get("/api/v1/stats", auth=("admin", PASSWORD)).status_code == 200
        # plain HTTP on that port gets no console
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/login", timeout=5)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
