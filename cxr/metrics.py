"""Prometheus metrics shared by the node and the workers (prometheus-client).

Every process serves ``/metrics`` and ``/healthz`` on ``CXR_METRICS_PORT`` (see
:func:`start_metrics_server`). Label values are fixed vocabularies (reasons, states,
statuses), never UIDs or patient data.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

# no calling-AE label: any peer may connect (before the allow-list check), so its AE title
# would be an unbounded label value; the audit DB has the per-AE figures
INSTANCES_RECEIVED = Counter(
    "cxr_instances_received_total", "C-STORE requests received by the node"
)
INSTANCES_ACCEPTED = Counter(
    "cxr_instances_accepted_total", "Instances stored durably and queued/recorded for triage"
)
INSTANCES_IGNORED = Counter(
    "cxr_instances_ignored_total", "Instances acknowledged but not classified", ["reason"]
)
INSTANCES_REFUSED = Counter(
    "cxr_instances_refused_total", "C-STORE requests refused with a failure status", ["reason"]
)
INSTANCES_DUPLICATE = Counter(
    "cxr_instances_duplicate_total", "Identical re-sends acknowledged without reprocessing"
)
ASSOCIATIONS = Counter("cxr_associations_total", "Association requests by outcome", ["outcome"])
ACTIVE_ASSOCIATIONS = Gauge("cxr_associations_active", "Associations currently open")
QUEUE_DEPTH = Gauge(
    "cxr_queue_depth",
    "Instances waiting for a worker (received+queued), from the audit DB",
    multiprocess_mode="livemax",  # set by the sweeps of several processes: one figure
)
STAGE_SECONDS = Histogram(
    "cxr_stage_seconds",
    "Latency per pipeline stage",
    ["stage"],  # decode, preprocess, forward, cam, build, send, end_to_end, store
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
INFERENCES = Counter("cxr_inferences_total", "Classified instances", ["verdict"])
TASK_OUTCOMES = Counter("cxr_tasks_total", "Worker task outcomes", ["outcome"])
DELIVERIES = Counter(
    "cxr_deliveries_total", "C-STORE deliveries of results by status", ["status"]
)  # success, warning, failure, unreachable

log = logging.getLogger(__name__)


def start_metrics_server(host: str, port: int, fallback: bool = True) -> object | None:
    """Serve /metrics and /healthz in a daemon thread; port 0 disables it.

    Several processes on one host (a node and workers, all with default settings) must not
    fight over the port: when it is taken, the endpoint moves to a free port, and one log
    line says where (set ``CXR_METRICS_PORT`` per process for a fixed scrape target)."""
    if not port:
        return None
    import errno

    from cxr.health import serve_metrics_and_health

    try:
        return serve_metrics_and_health(host, port)
    except OSError as exc:
        if not fallback or exc.errno != errno.EADDRINUSE:
            raise
    server = serve_metrics_and_health(host, 0)
    actual = server.server_address[1]
    log.warning(
        "metrics port %s:%d is in use (another cxr process?); /metrics and /healthz of this "
        "process are on %s:%d instead (set CXR_METRICS_PORT per process to fix it)",
        host,
        port,
        host,
        actual,
    )
    return server
