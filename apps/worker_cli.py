"""``cxr worker``: run a real Celery worker (prefork pool) on queue ``cxr``.

Besides the Celery worker itself, the command

* upgrades the audit schema (idempotent) so a fresh database works;
* with ``--sweep`` only, runs the re-queue sweep at start and then every
  ``CXR_REQUEUE_INTERVAL`` seconds in a daemon thread of the main process: instances
  stranded in ``received`` (broker was down at receipt), stuck in ``queued``/``processing``
  for longer than ``CXR_REQUEUE_STALE_AFTER`` (a worker was killed), or left
  ``classified`` without delivery for as long, are sent to the queue again (tasks are
  idempotent). The node owns the sweep by default (``db.lifecycle.sweep`` says why);
  ``--sweep`` is for a node run with ``--no-sweep``. A sweep runs under a lease in the
  audit DB, so several sweepers never re-send the same instance;
* checks the model artifact and fills its ONNX export cache in a throw-away subprocess
  before the pool starts (``--no-warm-model`` skips it), so no task pays for the export;
* sets the ``cxr_queue_depth`` gauge (instances ``received`` + ``queued``) on each sweep
  (with ``--sweep``);
* serves Prometheus ``/metrics`` and ``/healthz`` on ``CXR_METRICS_PORT`` (0 = off); the
  pool processes' metrics are aggregated (prometheus-client multiprocess mode, in
  ``PROMETHEUS_MULTIPROC_DIR`` or a temporary folder).

SIGTERM is Celery's warm shutdown: the task in flight finishes and is acknowledged, then
the worker exits. (A second SIGTERM/SIGQUIT is a cold shutdown; an unacknowledged task is
then redelivered, or re-sent by the sweep.)
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cxr.settings import Settings

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        name,
        help="run a Celery worker that classifies queued instances",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="pool processes (default CXR_WORKER_CONCURRENCY)",
    )
    p.add_argument("--hostname", default=None, help="Celery node name (default cxr@<host>-<pid>)")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument(
        "--sweep",
        action="store_true",
        help="also run the re-queue sweep here (the node owns it by default; for a node "
        "run with --no-sweep). Several sweepers are safe: they share a lease",
    )
    sweep.add_argument(
        "--no-sweep",
        action="store_true",
        help="do not run the re-queue sweep here (the default; kept for old scripts)",
    )
    p.add_argument(
        "--no-warm-model",
        action="store_true",
        help="skip the start-up model check/ONNX export (then the first task pays for it)",
    )
    p.set_defaults(func=run_worker)


#: this process's name as a sweep lease holder (leases.holder)
SWEEP_HOLDER = f"worker@{socket.gethostname()}:{os.getpid()}"


def sweep_once(settings: Settings, app: Any) -> int:
    """One re-queue sweep (:func:`db.lifecycle.sweep`: stranded/stale instances and
    undelivered results, under the sweep lease), which also sets the ``cxr_queue_depth``
    gauge. Returns how many tasks it sent (0 when another process holds the lease)."""
    from cxr.contracts import send_classify, send_deliver
    from db.lifecycle import sweep

    try:
        return sweep(
            settings,
            lambda i: send_classify(app, i),
            lambda i, attempt: send_deliver(app, i, attempt),
            holder=SWEEP_HOLDER,
        ).sent
    except Exception as exc:  # DB down: try again next time
        log.warning("re-queue sweep failed: %s", type(exc).__name__)
        return 0


def _sweeper(settings: Settings, app: Any, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        sweep_once(settings, app)


_WARM = (
    "from cxr.settings import load_settings\n"
    "from ml.runtime import get_classifier\n"
    "c = get_classifier(load_settings())\n"
    "print(f'model {c.name} {c.version} ({c.engine}) ready')\n"
)


class StopDuringWarmUp(Exception):
    """SIGTERM/SIGINT arrived while the model was warming up: nothing is in flight yet."""


def warm_model() -> bool:
    """Load the model once in a throw-away subprocess before the pool starts.

    This verifies the artifact (fail fast on a broken model) and fills the ONNX export
    cache, which can take minutes for the full-size model on a small CPU: done inside the
    first task it would count against the task time limit. A subprocess, because the
    prefork parent must not import TensorFlow (it is not fork-safe).

    Celery installs its own signal handlers only after this, so SIGTERM/SIGINT here stop
    the warm-up process and raise :class:`StopDuringWarmUp` (a clean stop, not Python's
    default -15 with the warm-up process orphaned)."""
    import signal

    from apps.supervisor import pdeathsig_preexec

    t0 = time.monotonic()
    stop: list[int] = []
    procs: list[subprocess.Popen[str]] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signum)
        for p in procs:
            p.terminate()

    # handlers first, so no moment exists with the warm-up running and the default handler
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WARM],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=pdeathsig_preexec(),
        )
        procs.append(proc)
        if stop:  # the signal came while the process was being started
            proc.terminate()
        out, err = proc.communicate()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop:
        raise StopDuringWarmUp(signal.Signals(stop[0]).name)
    if proc.returncode != 0:
        tail = (err or out).strip().splitlines()[-1:] or ["?"]
        log.error("cannot load the model: %s", tail[0])
        return False
    log.info("%s in %.1f s", out.strip(), time.monotonic() - t0)
    return True


def _multiprocess_metrics_dir(settings: object) -> str | None:
    """The pool processes' metrics reach the parent's /metrics only in prometheus-client's
    multiprocess mode: use ``PROMETHEUS_MULTIPROC_DIR`` (set by ``cxr run``) or a fresh
    temporary folder. Must happen before prometheus_client is imported."""
    if not getattr(settings, "metrics_port", 0):
        return None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None  # managed by the caller (e.g. the supervisor)
    if "prometheus_client" in sys.modules:
        log.warning("prometheus_client already imported: pool metrics are not aggregated")
        return None
    import tempfile

    path = tempfile.mkdtemp(prefix="cxr-worker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def run_worker(args: argparse.Namespace) -> int:
    from cxr.settings import load_settings

    settings = load_settings()
    own_metrics_dir = _multiprocess_metrics_dir(settings)
    try:
        return _run_worker(args, settings)
    finally:
        if own_metrics_dir:
            import shutil

            shutil.rmtree(own_metrics_dir, ignore_errors=True)


def _run_worker(args: argparse.Namespace, settings: Any) -> int:
    from cxr.celery_app import make_celery
    from cxr.logconfig import configure_logging
    from db.session import init_db

    configure_logging(settings.log_level, settings.log_json)
    init_db(settings.database_url)
    if not args.no_warm_model:
        try:
            if not warm_model():
                return 1
        except StopDuringWarmUp as why:
            log.info("received %s during model warm-up: stopped", why)
            return 0
    app = make_celery(settings)
    import worker.tasks  # noqa: F401  (registers the tasks on the app)

    concurrency = args.concurrency or settings.worker_concurrency
    hostname = args.hostname or f"cxr@{socket.gethostname()}-{os.getpid()}"

    from cxr.health import register_health_check

    def _db_ok() -> bool:
        from db.session import ping

        return ping(settings.database_url)

    register_health_check("database", _db_ok)

    # the pool processes load the model; they flag a failure in this file (worker.pipeline)
    from worker.pipeline import MODEL_STATUS_ENV, model_healthy

    status_dir = tempfile.mkdtemp(prefix="cxr-worker-model-")
    os.environ[MODEL_STATUS_ENV] = os.path.join(status_dir, "model-error")
    register_health_check("model", model_healthy)
    from worker.pipeline import TASK_STATUS_ENV, tasks_healthy

    os.environ[TASK_STATUS_ENV] = status_dir  # pool processes mark the tasks they run
    register_health_check("tasks", lambda: tasks_healthy(settings.task_time_limit + 30))
    stop = threading.Event()
    try:
        return _serve(args, settings, app, hostname, concurrency, stop)
    finally:
        stop.set()
        shutil.rmtree(status_dir, ignore_errors=True)


def _serve(
    args: argparse.Namespace,
    settings: Any,
    app: Any,
    hostname: str,
    concurrency: int,
    stop: threading.Event,
) -> int:
    from cxr.contracts import QUEUE
    from cxr.metrics import start_metrics_server
    from db.session import dispose_engines

    start_metrics_server(settings.metrics_host, settings.metrics_port)
    if args.sweep:
        sweep_once(settings, app)
        threading.Thread(
            target=_sweeper,
            args=(settings, app, settings.requeue_interval, stop),
            name="requeue-sweep",
            daemon=True,
        ).start()
    dispose_engines()  # nothing pooled is inherited by the forked pool processes
    log.info(
        "worker %s: %d process(es), queue %s, model %s",
        hostname,
        concurrency,
        QUEUE,
        settings.model_dir,
    )
    w = app.Worker(
        hostname=hostname,
        concurrency=concurrency,
        pool="prefork",
        queues=[QUEUE],
        loglevel=settings.log_level,
        without_gossip=True,
        without_mingle=True,
        optimization="fair",
    )
    w.start()
    return int(getattr(w, "exitcode", 0) or 0)
