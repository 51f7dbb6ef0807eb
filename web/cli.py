"""``cxr web``: serve the web console and HTTP API (uvicorn).

It refuses to start without an admin password (``CXR_WEB_ADMIN_PASSWORD`` or the hash
file that ``cxr run`` or ``cxr web --set-password`` writes) and says how to set one.
When ``CXR_WEB_PORT`` is taken (another process on the host), it serves on a free port
and says so.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        name,
        help="serve the web console and HTTP API",
        description=(
            "Serve the web console (Try it, Worklist, Instance, Dashboard, Model) and the "
            "REST API under /api/v1 (OpenAPI page at /docs) on CXR_WEB_HOST:CXR_WEB_PORT. "
            "Needs CXR_WEB_ADMIN_PASSWORD or a password hash file "
            "(CXR_WEB_ADMIN_PASSWORD_FILE). Research use only, not for diagnostic use."
        ),
    )
    p.add_argument(
        "--set-password",
        action="store_true",
        help="prompt for the admin password, write its hash to CXR_WEB_ADMIN_PASSWORD_FILE, exit",
    )
    p.set_defaults(func=main)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or on a free port when that one is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def make(p: int) -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit it: without, Nagle + delayed ACK add ~40 ms to
        # every response written in two parts (docs/benchmarks.md, web console)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            s.bind((host, p))
        except OSError:
            s.close()
            raise
        s.listen(128)
        s.set_inheritable(True)
        return s

    try:
        return make(port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or port == 0:
            raise
    s = make(0)
    log.warning(
        "web port %s:%d is in use (another process?); the console is on port %d instead "
        "(set CXR_WEB_PORT to choose one)",
        host,
        port,
        s.getsockname()[1],
    )
    return s


def _set_password(settings: Any) -> int:
    import getpass
    from pathlib import Path

    from web.auth import write_password_file

    pw = getpass.getpass("new admin password: ")
    if len(pw) < 8:
        print("cxr web: the password needs at least 8 characters", file=sys.stderr)
        return 1
    if pw != getpass.getpass("again: "):
        print("cxr web: the passwords differ", file=sys.stderr)
        return 1
    write_password_file(Path(settings.web_admin_password_file), pw)
    print(f"cxr web: admin password hash written to {settings.web_admin_password_file}")
    return 0


def main(args: argparse.Namespace) -> int:
    from cxr import DISCLAIMER
    from cxr.logconfig import configure_logging
    from cxr.settings import load_settings
    from web.auth import Credentials, NoPasswordError

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_json)
    if args.set_password:
        return _set_password(settings)
    try:
        creds = Credentials.from_settings(settings)
    except NoPasswordError as exc:
        print(f"cxr web: refusing to start: {exc}", file=sys.stderr)
        return 2
    try:
        inherited = os.environ.get("CXR_WEB_LISTEN_FD")  # internal: set by `cxr run`
        if inherited:
            sock = socket.socket(fileno=int(inherited))
        else:
            sock = bind_socket(settings.web_host, settings.web_port)
    except OSError as exc:
        print(
            f"cxr web: cannot listen on {settings.web_host}:{settings.web_port} "
            f"(CXR_WEB_HOST/CXR_WEB_PORT): {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    from web.app import create_app

    app = create_app(settings, credentials=creds)
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    scheme = "https" if settings.web_tls_cert is not None else "http"
    print(f"cxr web: serving on {scheme}://{shown}:{port}/ ({DISCLAIMER})", flush=True)
    tls: dict[str, Any] = {}
    if settings.web_tls_cert is not None:
        tls = {"ssl_certfile": str(settings.web_tls_cert), "ssl_keyfile": str(settings.web_tls_key)}
    config = uvicorn.Config(
        app,
        log_config=None,  # our logging (cxr.logconfig), no access log with client URLs
        access_log=False,
        # client addresses (failed-login limit, logs) from X-Forwarded-For only when the
        # request comes from the hospital's reverse proxy (CXR_WEB_FORWARDED_ALLOW_IPS)
        proxy_headers=bool(settings.web_forwarded_allow_ips),
        forwarded_allow_ips=settings.web_forwarded_allow_ips or None,
        server_header=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=5,
        limit_concurrency=64,  # beyond it: 503 at once, not a pile-up of threads
        h11_max_incomplete_event_size=64 * 1024,  # headers
        **tls,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0
