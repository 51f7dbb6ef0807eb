"""``cxr run``: the whole pipeline on one machine, supervised.

Starts the DICOM node (``cxr node``) and N workers (``cxr worker``) as child processes,
restarts a child that dies (with exponential back-off and a log line), serves one
``/metrics`` + ``/healthz`` endpoint for all of them (Prometheus multi-process mode), and
prints one status line per instance that reaches a final state (polled from the audit DB).

On SIGTERM/SIGINT it forwards SIGTERM to every child: the node stops accepting and finishes
the associations in flight, each worker finishes the tasks it holds (Celery warm shutdown),
and ``cxr run`` exits 0. Children whose shutdown exceeds ``--grace`` seconds are killed
(exit 1).

With no configuration at all it runs on the embedded defaults: SQLite audit DB and the
embedded SQLite broker under ``./var``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cxr.settings import Settings

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h: signal sent to the child when its parent dies
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0  # a child that ran this long gets its back-off reset
STATUS_POLL_S = 0.5
SPOOL_CLEANUP_EVERY_S = 3600.0


# ----------------------------------------------------------------------------- children
def pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a child get SIGTERM when its parent dies (Linux only):
    used for ``cxr run``'s children and for ``cxr worker``'s model warm-up process."""
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    prctl = libc.prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return preexec


@dataclass
class Child:
    """One supervised process (``cxr node`` or one ``cxr worker``)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_START_S
    restart_at: float | None = None
    pids: list[int] = field(default_factory=list)
    pass_fds: tuple[int, ...] = ()  # e.g. the web console's listening socket

    def start(self, preexec: Callable[[], None] | None) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - our own executable and arguments
            self.argv,
            env=self.env,
            start_new_session=True,  # terminal Ctrl-C reaches only us; we forward SIGTERM
            preexec_fn=preexec,
            pass_fds=self.pass_fds,
        )
        self.started_at = time.monotonic()
        self.restart_at = None
        self.pids.append(self.proc.pid)
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive and self.proc is not None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass


def child_argv(command: str, extra: list[str] | None = None) -> list[str]:
    """``python -m apps.cli <command>``: the same interpreter and code as ``cxr run``."""
    return [sys.executable, "-m", "apps.cli", command, *(extra or [])]


# ----------------------------------------------------------------------------- metrics
QUEUE_DEPTH_METRIC = "cxr_queue_depth"


class _ChildrenCollector:
    """Every child's metrics (Prometheus multi-process files), except the queue depth,
    which this process computes from the audit DB (one series, not one per process)."""

    def __init__(self, path: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self._inner = MultiProcessCollector(None, path=path)

    def collect(self) -> Iterator[Any]:
        for fam in self._inner.collect():
            if fam.name != QUEUE_DEPTH_METRIC:
                yield fam


def _multiproc_registry(path: str) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(_ChildrenCollector(path))
    return registry


class _SupervisorCollector:
    """Supervisor-level series: child restarts/liveness and audit rows by state."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        restarts = CounterMetricFamily(
            "cxr_child_restarts", "Restarts of supervised processes", labels=["child"]
        )
        up = GaugeMetricFamily("cxr_child_up", "Supervised process alive (1/0)", labels=["child"])
        for c in self.sup.children:
            restarts.add_metric([c.name], c.restarts)
            up.add_metric([c.name], 1.0 if c.alive else 0.0)
        yield restarts
        yield up
        by_state = GaugeMetricFamily(
            "cxr_audit_instances", "Audit rows by instance state", labels=["state"]
        )
        try:
            counts = self.sup.count_by_state()
        except Exception as exc:  # DB briefly locked/unreachable: omit the series
            log.debug("state count failed: %s", type(exc).__name__)
            return
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state
        yield GaugeMetricFamily(
            QUEUE_DEPTH_METRIC,
            "Instances waiting for a worker (received+queued)",
            value=float(counts.get("received", 0) + counts.get("queued", 0)),
        )


