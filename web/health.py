"""Health of the parts the console shows: audit DB, broker, DICOM node, workers, model.

Each check has a short timeout and the report is cached for a few seconds, so a page
refresh never waits long on a part that is down.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cxr.settings import Settings

log = logging.getLogger(__name__)

CACHE_S = 5.0


@dataclass
class Check:
    ok: bool | None  # None: cannot be told (e.g. workers behind the embedded broker)
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}

    def public(self) -> dict[str, Any]:
        """For the endpoint without login: the verdict, no hosts, paths or errors."""
        return {"ok": self.ok}


def node_host(settings: Settings) -> str:
    """Where the console reaches the node: CXR_WEB_NODE_HOST, else CXR_DICOM_HOST (a
    wildcard address meaning this host)."""
    host = settings.web_node_host or settings.dicom_host
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def check_database(settings: Settings) -> Check:
    from db.session import ping

    try:
        ping(settings.database_url)
        return Check(True, "answers")
    except Exception as exc:
        return Check(False, f"unreachable ({type(exc).__name__})")


def check_broker(settings: Settings) -> Check:
    url = settings.effective_broker_url
    if url.startswith("sqla+"):
        return Check(True, "embedded (SQLite file)")
    from kombu.connection import Connection

    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return Check(True, "answers")
    except Exception as exc:
        return Check(False, f"unreachable ({type(exc).__name__})")


def check_node(settings: Settings, echo: bool = False) -> Check:
    """A TCP connection to the node's port; with ``echo`` also a C-ECHO (the dashboard:
    an association the node records in its audit trail, so not on every health poll)."""
    host, port = node_host(settings), settings.dicom_port
    try:
        with socket.create_connection((host, port), 1.0):
            pass
    except OSError:
        return Check(False, f"not listening on {host}:{port}")
    if not echo or settings.tls_enabled:
        return Check(True, f"listening on {host}:{port}")
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="CXR_WEB")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 3
    ae.connection_timeout = 2
    assoc = ae.associate(host, port, ae_title=settings.ae_title)
    if not assoc.is_established:
        return Check(
            False,
            f"association refused on {host}:{port} (calling AE CXR_WEB not allowed?)",
        )
    try:
        status = assoc.send_c_echo()
        ok = bool(status) and status.Status == 0
    finally:
        assoc.release()
    return Check(ok, "C-ECHO success" if ok else "C-ECHO failed")


def check_workers(settings: Settings) -> Check:
    if settings.web_workers_health_url:
        return _workers_from_healthz(settings.web_workers_health_url)
    url = settings.effective_broker_url
    if url.startswith("sqla+"):
        return Check(None, "not visible through the embedded broker (see queue depth)")
    from cxr.celery_app import get_app

    try:
        replies = get_app(settings).control.ping(timeout=1.0) or []
    except Exception as exc:
        return Check(False, f"ping failed ({type(exc).__name__})")
    n = len(replies)
    return Check(n > 0, f"{n} worker(s) answered")


def _workers_from_healthz(url: str) -> Check:
    """The 'workers' check of a supervisor's /healthz (``cxr run``)."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - our own setting
            body = json.loads(r.read())
    except urllib.error.HTTPError as exc:  # 503: unhealthy, body still says what
        body = json.loads(exc.read() or b"{}")
    except (OSError, ValueError) as exc:
        return Check(False, f"supervisor health unreachable ({type(exc).__name__})")
    ok = body.get("checks", {}).get("workers")
    if ok is None:
        return Check(None, "the supervisor reports no workers check")
    return Check(bool(ok), "all worker processes up (cxr run)" if ok else "a worker is down")


class HealthReport:
    """Cached report of all checks (plus the web process's own model). One refresh runs
    at a time; callers meanwhile get the previous report (single flight)."""

    def __init__(self, settings: Settings, model_state: Any = None) -> None:
        self.settings = settings
        self.model_state = model_state
        self._lock = threading.Lock()
        self._refresh = threading.Lock()
        self._at: dict[bool, float] = {}
        self._cached: dict[bool, dict[str, Check]] = {}

    def _model(self) -> Check | None:
        if self.model_state is None:
            return None
        state, error = self.model_state()
        return Check({"loaded": True, "loading": None}.get(state, False), error or state)

    def checks(self, echo: bool = False) -> dict[str, Check]:
        with self._lock:
            fresh = time.monotonic() - self._at.get(echo, 0.0) < CACHE_S
            cached = self._cached.get(echo)
        if not (fresh and cached) and self._refresh.acquire(blocking=cached is None):
            try:
                out = {
                    "database": check_database(self.settings),
                    "broker": check_broker(self.settings),
                    "node": check_node(self.settings, echo=echo),
                    "workers": check_workers(self.settings),
                }
                with self._lock:
                    self._cached[echo], self._at[echo] = out, time.monotonic()
                    cached = out
            finally:
                self._refresh.release()
        with self._lock:
            cached = self._cached.get(echo, cached or {})
        result = dict(cached)
        model = self._model()  # always current: it changes while the model loads
        if model is not None:
            result["model"] = model
        return result

    def summary(self, echo: bool = False) -> tuple[str, dict[str, Check]]:
        """('ok' | 'degraded' | 'fail', checks): fail when the audit DB is down (nothing
        can be recorded), degraded when any other part is."""
        checks = self.checks(echo=echo)
        if checks["database"].ok is False:
            return "fail", checks
        if any(c.ok is False for c in checks.values()):
            return "degraded", checks
        return "ok", checks
