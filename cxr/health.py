"""A tiny HTTP endpoint: ``/metrics`` (Prometheus text format) and ``/healthz`` (JSON)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

_checks: dict[str, Callable[[], bool]] = {}


def register_health_check(name: str, check: Callable[[], bool]) -> None:
    """Add a named check to /healthz (e.g. 'database', 'broker', 'scp')."""
    _checks[name] = check


def unregister_health_check(name: str) -> None:
    """Remove a named check (e.g. when an embedded component stops)."""
    _checks.pop(name, None)


def health_report() -> tuple[bool, dict[str, bool]]:
    results: dict[str, bool] = {}
    for name, check in list(_checks.items()):
        try:
            results[name] = bool(check())
        except Exception:
            results[name] = False
    return all(results.values()), results


def _metrics_registry() -> CollectorRegistry:
    """The default registry, or, when ``PROMETHEUS_MULTIPROC_DIR`` is set (a Celery worker
    whose tasks run in forked pool processes), the aggregate of every process's metrics."""
    import os

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return registry


def make_handler(registry: CollectorRegistry | None = None) -> type[BaseHTTPRequestHandler]:
    """The /metrics + /healthz request handler; ``registry`` defaults to this process's
    (or the multi-process aggregate when PROMETHEUS_MULTIPROC_DIR is set)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path.startswith("/metrics"):
                body = generate_latest(registry or _metrics_registry())
                self._send(200, body, CONTENT_TYPE_LATEST)
            elif self.path.startswith("/healthz"):
                ok, checks = health_report()
                body = json.dumps({"status": "ok" if ok else "fail", "checks": checks}).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("http %s", format % args)

    return Handler


def serve_metrics_and_health(
    host: str, port: int, registry: CollectorRegistry | None = None
) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(registry))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics and health on http://%s:%d/metrics", host, server.server_address[1])
    return server
