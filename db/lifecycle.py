"""The instance lifecycle's state changes, written once (the audit DB owns them).

This module is where the state machine's SQL lives. It starts with the delivery retry
schedule; the other transitions still sit where issue #10 lists them and move here
next.

**Delivery retries that wait in the database.** A broker such as Redis holds a task
with a countdown as an unacknowledged message, and it redelivers every unacknowledged
message after its visibility timeout. That timeout must therefore be longer than the
longest countdown plus the task's run time, and it is also how long a task of a
SIGKILLed worker waits before it runs again. To keep that wait short (a triage product:
minutes, not a quarter of an hour), only short backoffs are broker countdowns
(``CXR_RETRY_ETA_MAX``). A longer one is written here (:func:`schedule_delivery_retry`)
and the re-queue sweep sends it when it is due (:func:`take_due_delivery_retries`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update

from db.models import Instance, State, utcnow
from db.session import session_scope


def schedule_delivery_retry(
    url: str, instance_id: int, attempt: int, delay: float, now: datetime | None = None
) -> datetime:
    """Delivery attempt ``attempt`` of the instance is due ``delay`` seconds from now.
    Returns the due time."""
    due = (now or utcnow()) + timedelta(seconds=delay)
    with session_scope(url) as s:
        s.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(retry_due_at=due, retry_attempt=attempt)
        )
    return due


def take_due_delivery_retries(url: str, now: datetime | None = None) -> list[tuple[int, int]]:
    """The due retries ``(instance_id, attempt)``, each taken exactly once.

    Each row is cleared by a conditional UPDATE before it is returned, so two sweepers
    (the node's and a worker's) never both send it. A row whose instance is no longer
    waiting for delivery (finished, or re-classified meanwhile) is cleared and not
    returned."""
    now = now or utcnow()
    with session_scope(url) as s:
        rows = s.execute(
            select(Instance.id, Instance.retry_attempt, Instance.state, Instance.finished_at)
            .where(Instance.retry_due_at.is_not(None), Instance.retry_due_at <= now)
            .order_by(Instance.retry_due_at)
        ).all()
    taken: list[tuple[int, int]] = []
    for instance_id, attempt, state, finished_at in rows:
        with session_scope(url) as s:
            res = s.execute(
                update(Instance)
                .where(Instance.id == instance_id, Instance.retry_due_at.is_not(None))
                .values(retry_due_at=None, retry_attempt=None)
            )
        if res.rowcount != 1:  # type: ignore[attr-defined]  # another sweeper took it
            continue
        if state == State.CLASSIFIED.value and finished_at is None:
            taken.append((instance_id, int(attempt or 1)))
    return taken


def clear_delivery_retry(url: str, instance_id: int) -> None:
    """Drop a waiting retry (an admin re-send, or a send that went out another way)."""
    with session_scope(url) as s:
        s.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(retry_due_at=None, retry_attempt=None)
        )
