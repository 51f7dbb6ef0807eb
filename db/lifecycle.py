"""The instance lifecycle's state changes, written once (the audit DB owns them).

This module is where the state machine's SQL lives. So far it holds the hand-off to the
queue (``received`` -> ``queued``, written once for the node and the sweep), the
stranded-instance sweep, the queue depth, the delivery retry schedule and the spool
clean-up (retention); the claim,
inference, delivery and final transitions still sit in ``worker.pipeline`` and
``dicom_node.node`` (issue #10 lists them) and move here next.

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

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import and_, func, or_, select, update

from cxr import metrics
from cxr.storage import Spool
from db.models import FINAL_STATES, Event, Inference, Instance, State, utcnow
from db.session import session_scope

if TYPE_CHECKING:  # pragma: no cover
    from cxr.settings import Settings

log = logging.getLogger(__name__)

Send = Callable[[int], None]  # publishes the classify task of one instance (raises if down)


def mark_queued(url: str, instance_ids: Sequence[int]) -> list[int]:
    """``received`` -> ``queued`` for instances whose task was just published (one event
    each). Instances no longer ``received`` (a worker was faster) are left alone.
    Returns the ids moved."""
    if not instance_ids:
        return []
    with session_scope(url) as s:
        moved = list(
            s.execute(
                update(Instance)
                .where(Instance.id.in_(list(instance_ids)), Instance.state == State.RECEIVED.value)
                .values(state=State.QUEUED.value)
                .returning(Instance.id)
            )
            .scalars()
            .all()
        )
        s.add_all(
            Event(instance_id=i, kind=State.QUEUED.value, detail="sent to queue") for i in moved
        )
    return moved


def hand_off(url: str, instance_ids: Sequence[int], send: Send) -> list[int]:
    """Publish each instance's task, then mark the published ones ``queued``. A send that
    fails (broker down) stops the batch: the rest stay ``received`` for the sweep.
    Returns the ids sent."""
    sent: list[int] = []
    for instance_id in instance_ids:
        try:
            send(instance_id)
        except Exception as exc:
            log.warning(
                "broker unavailable, %d instance(s) stay 'received' for the sweep: %s",
                len(instance_ids) - len(sent),
                type(exc).__name__,
            )
            break
        sent.append(instance_id)
    mark_queued(url, sent)
    return sent


def requeue_stranded(settings: Settings, send: Send, received_older_than: float = 5.0) -> int:
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
            send(instance_id)
        except Exception as exc:
            log.warning("re-queue sweep: broker still unavailable (%s)", type(exc).__name__)
            break
        sent += 1
        with session_scope(settings.database_url) as s:
            s.execute(
                update(Instance)
                .where(Instance.id == instance_id, Instance.state == state)
                .values(state=State.QUEUED.value if state == State.RECEIVED.value else state)
            )
            s.add(Event(instance_id=instance_id, kind="requeued", detail=f"from state {state}"))
    if sent:
        log.info("re-queue sweep sent %d instance(s)", sent)
    return sent


def queue_depth(settings: Settings) -> int:
    """Instances waiting for a worker (``received`` + ``queued``) per the audit DB; also
    sets the ``cxr_queue_depth`` gauge (called by the sweeps)."""
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


# --------------------------------------------------------------------- spool clean-up
class CleanupResult:
    """What :func:`cleanup_spool` removed (or would remove, with ``dry_run``)."""

    def __init__(self) -> None:
        self.files = 0
        self.bytes = 0
        self.instances = 0

    def __repr__(self) -> str:
        return f"CleanupResult(files={self.files}, bytes={self.bytes}, instances={self.instances})"


def cleanup_spool(
    settings: object,
    retention_days: float | None = None,
    now: object | None = None,
    dry_run: bool = False,
) -> CleanupResult:
    """Delete spool files of instances that reached a final state more than
    ``retention_days`` (default ``CXR_SPOOL_RETENTION_DAYS``; 0 = keep forever) ago.

    Removes the received file (``instances.spool_path``, unless a newer, still-retained row
    points at the same content) and the SC/SR results built for it; sets ``spool_path`` to
    NULL and appends a ``spool_purged`` event, so the audit trail records the deletion.
    Audit rows themselves are never deleted.
    """
    res = CleanupResult()
    days = settings.spool_retention_days if retention_days is None else retention_days  # type: ignore[attr-defined]
    if not days or days <= 0:
        return res
    current = now if isinstance(now, datetime) else datetime.now(UTC)
    cutoff = current - timedelta(days=float(days))
    finals = [s.value for s in FINAL_STATES]
    spool = Spool(settings.spool_dir)  # type: ignore[attr-defined]
    url = settings.database_url  # type: ignore[attr-defined]
    with session_scope(url) as s:
        done_at = Instance.finished_at
        old = s.execute(
            select(Instance.id, Instance.spool_path).where(
                or_(
                    Instance.state.in_(finals),
                    # classified with finished_at set: final when there are no destinations
                    and_(Instance.state == State.CLASSIFIED.value, done_at.is_not(None)),
                ),
                Instance.spool_path.is_not(None),
                ((done_at.is_not(None)) & (done_at < cutoff))
                | ((done_at.is_(None)) & (Instance.updated_at < cutoff)),
            )
        ).all()
        if not old:
            return res
        old_ids = {i for i, _ in old}
        kept_paths = {
            p
            for i, p in s.execute(
                select(Instance.id, Instance.spool_path).where(Instance.spool_path.is_not(None))
            ).all()
            if i not in old_ids
        }
        old_list = sorted(old_ids)
        for k in range(0, len(old_list), 500):  # bounded IN lists (SQLite variable limit)
            chunk = old_list[k : k + 500]
            result_uids = [
                uid
                for row in s.execute(
                    select(Inference.sc_sop_instance_uid, Inference.sr_sop_instance_uid).where(
                        Inference.instance_id.in_(chunk)
                    )
                ).all()
                for uid in row
                if uid
            ]
            chunk_set = set(chunk)
            paths: list[Path] = [
                spool.resolve(p) for i, p in old if i in chunk_set and p not in kept_paths
            ]
            paths += [spool.result_path(uid) for uid in result_uids]
            for path in dict.fromkeys(paths):
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                if not dry_run:
                    spool.delete(path)
                res.files += 1
                res.bytes += size
            if not dry_run:
                s.execute(update(Instance).where(Instance.id.in_(chunk)).values(spool_path=None))
                s.add_all(
                    Event(instance_id=i, kind="spool_purged", detail=f"retention {days} d")
                    for i in chunk
                )
        res.instances = len(old_ids)
    log.info(
        "spool clean-up: %s %d file(s), %d bytes, %d instance(s)",
        "would delete" if dry_run else "deleted",
        res.files,
        res.bytes,
        res.instances,
    )
    return res
