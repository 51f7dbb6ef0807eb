"""The Celery application (broker from CXR_BROKER_URL, embedded SQLite broker otherwise).

Task guide choices: tasks carry audit row IDs (never pixel data), ``acks_late`` with
``reject_on_worker_lost`` (a killed worker's task is redelivered), prefetch 1, time limits,
no result backend (the audit DB is the result store).

It lives in the foundation: the node publishes with it and the worker consumes with it;
the tasks themselves (``worker.tasks``) are named by string, so nothing here imports a
stage.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery

from cxr.contracts import QUEUE, TASK_CLASSIFY, TASK_DELIVER
from cxr.settings import Settings, get_settings

log = logging.getLogger(__name__)

__all__ = ["QUEUE", "TASK_CLASSIFY", "TASK_DELIVER", "get_app", "make_celery"]


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    broker = s.effective_broker_url
    if broker.startswith("sqla+sqlite"):
        s.embedded_broker_path.parent.mkdir(parents=True, exist_ok=True)
    app = Celery("cxr", broker=broker, include=["worker.tasks"])
    transport_options: dict[str, object] = {}
    if broker.startswith(("redis://", "rediss://")):
        # a killed worker's unacknowledged task comes back after this long: it must exceed
        # the longest legitimate hold (a countdown of at most CXR_RETRY_ETA_MAX, then a run
        # of at most CXR_TASK_TIME_LIMIT); longer retry waits are kept in the audit DB
        # (db/lifecycle.py). kombu looks for expired messages every 10 s but scans only on
        # every 10th look by default (100 s late); scan every 5 s.
        transport_options["visibility_timeout"] = s.redelivery_timeout
        transport_options["unacked_restore_interval"] = 5
        transport_options["unacked_restore_throttle"] = 1
    if broker.startswith("sqla+"):
        # kombu's SQLAlchemy transport passes its transport options to create_engine(),
        # which rejects 'polling_interval': set the poll period on the transport class
        import kombu.transport.sqlalchemy

        kombu.transport.sqlalchemy.Transport.polling_interval = 0.2
    app.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_time_limit=s.task_time_limit,
        task_soft_time_limit=s.task_soft_time_limit,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_pool_limit=4,
    )
    return app


@lru_cache(maxsize=4)
def _cached_app(broker: str) -> Celery:
    return make_celery()


def get_app(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    if settings is not None:
        return make_celery(settings)
    return _cached_app(s.effective_broker_url)