# ----------------------------------------------------------------------------- status lines
def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def format_status(row: Any, inference: Any | None) -> str:
    """One line for an instance in a final state: verdict, probabilities, latency."""
    received = _aware(row.received_at)
    finished = _aware(row.finished_at) or _aware(row.updated_at)
    latency = max(0.0, (finished - received).total_seconds()) if received and finished else None
    parts = [f"[{row.state.upper():<15}]", f"#{row.id}", f"sop={row.sop_instance_uid}"]
    if inference is not None:
        parts.append(f"verdict={inference.verdict}")
        parts.append(
            f"p(COVID)={inference.p_covid:.3f} p(Normal)={inference.p_normal:.3f} "
            f"p(Other)={inference.p_other:.3f}"
        )
    if latency is not None:
        lat = f"latency={latency:.2f}s"
        if inference is not None and inference.t_total_ms is not None:
            lat += f" (worker {inference.t_total_ms / 1000:.2f}s)"
        parts.append(lat)
    if row.reason:
        parts.append(f"reason={row.reason}")
    return " ".join(parts)


class StatusPoller:
    """Finds instances that reached a final state since the last poll (audit DB)."""

    def __init__(self, database_url: str, since: datetime) -> None:
        self.url = database_url
        self.since = since
        self.reported: dict[int, str] = {}

    def poll(self) -> list[str]:
        from db.lifecycle import finished_since

        lines: list[str] = []
        newest = self.since
        for row, inf in finished_since(self.url, self.since):
            upd = _aware(row.updated_at) or newest
            newest = max(newest, upd)
            if self.reported.get(row.id) == row.state:
                continue
            self.reported[row.id] = row.state
            lines.append(format_status(row, inf))
        # keep a small overlap: rows committed with a slightly older timestamp still show
        self.since = max(self.since, newest - timedelta(seconds=5))
        if len(self.reported) > 20000:
            self.reported = dict(list(self.reported.items())[-10000:])
        return lines


