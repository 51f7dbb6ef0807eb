"""Hand instances to the queue (used by the node after a durable receipt, and by the sweep).

A send that fails (broker down) leaves the instance in state ``received``; the re-queue
sweep (:func:`requeue_stranded`) sends it later. Tasks are idempotent, so a second send of
the same instance is harmless.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import Celery
from sqlalchemy import func, select, update

from cxr.settings import Settings
from db.models import Event, Instance, State, utcnow
from db.session import session_scope
from worker.celery_app import QUEUE, TASK_CLASSIFY

log = logging.getLogger(__name__)

# do not wait for a dead broker: fail fast, the sweep retries
_SEND_RETRY = {"max_retries": 0, "interval_start": 0, "interval_step": 0, "interval_max": 0}


def send_classify(app: Celery, instance_id: int) -> None:
    """Publish the classify task for one audit row (raises when the broker is down)."""
    app.send_task(
        TASK_CLASSIFY,
        args=[instance_id],
        queue=QUEUE,
        retry=True,
        retry_policy=_SEND_RETRY,
    )


def enqueue_instance(settings: Settings, app: Celery, instance_id: int) -> bool:
    """Queue one instance; ``received`` -> ``queued``. Returns False when the broker is down."""
    try:
        send_classify(app, instance_id)
    except Exception as exc:
        log.warning(
            "broker unavailable, instance %d stays 'received' for the sweep: %s",
            instance_id,
            type(exc).__name__,
        )
        return False
    with session_scope(settings.database_url) as s:
        res = s.execute(
            update(Instance)
            .where(Instance.id == instance_id, Instance.state == State.RECEIVED.value)
            .values(state=State.QUEUED.value, updated_at=utcnow())
        )
        if res.rowcount:
            s.add(Event(instance_id=instance_id, kind=State.QUEUED.value, detail="sent to queue"))
    return True


def requeue_stranded(settings: Settings, app: Celery, received_older_than: float = 5.0) -> int:
    """Re-send instances stranded in ``received`` (broker was down) or stuck in
    ``queued``/``processing`` for longer than ``CXR_REQUEUE_STALE_AFTER``. Returns count."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.requeue_stale_after)
    fresh = now - timedelta(seconds=received_older_than)
    with session_scope(settings.database_url) as s:
        rows = s.execute(
            select(Instance.id, Instance.state).where(
                ((Instance.state == State.RECEIVED.value) & (Instance.updated_at <= fresh))
                | (
                    Instance.state.in_([State.QUEUED.value, State.PROCESSING.value])
                    & (Instance.updated_at <= stale)
                )
            )
        ).all()
    sent = 0
    for instance_id, state in rows:
        try:
            send_classify(app, instance_id)
        except Exception as exc:
            log.warning("re-queue sweep: broker still unavailable (%s)", type(exc).__name__)
            break
        sent += 1
        with session_scope(settings.database_url) as s:
            s.execute(
                update(Instance)
                .where(Instance.id == instance_id, Instance.state == state)
                .values(
                    state=State.QUEUED.value if state == State.RECEIVED.value else state,
                    updated_at=utcnow(),
                )
            )
            s.add(Event(instance_id=instance_id, kind="requeued", detail=f"from state {state}"))
    if sent:
        log.info("re-queue sweep sent %d instance(s)", sent)
    return sent


def queue_depth(settings: Settings) -> int:
    """Instances waiting for a worker (``received`` + ``queued``) per the audit DB; also
    sets the ``cxr_queue_depth`` gauge (called by the node's and the worker's sweeps)."""
    from cxr import metrics

    with session_scope(settings.database_url) as s:
        n = int(
            s.execute(
                select(func.count())
                .select_from(Instance)
                .where(Instance.state.in_([State.RECEIVED.value, State.QUEUED.value]))
            ).scalar_one()
        )
    metrics.QUEUE_DEPTH.set(n)
    return n