# ----------------------------------------------------------------------------- supervisor
class Supervisor:
    def __init__(
        self,
        settings: Settings,
        workers: int = 1,
        grace: float | None = None,
        status: bool = True,
        out: Any = None,
        web: bool = True,
    ) -> None:
        self.settings = settings
        self.n_workers = workers
        self.grace = grace if grace is not None else float(settings.task_time_limit + 15)
        self.show_status = status
        self.out = out or sys.stdout
        self.stop_event = threading.Event()
        self.children: list[Child] = []
        self.metrics_dir: str | None = None
        self.http: ThreadingHTTPServer | None = None
        self._preexec = pdeathsig_preexec()
        self._ready_announced = False
        self._poller: StatusPoller | None = None
        self.web = web
        self.web_port: int | None = None
        self.web_socket: socket.socket | None = None  # bound here, served by the web child

    # -- helpers
    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    @property
    def connect_host(self) -> str:
        host = self.settings.dicom_host
        return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host

    def node_listening(self) -> bool:
        try:
            with socket.create_connection((self.connect_host, self.settings.dicom_port), 1.0):
                return True
        except OSError:
            return False

    def count_by_state(self) -> dict[str, int]:
        from db.lifecycle import count_by_state

        return count_by_state(self.settings.database_url)

    def db_ok(self) -> bool:
        from db.session import ping

        return ping(self.settings.database_url)

    # -- set-up
    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["CXR_METRICS_PORT"] = "0"  # one endpoint for all: served here, multi-process
        if self.metrics_dir:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        return env

    def build_children(self) -> None:
        env = self._child_env()
        self.children = [Child("node", child_argv("node"), env)]
        for i in range(1, self.n_workers + 1):
            # the node owns the re-queue sweep (db.lifecycle.sweep): no worker runs it
            self.children.append(Child(f"worker-{i}", child_argv("worker"), env))
        if self.web:
            web_env = dict(env, CXR_WEB_PORT=str(self.web_port or self.settings.web_port))
            if self.settings.metrics_port:
                # the console shows the workers' health as this supervisor sees it (the
                # embedded broker cannot ping them)
                host = self.settings.metrics_host
                host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
                web_env["CXR_WEB_WORKERS_HEALTH_URL"] = (
                    f"http://{host}:{self.settings.metrics_port}/healthz"
                )
            fds: tuple[int, ...] = ()
            if self.web_socket is not None:
                # the child serves the socket bound here: the printed URL is always right,
                # also across restarts of the child
                web_env["CXR_WEB_LISTEN_FD"] = str(self.web_socket.fileno())
                fds = (self.web_socket.fileno(),)
            self.children.append(Child("web", child_argv("web"), web_env, pass_fds=fds))

    def start_metrics(self) -> None:
        port = self.settings.metrics_port
        if not port:
            return
        from cxr.health import register_health_check, serve_metrics_and_health

        registry = _multiproc_registry(self.metrics_dir or "")
        registry.register(_SupervisorCollector(self))
        register_health_check("database", self.db_ok)
        register_health_check("node", lambda: self.children[0].alive and self.node_listening())
        register_health_check(
            "workers", lambda: all(c.alive for c in self.children if c.name.startswith("worker"))
        )
        if self.web:
            register_health_check(
                "web", lambda: all(c.alive for c in self.children if c.name == "web")
            )
        self.http = serve_metrics_and_health(self.settings.metrics_host, port, registry)

    def install_signals(self) -> None:
        def handler(signum: int, _frame: object) -> None:
            if not self.stop_event.is_set():
                log.info("received %s: shutting down", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def announce(self) -> None:
        s = self.settings
        host = self.connect_host
        metrics = (
            f"http://{s.metrics_host}:{s.metrics_port}/metrics (health: /healthz)"
            if s.metrics_port
            else "off (CXR_METRICS_PORT=0)"
        )
        dests = ", ".join(str(d) for d in s.delivery_destinations) or (
            "none (CXR_DESTINATIONS and CXR_HL7_DESTINATIONS unset)"
        )
        self.say(
            "\n".join(
                [
                    f"cxr run: ready. {self._disclaimer()}",
                    f"  DICOM Storage SCP : AE title {s.ae_title} on {s.dicom_host}:{s.dicom_port}",
                    f"  workers           : {self.n_workers}",
                    f"  audit database    : {_safe_url(s.database_url)}",
                    f"  broker            : {_safe_url(s.effective_broker_url)}",
                    f"  results go to     : {dests}",
                    f"  metrics           : {metrics}",
                    "  push a study      :",
                    f"    cxr send FILE_OR_DIR --to {s.ae_title}@{host}:{s.dicom_port}",
                    f"    dcmsend {host} {s.dicom_port} -aec {s.ae_title} FILE",
                    "  demo images       : cxr demo ./demo-images   (then cxr send ./demo-images ...)",
                    *self._web_lines(),
                    "  audit trail       : cxr audit --help",
                    "  stop              : Ctrl-C or SIGTERM (finishes work in flight)",
                ]
            )
        )

    def _web_lines(self) -> list[str]:
        if not self.web:
            return ["  web console       : off (--no-web)"]
        host = self.settings.web_host
        shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        return [f"  web console       : http://{shown}:{self.web_port}/  (user admin)"]

    def prepare_web(self) -> str | None:
        """Bind the console's socket (on a free port when CXR_WEB_PORT is taken; the web
        child inherits it) and make sure an admin password exists: one is generated when
        none is set, printed at once (only its hash is kept) and never again."""
        if not self.web:
            return None
        from web.auth import NoPasswordError, check_credentials_config, ensure_admin_password
        from web.cli import bind_socket

        s = self.settings
        try:
            password = ensure_admin_password(s)
        except OSError as exc:
            return (
                f"cannot write {s.web_admin_password_file} (CXR_WEB_ADMIN_PASSWORD_FILE): "
                f"{exc.strerror}"
            )
        try:
            check_credentials_config(s)
        except NoPasswordError as exc:
            return f"web console: {exc}"
        try:
            self.web_socket = bind_socket(s.web_host, s.web_port)
        except OSError as exc:
            return f"cannot listen on {s.web_host}:{s.web_port} (CXR_WEB_PORT): {exc.strerror}"
        self.web_port = int(self.web_socket.getsockname()[1])
        if password:
            self.say(
                f"cxr run: web console admin password: {password}  (shown once; only its "
                f"hash is kept, in {Path(s.web_admin_password_file).resolve()})"
            )
        return None

    @staticmethod
    def _disclaimer() -> str:
        from cxr import DISCLAIMER

        return DISCLAIMER

    # -- main loop
    def supervise_once(self, now: float) -> None:
        for c in self.children:
            if c.proc is None:
                c.start(self._preexec)
                continue
            if c.alive:
                if now - c.started_at >= STABLE_AFTER_S:
                    c.backoff = BACKOFF_START_S
                continue
            if c.restart_at is None:
                rc = c.proc.returncode
                self._forget_gauges(c.proc.pid)
                c.restart_at = now + c.backoff
                log.warning(
                    "%s (pid %d) exited with code %s; restarting in %.0f s",
                    c.name,
                    c.proc.pid,
                    rc,
                    c.backoff,
                )
                c.backoff = min(c.backoff * 2, BACKOFF_MAX_S)
            elif now >= c.restart_at:
                c.restarts += 1
                c.start(self._preexec)

    def _forget_gauges(self, pid: int) -> None:
        """Drop a dead process's gauges (its counters stay, so totals never go down)."""
        if not self.metrics_dir:
            return
        for p in Path(self.metrics_dir).glob(f"gauge_*_{pid}.db"):
            p.unlink(missing_ok=True)

    def print_status(self) -> None:
        if not self.show_status or self._poller is None:
            return
        try:
            for line in self._poller.poll():
                self.say(line)
        except Exception as exc:  # a locked/unreachable DB must not stop supervision
            log.debug("status poll failed: %s", type(exc).__name__)

    def run_spool_cleanup(self) -> None:
        if self.settings.spool_retention_days <= 0:
            return
        try:
            from db.lifecycle import cleanup_spool

            cleanup_spool(self.settings)
        except Exception:
            log.exception("spool clean-up failed")

    def preflight(self) -> str | None:
        """A one-line error when the DICOM port cannot be bound (e.g. already in use)."""
        s = self.settings
        try:
            with socket.socket(socket.AF_INET6 if ":" in s.dicom_host else socket.AF_INET) as sk:
                sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sk.bind((s.dicom_host, s.dicom_port))
        except OSError as exc:
            return (
                f"cannot listen on {s.dicom_host}:{s.dicom_port} (CXR_DICOM_PORT): {exc.strerror}"
            )
        return None

    def run(self) -> int:
        from db.session import init_db

        # first: a SIGTERM that arrives during start-up (DB upgrade, metrics) must still
        # end in a clean shutdown with exit 0, not in the default handler's -15
        self.install_signals()
        problem = self.preflight()
        if problem:
            print(f"cxr run: {problem}", file=sys.stderr)
            return 2
        init_db(self.settings.database_url)
        problem = self.prepare_web()
        if problem:
            print(f"cxr run: {problem}", file=sys.stderr)
            return 2
        self.metrics_dir = tempfile.mkdtemp(prefix="cxr-metrics-")
        try:
            try:
                self.start_metrics()
            except OSError as exc:
                print(
                    f"cxr run: cannot serve metrics on {self.settings.metrics_host}:"
                    f"{self.settings.metrics_port} (CXR_METRICS_PORT): {exc.strerror}",
                    file=sys.stderr,
                )
                return 2
            self.build_children()
            self._poller = StatusPoller(self.settings.database_url, datetime.now(UTC))
            next_status = next_cleanup = time.monotonic()
            deadline_ready = time.monotonic() + 120
            while not self.stop_event.is_set():
                now = time.monotonic()
                self.supervise_once(now)
                if not self._ready_announced and self.children[0].alive:
                    if self.node_listening():
                        self._ready_announced = True
                        self.announce()
                    elif now > deadline_ready:
                        log.warning(
                            "the node is not listening yet on port %d", self.settings.dicom_port
                        )
                        deadline_ready = now + 120
                if now >= next_status:
                    self.print_status()
                    next_status = now + STATUS_POLL_S
                if now >= next_cleanup:
                    self.run_spool_cleanup()
                    next_cleanup = now + SPOOL_CLEANUP_EVERY_S
                self.stop_event.wait(0.2)
            return self.shutdown()
        finally:
            if self.http is not None:
                self.http.shutdown()
                self.http.server_close()
            if self.web_socket is not None:
                self.web_socket.close()
            if self.metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def shutdown(self) -> int:
        """Forward SIGTERM, wait for every child (up to ``grace``), kill leftovers."""
        alive = [c for c in self.children if c.alive]
        self.say(f"cxr run: stopping {len(alive)} process(es), finishing work in flight ...")
        for c in alive:
            c.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        next_status = time.monotonic()
        while any(c.alive for c in self.children) and time.monotonic() < deadline:
            if time.monotonic() >= next_status:
                self.print_status()
                next_status = time.monotonic() + STATUS_POLL_S
            time.sleep(0.1)
        forced = [c for c in self.children if c.alive]
        for c in forced:
            log.error("%s did not stop within %.0f s: killing it", c.name, self.grace)
            c.signal(signal.SIGKILL)
            if c.proc is not None:
                c.proc.wait()
        self.print_status()
        for c in self.children:
            if c.proc is not None and not forced:
                log.info("%s exited with code %s", c.name, c.proc.returncode)
        self.say("cxr run: stopped" + (" (some processes had to be killed)" if forced else ""))
        return 1 if forced else 0


def _safe_url(url: str) -> str:
    """A URL with its password masked, for display."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


# ----------------------------------------------------------------------------- CLI
def register(subparsers: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        name,
        help="run node + worker(s) together, supervised",
        description=(
            "Run the DICOM node and N Celery workers as supervised child processes "
            "(crashed children are restarted), with one /metrics + /healthz endpoint and a "
            "status line per processed instance. Configuration: CXR_* environment variables "
            "(see README); with none, SQLite and an embedded broker under ./var are used."
        ),
    )
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (1)")
    p.add_argument(
        "--grace",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for work in flight at shutdown (CXR_TASK_TIME_LIMIT + 15)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-instance status lines")
    p.add_argument("--no-web", action="store_true", help="do not start the web console (cxr web)")
    p.add_argument(
        "--cleanup-spool",
        action="store_true",
        help="delete spool files of instances finished more than CXR_SPOOL_RETENTION_DAYS "
        "ago, then exit (cxr run also does this hourly)",
    )
    p.add_argument("--dry-run", action="store_true", help="with --cleanup-spool: only count")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from cxr.logconfig import configure_logging
    from cxr.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_json)
    if args.cleanup_spool:
        from db.lifecycle import cleanup_spool
        from db.session import init_db

        init_db(settings.database_url)
        res = cleanup_spool(settings, dry_run=args.dry_run)
        verb = "would delete" if args.dry_run else "deleted"
        print(f"spool clean-up: {verb} {res.files} file(s), {res.bytes} bytes")
        return 0
    if args.workers < 1:
        print("cxr run: --workers must be at least 1", file=sys.stderr)
        return 2
    return Supervisor(
        settings,
        workers=args.workers,
        grace=args.grace,
        status=not args.quiet,
        web=not args.no_web,
    ).run()
