"""The instance lifecycle's state changes, written once (the audit DB owns them).

This module is where the state machine's SQL lives, for every process: the node's
receipt rows (associations, ``received``/``ignored``/refused instances and their
duplicates), the hand-off to the queue (``received`` -> ``queued``, written once for the
node and the sweep), the stranded-instance sweep and its lease (one sweeper per
interval), the queue depth, the worker's claim, classification and delivery transitions,
the delivery retry schedule and the spool clean-up (retention). The node, the worker, the
supervisor and ``cxr audit`` call these functions and hold no SQL of their own.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import ColumnElement, and_, delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError, NoResultFound, SQLAlchemyError
from sqlalchemy.orm import Session

from cxr import metrics
from cxr.contracts import LANE_OWNER_PREFIX
from cxr.storage import Spool
from db.models import (
    FINAL_STATES,
    Association,
    Delivery,
    Event,
    Inference,
    Instance,
    Lease,
    State,
    utcnow,
)
from db.queries import aware
from db.session import init_db, session_scope

if TYPE_CHECKING:  # pragma: no cover
    from cxr.settings import Settings

log = logging.getLogger(__name__)

Send = Callable[[int], None]  # publishes the classify task of one instance (raises if down)


# ------------------------------------------------------------------ receipt (the node)
def prepare_database(url: str) -> None:
    """Create/upgrade the audit schema (idempotent; the node calls it at start)."""
    init_db(url)


def is_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the audit database failed (the node answers 0xA700 for it)."""
    return isinstance(exc, SQLAlchemyError)


def open_association(
    url: str,
    *,
    calling_ae: str,
    called_ae: str,
    peer_host: str | None,
    peer_port: int | None,
    tls: bool,
    rejected: str | None = None,
) -> int:
    """The ``associations`` row of a requested association: ``open``, or ``rejected``
    (closed at once) with the reason. Returns its id."""
    with session_scope(url) as s:
        row = Association(
            calling_ae=calling_ae[:16],
            called_ae=called_ae[:16],
            peer_host=peer_host,
            peer_port=peer_port,
            tls=tls,
            outcome="rejected" if rejected else "open",
            reason=rejected,
            ended_at=utcnow() if rejected else None,
        )
        s.add(row)
        s.flush()
        return int(row.id)


def close_association(
    url: str, association_id: int, *, outcome: str, reason: str | None, counts: Mapping[str, int]
) -> None:
    """End an association's row: its outcome (released/aborted/closed/failed), the reason
    (e.g. rejected presentation contexts) and its counters (``stored``, ``ignored``,
    ``duplicate``, ``refused``, ``echo``; missing ones count 0)."""
    with session_scope(url) as s:
        row = s.get(Association, association_id)
        if row is None:
            return
        row.outcome = outcome
        row.ended_at = utcnow()
        row.reason = reason
        row.n_stored = int(counts.get("stored", 0))
        row.n_ignored = int(counts.get("ignored", 0))
        row.n_duplicate = int(counts.get("duplicate", 0))
        row.n_refused = int(counts.get("refused", 0))
        row.n_echo = int(counts.get("echo", 0))


def record_rejected_connection(
    url: str, *, peer_host: str, peer_port: int | None, tls: bool, reason: str
) -> None:
    """A connection refused before any association was requested (a failed TLS
    handshake): a closed ``rejected`` association row without AE titles."""
    with session_scope(url) as s:
        s.add(
            Association(
                calling_ae="",
                called_ae="",
                peer_host=peer_host,
                peer_port=peer_port,
                tls=tls,
                outcome="rejected",
                reason=reason[:255],
                ended_at=utcnow(),
            )
        )


@dataclass
class Receipt:
    """One C-STORE as the node read it: the ``instances`` columns it knows (no PHI: the
    PatientID arrives hashed, per ``CXR_PATIENT_ID_STORAGE``) and where it came from."""

    sop_instance_uid: str
    content_sha256: str
    calling_ae: str
    association_id: int | None
    sop_class_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    transfer_syntax_uid: str | None = None
    accession_number: str | None = None
    patient_id_hash: str | None = None
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    rows: int | None = None
    columns: int | None = None
    size_bytes: int | None = None
    spool_path: str | None = None  # relative to the spool; None when nothing was kept

    @classmethod
    def from_fields(
        cls,
        values: Mapping[str, Any],
        *,
        calling_ae: str,
        association_id: int | None,
    ) -> Receipt:
        """From a mapping holding (some of) the column names and ``sha256``; other keys
        are ignored."""
        known = {f.name for f in fields(cls)} - {"calling_ae", "association_id"}
        kw = {k: values[k] for k in known if k in values}
        kw["sop_instance_uid"] = str(values.get("sop_instance_uid") or "")
        kw["content_sha256"] = str(values.get("sha256") or values.get("content_sha256") or "")
        return cls(**kw, calling_ae=calling_ae, association_id=association_id)

    @property
    def uid(self) -> str:
        """The SOP Instance UID as stored (NUL-free, at most 64 characters)."""
        return self.sop_instance_uid.replace("\x00", "")[:64]


#: the columns of ``instances`` a :class:`Receipt` fills
_RECEIPT_COLUMNS = (
    "sop_class_uid",
    "study_instance_uid",
    "series_instance_uid",
    "transfer_syntax_uid",
    "accession_number",
    "patient_id_hash",
    "modality",
    "body_part",
    "view_position",
    "rows",
    "columns",
    "size_bytes",
    "spool_path",
)


@dataclass
class ReceiptOutcome:
    """What :func:`record_receipt` committed: ``kind`` is ``stored`` (a new ``received``
    row, or a refused/ignored one stored now) or ``duplicate`` (an identical re-send: an
    event only). ``version`` is the stored version (None for a duplicate)."""

    kind: str
    instance_id: int
    version: int | None


def _new_instance(r: Receipt, state: State, reason: str | None, version: int) -> Instance:
    cols: dict[str, Any] = {k: getattr(r, k) for k in _RECEIPT_COLUMNS}
    for k, v in cols.items():
        if isinstance(v, str):
            cols[k] = v.replace("\x00", "")  # PostgreSQL text cannot hold NUL
    return Instance(
        **cols,
        sop_instance_uid=r.uid,
        content_sha256=r.content_sha256,
        version=version,
        calling_ae=r.calling_ae[:16] or None,
        association_id=r.association_id,
        state=state.value,
        reason=reason,
        finished_at=utcnow() if state in (State.IGNORED, State.FAILED) else None,
    )


def _find_receipt(s: Session, r: Receipt) -> Instance | None:
    return s.execute(
        select(Instance).where(
            Instance.sop_instance_uid == r.uid, Instance.content_sha256 == r.content_sha256
        )
    ).scalar_one_or_none()


def _next_version(s: Session, r: Receipt) -> int:
    v = s.execute(
        select(func.max(Instance.version)).where(Instance.sop_instance_uid == r.uid)
    ).scalar()
    return int(v or 0) + 1


def _event_on_existing(url: str, r: Receipt, kind: str, detail: str) -> int:
    """An event on the row that a concurrent transaction committed for the same content."""
    with session_scope(url) as s:
        existing = _find_receipt(s, r)
        if existing is None:  # pragma: no cover - deleted between the two transactions
            raise NoResultFound("audit row vanished")
        _event(s, existing.id, kind, detail, association_id=r.association_id)
        return int(existing.id)


def record_receipt(url: str, r: Receipt) -> ReceiptOutcome:
    """Commit a stored C-STORE (its file is already durable in the spool): a new
    ``received`` row with its event, or for content already recorded

    * refused or ignored before with no data kept: that row is stored now (back to
      ``received``, to be processed);
    * otherwise a ``duplicate`` event (a row whose file was purged is re-pointed at it).

    The version is 1 + the highest one under the same SOP Instance UID (new content under
    a known UID). Two associations committing the same content at once end as one row and
    one duplicate event. Raises on a database failure (nothing is committed)."""
    dup_detail = f"identical re-send from {r.calling_ae}"
    try:
        with session_scope(url) as s:
            existing = _find_receipt(s, r)
            if (
                existing is not None
                and existing.spool_path is None
                and existing.state in (State.FAILED.value, State.IGNORED.value)
            ):
                # the same content was refused (e.g. disk full) or ignored before and no
                # data was kept: this re-send is stored now and must be processed
                prev = existing.state
                existing.spool_path = r.spool_path
                existing.state = State.RECEIVED.value
                existing.reason = None
                existing.finished_at = None
                existing.attempts = 0
                existing.association_id = r.association_id
                _event(
                    s,
                    existing.id,
                    State.RECEIVED.value,
                    f"stored on re-send (previously {prev}, no data kept)",
                    association_id=r.association_id,
                )
                return ReceiptOutcome("stored", int(existing.id), int(existing.version))
            if existing is not None:
                if existing.spool_path is None:  # e.g. purged by retention: re-point
                    existing.spool_path = r.spool_path
                _event(s, existing.id, "duplicate", dup_detail, association_id=r.association_id)
                return ReceiptOutcome("duplicate", int(existing.id), None)
            version = _next_version(s, r)
            inst = _new_instance(r, State.RECEIVED, None, version)
            s.add(inst)
            s.flush()
            _event(
                s,
                inst.id,
                State.RECEIVED.value,
                f"stored, version {version}"
                + (" (new content under a known UID)" if version > 1 else ""),
                association_id=r.association_id,
            )
            return ReceiptOutcome("stored", int(inst.id), version)
    except IntegrityError:  # the same content committed concurrently
        return ReceiptOutcome(
            "duplicate", _event_on_existing(url, r, "duplicate", dup_detail), None
        )


def _record_final(url: str, r: Receipt, state: State, reason: str, event_kind: str) -> str:
    """A new final row (``ignored``/``failed``) with its event, or, for content already
    recorded, an event on that row (``duplicate`` for an ignored re-send)."""
    ignored = state == State.IGNORED
    repeat_kind = "duplicate" if ignored else event_kind
    try:
        with session_scope(url) as s:
            existing = _find_receipt(s, r)
            if existing is not None:
                _event(s, existing.id, repeat_kind, reason, association_id=r.association_id)
                return "duplicate" if ignored else "refused"
            inst = _new_instance(r, state, reason, _next_version(s, r))
            s.add(inst)
            s.flush()
            _event(s, inst.id, event_kind, reason, association_id=r.association_id)
            return "ignored" if ignored else "refused"
    except IntegrityError:
        _event_on_existing(url, r, repeat_kind, reason)
        return "duplicate" if ignored else "refused"


def record_ignored(url: str, r: Receipt, reason: str) -> str:
    """An instance acknowledged but deliberately not classified (a filter's ``reason``;
    nothing is kept in the spool): a final ``ignored`` row. Returns ``ignored``, or
    ``duplicate`` when the same content was recorded before (a ``duplicate`` event)."""
    return _record_final(url, r, State.IGNORED, reason, State.IGNORED.value)


def record_refusal(url: str, r: Receipt, detail: str) -> str:
    """A C-STORE answered with a failure status (``detail`` names it): a final ``failed``
    row with a ``refused`` event, or a ``refused`` event on the row of the same content.
    Returns ``refused``."""
    return _record_final(url, r, State.FAILED, detail, "refused")


def spool_path_referenced(url: str, rel_path: str) -> bool:
    """Whether a committed audit row points at this spool file (False when the database
    cannot say)."""
    try:
        with session_scope(url) as s:
            row = s.execute(
                select(Instance.id).where(Instance.spool_path == rel_path).limit(1)
            ).first()
            return row is not None
    except Exception:
        return False


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


SendDeliver = Callable[[int, int | None], None]  # (instance id, attempt or None)


def requeue_undelivered(
    url: str, send: SendDeliver, stale_after: float, orphan_grace: float = 5.0
) -> int:
    """Send the due delivery retries (:func:`take_due_delivery_retries`), then re-send the
    delivery of instances left ``classified`` (not finished, no retry waiting):

    * **orphans of a delivery lane**, at once: ``claimed_by`` names a lane
      (:data:`LANE_OWNER_PREFIX`) whose lease has lapsed or is gone (its process was
      killed with the delivery in the lane; the classify task had already been acked, so
      the broker will not redeliver it), ``orphan_grace`` seconds after classification;
    * any other, once older than ``stale_after`` seconds (a worker died between
      classification and delivery, or a retry countdown was lost with it).

    A re-sent instance loses its lane owner (the ``cxr.deliver_instance`` task now has it)
    and gets a ``delivery_requeued`` event. Returns the count."""
    n = 0
    for instance_id, attempt in take_due_delivery_retries(url):
        try:
            send(instance_id, attempt)
        except Exception as exc:
            # put it back: the next sweep tries again
            schedule_delivery_retry(url, instance_id, attempt, 0)
            log.warning("delivery retry sweep: broker unavailable (%s)", type(exc).__name__)
            return n
        log.info("instance %d: delivery attempt %d sent (was waiting)", instance_id, attempt)
        n += 1
    now = utcnow()
    cutoff = now - timedelta(seconds=stale_after)
    live_lane = exists().where(Lease.name == Instance.claimed_by, Lease.expires_at > now)
    orphan = (
        Instance.claimed_by.like(f"{LANE_OWNER_PREFIX}%")
        & ~live_lane
        & (Instance.updated_at <= now - timedelta(seconds=orphan_grace))
    )
    with session_scope(url) as s:
        rows = s.execute(
            select(Instance.id, orphan).where(
                Instance.state == State.CLASSIFIED.value,
                Instance.finished_at.is_(None),
                Instance.retry_due_at.is_(None),
                (Instance.updated_at <= cutoff) | orphan,
            )
        ).all()
    stale = 0
    for instance_id, orphaned in rows:
        try:
            send(instance_id, None)
        except Exception as exc:
            log.warning("undelivered sweep: broker unavailable (%s)", type(exc).__name__)
            break
        why = "its worker's delivery lane is gone" if orphaned else "left classified"
        with session_scope(url) as s:  # re-sent now: not stale again until stale_after
            s.execute(
                update(Instance)
                .where(Instance.id == instance_id, Instance.state == State.CLASSIFIED.value)
                .values(updated_at=utcnow(), claimed_by=None)
            )
            _event(s, instance_id, "delivery_requeued", f"delivery re-sent: {why}")
        log.info("instance %d: delivery re-sent (%s)", instance_id, why)
        stale += 1
    if stale:
        log.info("undelivered sweep re-sent %d instance(s)", stale)
    return n + stale


def release_delivery_owner(url: str, instance_id: int, owner: str) -> bool:
    """The lane ``owner``'s first delivery attempt of the instance is over (delivered,
    failed, or a retry scheduled): from now on the retry machinery has it, so a later death
    of that lane's process must not make it an orphan. Clears ``claimed_by`` if it still
    names ``owner``; True when it did."""
    with session_scope(url) as s:
        res = s.execute(
            update(Instance)
            .where(Instance.id == instance_id, Instance.claimed_by == owner)
            .values(claimed_by=None)
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]


def prune_lane_leases(url: str, older_than: float = 86400.0) -> int:
    """Delete the leases of delivery lanes that lapsed more than ``older_than`` seconds ago
    (one row per worker process that ever had a lane). An instance still naming such a
    lane is an orphan either way (:func:`requeue_undelivered`). Returns the count."""
    cutoff = utcnow() - timedelta(seconds=older_than)
    with session_scope(url) as s:
        res = s.execute(
            delete(Lease).where(
                Lease.name.like(f"{LANE_OWNER_PREFIX}%"), Lease.expires_at <= cutoff
            )
        )
        return int(res.rowcount or 0)  # type: ignore[attr-defined]


# ------------------------------------------------------------- one sweeper per interval
#: the lease the re-queue sweep runs under (``leases.name``)
SWEEP_LEASE = "requeue-sweep"


def take_lease(
    url: str, name: str, holder: str, seconds: float, now: datetime | None = None
) -> bool:
    """Take or renew the lease ``name`` for ``seconds``. True when ``holder`` holds it now:
    it was free, expired, or already ``holder``'s. One conditional UPDATE (or the first
    INSERT) decides, so of two processes asking at once exactly one gets it, on SQLite
    (one writer at a time) as on PostgreSQL (the second UPDATE re-reads the row the first
    committed and no longer matches). Times are the callers' clocks (UTC): processes on
    hosts whose clocks differ by more than the lease's margin could overlap once."""
    now = now or utcnow()
    until = now + timedelta(seconds=seconds)
    with session_scope(url) as s:
        res = s.execute(
            update(Lease)
            .where(Lease.name == name, or_(Lease.holder == holder, Lease.expires_at <= now))
            .values(holder=holder[:128], expires_at=until, renewed_at=now)
        )
        if res.rowcount == 1:  # type: ignore[attr-defined]
            return True
        if s.get(Lease, name) is not None:
            return False  # held by another process
    try:
        with session_scope(url) as s:
            s.add(Lease(name=name, holder=holder[:128], expires_at=until, renewed_at=now))
        return True
    except IntegrityError:  # another process inserted it first
        return False


def release_lease(url: str, name: str, holder: str) -> bool:
    """Give the lease up at once (a clean stop), if ``holder`` holds it. True when it did."""
    with session_scope(url) as s:
        res = s.execute(
            update(Lease)
            .where(Lease.name == name, Lease.holder == holder)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]


def lease_holder(url: str, name: str) -> str | None:
    """Who holds the lease now (None: nobody, or expired)."""
    with session_scope(url) as s:
        row = s.get(Lease, name)
        if row is None or (aware(row.expires_at) or utcnow()) <= utcnow():
            return None
        return row.holder


@dataclass
class SweepResult:
    """One :func:`sweep`: ``ran`` is False when another process held the lease (then
    nothing was sent); the counts of what was re-sent; the queue depth."""

    ran: bool
    stranded: int = 0
    undelivered: int = 0
    queue_depth: int | None = None

    @property
    def sent(self) -> int:
        return self.stranded + self.undelivered


def sweep(
    settings: Settings,
    send: Send,
    send_deliver: SendDeliver | None,
    *,
    holder: str,
    received_older_than: float = 5.0,
) -> SweepResult:
    """The re-queue sweep, at most one process per ``CXR_REQUEUE_INTERVAL``.

    It re-sends instances stranded in ``received`` (the broker was down at receipt) or
    stuck in ``queued``/``processing`` (:func:`requeue_stranded`), then due delivery
    retries and undelivered ``classified`` instances (:func:`requeue_undelivered`; without
    ``send_deliver`` that part is skipped), and sets the queue depth gauge.

    **Who sweeps.** The node does, by default (``StorageNode(sweep=True)``, ``cxr node``;
    ``cxr worker`` sweeps only with ``--sweep``, and ``cxr run`` passes it to no worker):

    * there is exactly one node per site by construction (it owns the DICOM port; in
      docker-compose.yml it publishes 11112, so ``--scale`` applies to workers only),
      while workers are identical replicas, 0 to N of them, none of which can be "the
      first" in compose;
    * the node creates the ``received`` rows whose hand-off failed, so re-sending them is
      the rest of its own hand-off; it already holds the broker producer for it, and the
      sweep only publishes (it needs no consumer, which is what a worker adds);
    * it keeps running while no worker does (all restarting, a model warm-up of minutes):
      what it re-sends waits in the broker, and the tasks are idempotent (the claim skips
      a final or live-held instance), so a duplicate message costs a no-op.

    **The lease.** Whoever calls it, the sweep first takes the :data:`SWEEP_LEASE` lease
    for 1.5 intervals (:func:`take_lease`); a process that does not get it sends nothing.
    The holder renews it on each pass, so one sweeper keeps it, and another takes over
    within 1.5 intervals of the holder dying; a clean stop releases it. Two nodes, or a
    ``cxr worker --sweep`` next to the node, therefore never both re-send an instance."""
    url = settings.database_url
    seconds = 1.5 * float(settings.requeue_interval)
    if not take_lease(url, SWEEP_LEASE, holder, seconds):
        log.debug("re-queue sweep: the lease is held by another process")
        return SweepResult(False, queue_depth=queue_depth(settings))
    res = SweepResult(True)
    res.stranded = requeue_stranded(settings, send, received_older_than)
    if send_deliver is not None:
        # the rows say what awaits delivery: a classified, unfinished instance exists only
        # where some worker had destinations, whatever the sweeper's own CXR_DESTINATIONS
        res.undelivered = requeue_undelivered(url, send_deliver, settings.requeue_stale_after)
    prune_lane_leases(url)
    res.queue_depth = queue_depth(settings)
    return res


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
    points at the same content) and the SC/SR/heat-map results built for it; sets ``spool_path`` to
    NULL and appends a ``spool_purged`` event, so the audit trail records the deletion.
    Audit rows themselves are never deleted.
    """
    res = CleanupResult()
    days = settings.spool_retention_days if retention_days is None else retention_days  # type: ignore[attr-defined]
    if not days or days <= 0:
        return res
    current = now if isinstance(now, datetime) else datetime.now(UTC)
    cutoff = current - timedelta(days=float(days))
    spool = Spool(settings.spool_dir)  # type: ignore[attr-defined]
    url = settings.database_url  # type: ignore[attr-defined]
    with session_scope(url) as s:
        done_at = Instance.finished_at
        old = s.execute(
            select(Instance.id, Instance.spool_path).where(
                final_clause(),
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
                    select(
                        Inference.sc_sop_instance_uid,
                        Inference.sr_sop_instance_uid,
                        Inference.hm_sop_instance_uid,
                    ).where(Inference.instance_id.in_(chunk))
                ).all()
                for uid in row
                if uid
            ]
            if result_uids:  # results shared with a retained instance (the same image
                # re-sent under its UID keys its results alike) stay for that one
                shared: set[str] = set()
                for m in range(0, len(result_uids), 300):
                    part = result_uids[m : m + 300]
                    for row in s.execute(
                        select(
                            Inference.instance_id,
                            Inference.sc_sop_instance_uid,
                            Inference.sr_sop_instance_uid,
                            Inference.hm_sop_instance_uid,
                        )
                        .join(Instance, Instance.id == Inference.instance_id)
                        .where(Instance.spool_path.is_not(None))
                        .where(
                            Inference.sc_sop_instance_uid.in_(part)
                            | Inference.sr_sop_instance_uid.in_(part)
                            | Inference.hm_sop_instance_uid.in_(part)
                        )
                    ).all():
                        if row[0] not in old_ids:
                            shared.update(u for u in row[1:] if u)
                result_uids = [u for u in result_uids if u not in shared]
            chunk_set = set(chunk)
            paths: list[Path] = [
                spool.resolve(p)
                for i, p in old
                if i in chunk_set and p is not None and p not in kept_paths
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


# ------------------------------------------------------------------ what "final" means
def is_final(state: str, finished_at: datetime | None) -> bool:
    """Final for good: a FINAL_STATES state, or ``classified`` closed for lack of
    destinations (``finished_at`` set). :func:`final_clause` is the same rule in SQL."""
    if state in {s.value for s in FINAL_STATES}:
        return True
    return state == State.CLASSIFIED.value and finished_at is not None


def final_clause() -> ColumnElement[bool]:
    """SQL condition of :func:`is_final` on ``instances``."""
    return or_(
        Instance.state.in_([st.value for st in FINAL_STATES]),
        and_(Instance.state == State.CLASSIFIED.value, Instance.finished_at.is_not(None)),
    )


def _event(
    s: Session,
    instance_id: int,
    kind: str,
    detail: str | None = None,
    *,
    association_id: int | None = None,
) -> None:
    s.add(Event(instance_id=instance_id, kind=kind, detail=detail, association_id=association_id))


def count_by_state(url: str) -> dict[str, int]:
    with session_scope(url) as s:
        rows = s.execute(select(Instance.state, func.count()).group_by(Instance.state)).all()
    return {str(st): int(n) for st, n in rows}


def finished_since(url: str, since: datetime) -> list[tuple[Instance, Inference | None]]:
    """Instances that reached a final state (updated since ``since``), oldest first, each
    with its newest inference (detached rows, for reports)."""
    out: list[tuple[Instance, Inference | None]] = []
    with session_scope(url) as s:
        rows = s.scalars(
            select(Instance)
            .where(final_clause(), Instance.updated_at >= since)
            .order_by(Instance.updated_at, Instance.id)
        ).all()
        for row in rows:
            inf = s.scalars(
                select(Inference)
                .where(Inference.instance_id == row.id)
                .order_by(Inference.id.desc())
                .limit(1)
            ).first()
            out.append((row, inf))
        s.expunge_all()
    return out


# ------------------------------------------------------------------ claim (processing)
def _requeued_since_claim(s: Session, instance_id: int) -> bool:
    """True when the re-queue sweep re-sent the instance after its last claim, i.e. it
    judged that claim stale (the sweep also refreshes ``updated_at``, so the age test
    alone would refuse the very message the sweep sent)."""
    last = dict(
        s.execute(
            select(Event.kind, func.max(Event.id))
            .where(Event.instance_id == instance_id, Event.kind.in_(["processing", "requeued"]))
            .group_by(Event.kind)
        )
        .tuples()
        .all()
    )
    return last.get("requeued", -1) > last.get("processing", -1) >= 0


def claim(
    url: str,
    instance_id: int,
    task_id: str | None,
    *,
    stale_after: float,
    max_claims: int,
    force: bool = False,
) -> tuple[str, str | None]:
    """Take an instance for classification. Returns ``(decision, state)`` with decision
    ``classify`` (the caller now holds it in ``processing``, ``claimed_by`` = its task id),
    ``deliver`` (already classified), or ``skip`` (final, missing, held by another live
    worker, or - after ``max_claims`` claims, e.g. a worker that keeps dying on it -
    closed as ``failed``)."""
    now = utcnow()
    with session_scope(url) as s:
        inst = s.execute(
            select(Instance).where(Instance.id == instance_id).with_for_update()
        ).scalar_one_or_none()
        if inst is None:
            log.warning("instance %d not found: skipped", instance_id)
            return "skip", None
        state = inst.state
        if is_final(state, aware(inst.finished_at)) and not force:
            log.info("instance %d already final (%s): skipped", instance_id, state)
            return "skip", state
        if state == State.CLASSIFIED.value and not force:
            return "deliver", state
        if state == State.IGNORED.value:
            return "skip", state  # deliberately not classified, even when forced
        if state == State.PROCESSING.value and not force:
            updated = aware(inst.updated_at) or now
            stale = updated <= now - timedelta(seconds=stale_after)
            mine = task_id is not None and inst.claimed_by == task_id
            stale = stale or _requeued_since_claim(s, instance_id)
            if not (stale or mine):
                log.info("instance %d is being processed by another worker: skipped", instance_id)
                return "skip", state
            detail = "stale claim taken over" if stale else "redelivered task resumes"
            _event(s, instance_id, "takeover", detail)
        if (inst.attempts or 0) >= max_claims and not force:
            reason = f"gave up after {inst.attempts} attempts (worker lost or time limit)"
            inst.state = State.FAILED.value
            inst.reason = reason
            inst.finished_at = now
            _event(s, instance_id, State.FAILED.value, reason)
            log.warning("instance %d failed: %s", instance_id, reason)
            return "skip", State.FAILED.value
        inst.state = State.PROCESSING.value
        inst.attempts = (inst.attempts or 0) + 1
        inst.claimed_by = task_id
        inst.finished_at = None
        inst.reason = None
        _event(
            s, instance_id, State.PROCESSING.value, f"task {task_id or '-'} attempt {inst.attempts}"
        )
        return "classify", State.PROCESSING.value


def mark_failed(url: str, instance_id: int, reason: str, state: State = State.FAILED) -> bool:
    """Close an instance for good with its reason (``failed`` or ``delivery_failed``).
    False when another attempt finished it meanwhile (nothing changed)."""
    with session_scope(url) as s:
        inst = s.get(Instance, instance_id)
        if inst is None:
            return False
        if (
            is_final(inst.state, aware(inst.finished_at))
            and inst.state != State.DELIVERY_FAILED.value
        ):
            return False
        inst.state = state.value
        inst.reason = reason
        inst.finished_at = utcnow()
        inst.retry_due_at = None
        inst.retry_attempt = None
        _event(s, instance_id, state.value, reason)
    return True


def release_claim(url: str, instance_id: int, detail: str) -> None:
    """Put a ``processing`` instance back to ``queued`` before a retry."""
    with session_scope(url) as s:
        inst = s.get(Instance, instance_id)
        if inst is not None and inst.state == State.PROCESSING.value:
            inst.state = State.QUEUED.value
            _event(s, instance_id, "retry", detail)


# ------------------------------------------------------------------ inference
class SourceRef(NamedTuple):
    """Where an instance's received file is, and which content version of its SOP
    Instance UID it is (1 + the number of other contents received under that UID before)."""

    spool_path: str | None
    sop_instance_uid: str
    version: int


def earlier_contents(url: str, instance_id: int) -> list[tuple[int, int, str]]:
    """``(instance id, version, spool_path)`` of the contents received before this
    instance under the same SOP Instance UID, in the same study and for the same (hashed)
    patient, whose file is still in the spool; oldest first."""
    with session_scope(url) as s:
        me = s.get(Instance, instance_id)
        if me is None:
            return []
        rows = s.execute(
            select(Instance.id, Instance.version, Instance.spool_path)
            .where(
                Instance.sop_instance_uid == me.sop_instance_uid,
                Instance.version < me.version,
                Instance.spool_path.is_not(None),
                Instance.study_instance_uid.is_not_distinct_from(me.study_instance_uid),
                Instance.patient_id_hash.is_not_distinct_from(me.patient_id_hash),
            )
            .order_by(Instance.version)
        ).all()
    return [(int(i), int(v), str(p)) for i, v, p in rows]


def recorded_result_uids(url: str, instance_id: int, model_version: str) -> dict[str, str] | None:
    """The result UIDs an instance's inference by this model version was built with
    (``sc_series``, ``sc_sop``, ``sr_series``, ``sr_sop``, ``hm_series``, ``hm_sop``; an
    object not built has no key), or None when it has no such inference."""
    with session_scope(url) as s:
        inf = s.execute(
            select(Inference).where(
                Inference.instance_id == instance_id, Inference.model_version == model_version
            )
        ).scalar_one_or_none()
        if inf is None or not inf.sc_sop_instance_uid:
            return None
        cols = {
            "sc_series": inf.sc_series_uid,
            "sc_sop": inf.sc_sop_instance_uid,
            "sr_series": inf.sr_series_uid,
            "sr_sop": inf.sr_sop_instance_uid,
            "hm_series": inf.hm_series_uid,
            "hm_sop": inf.hm_sop_instance_uid,
        }
        return {k: str(v) for k, v in cols.items() if v}


def source_of(url: str, instance_id: int) -> SourceRef | None:
    """The :class:`SourceRef` of an instance, None when the row is gone."""
    with session_scope(url) as s:
        inst = s.get(Instance, instance_id)
        if inst is None:
            return None
        return SourceRef(inst.spool_path, inst.sop_instance_uid, int(inst.version or 1))


@dataclass
class InferenceRecord:
    """What one classification produced (the ``inferences`` row, upserted by model version)."""

    model_version: str
    model_sha256: str
    engine: str | None
    probabilities: dict[str, float]
    verdict: str
    ood_score: float | None
    ood: bool | None
    sc_series_uid: str
    sc_sop_instance_uid: str
    sr_series_uid: str | None
    sr_sop_instance_uid: str | None
    timings_ms: dict[str, float]
    hm_series_uid: str | None = None
    hm_sop_instance_uid: str | None = None


NO_DESTINATIONS = "no destinations configured"


def record_classification(
    url: str,
    instance_id: int,
    rec: InferenceRecord,
    detail: str,
    no_destinations: bool,
    delivery_owner: str | None = None,
) -> None:
    """Upsert the inference and move the instance to ``classified`` (final at once when
    there are no destinations). ``delivery_owner``: the delivery lane that will make the
    first delivery attempt (its lease name, :data:`LANE_OWNER_PREFIX`), kept in
    ``claimed_by`` so that the sweep re-sends the delivery as soon as that lane's lease
    lapses (:func:`requeue_undelivered`)."""
    now = utcnow()
    t = rec.timings_ms
    with session_scope(url) as s:
        inf = s.execute(
            select(Inference).where(
                Inference.instance_id == instance_id, Inference.model_version == rec.model_version
            )
        ).scalar_one_or_none()
        if inf is None:
            inf = Inference(instance_id=instance_id, model_version=rec.model_version)
            s.add(inf)
        inf.created_at = now
        inf.model_sha256 = rec.model_sha256
        inf.engine = rec.engine
        inf.p_covid = rec.probabilities.get("COVID", 0.0)
        inf.p_normal = rec.probabilities.get("Normal", 0.0)
        inf.p_other = rec.probabilities.get("Other", 0.0)
        inf.verdict = rec.verdict
        inf.ood_score = rec.ood_score
        inf.ood = rec.ood
        inf.sc_series_uid = rec.sc_series_uid
        inf.sc_sop_instance_uid = rec.sc_sop_instance_uid
        inf.sr_series_uid = rec.sr_series_uid
        inf.sr_sop_instance_uid = rec.sr_sop_instance_uid
        inf.hm_series_uid = rec.hm_series_uid
        inf.hm_sop_instance_uid = rec.hm_sop_instance_uid
        inf.t_decode_ms = t.get("decode")
        inf.t_preprocess_ms = t.get("preprocess")
        inf.t_forward_ms = t.get("forward")
        inf.t_cam_ms = t.get("cam")
        inf.t_build_ms = t.get("build")
        inf.t_send_ms = None
        inf.t_total_ms = sum(t.values())  # processing so far; finish_delivery adds send
        inst = s.get(Instance, instance_id)
        assert inst is not None
        inst.state = State.CLASSIFIED.value
        inst.reason = NO_DESTINATIONS if no_destinations else None
        inst.finished_at = now if no_destinations else None
        if delivery_owner is not None and not no_destinations:
            inst.claimed_by = delivery_owner[:64]
        _event(
            s,
            instance_id,
            State.CLASSIFIED.value,
            detail + (f"; {NO_DESTINATIONS}" if no_destinations else ""),
        )


# ------------------------------------------------------------------ delivery
D_PENDING = "pending"
D_DELIVERED = "delivered"
D_WARNING = "delivered_with_warning"
D_FAILED = "failed"
D_NOT_SUPPORTED = "not_supported"  # an optional result the destination does not take
DELIVERED_ROW_STATES = (D_DELIVERED, D_WARNING)
DONE_ROW_STATES = (*DELIVERED_ROW_STATES, D_NOT_SUPPORTED)  # never sent again


#: the Delivery.kind of an HL7 ORU^R01 result message (its row's SOP Instance UID is the
#: SC's: one message per classified image and model version)
ORU_KIND = "ORU"


@dataclass
class ReportFacts:
    """What a result message to a RIS says (HL7 ORU^R01), from the audit rows only.

    ``patient_id`` is the PatientID *as stored* (``Instance.patient_id_hash``): the salted
    HMAC with the default ``CXR_PATIENT_ID_STORAGE=hash``, the plain ID only where the
    site chose ``plain``. The patient's name is never stored, so never sent."""

    accession_number: str | None
    study_instance_uid: str | None
    sop_instance_uid: str
    patient_id: str | None
    verdict: str
    probabilities: dict[str, float]
    model_version: str
    ood: bool | None
    classified_at: datetime | None
    sc_sop_instance_uid: str


@dataclass
class DeliveryPlan:
    """What delivery needs to know about an instance."""

    state: str
    inference_id: int | None
    results: list[tuple[str, str]]  # (kind "SC"/"SR"/"HM", SOP Instance UID)
    done: set[tuple[str, str]]  # (destination, SOP Instance UID) already acknowledged
    received_at: datetime | None
    report: ReportFacts | None = None  # None without an inference

    @property
    def report_uid(self) -> str | None:
        """The UID an ORU^R01 delivery row is recorded under (the SC's)."""
        return self.report.sc_sop_instance_uid if self.report else None


def delivery_plan(url: str, instance_id: int) -> DeliveryPlan | None:
    """The instance's state, its newest inference's results and the (destination, UID)
    pairs already delivered; None when the row is gone."""
    with session_scope(url) as s:
        inst = s.get(Instance, instance_id)
        if inst is None:
            return None
        inf = s.execute(
            select(Inference)
            .where(Inference.instance_id == instance_id)
            .order_by(Inference.created_at.desc(), Inference.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        results: list[tuple[str, str]] = []
        report = None
        if inf is not None:
            if inf.sc_sop_instance_uid:
                results.append(("SC", inf.sc_sop_instance_uid))
                report = ReportFacts(
                    accession_number=inst.accession_number,
                    study_instance_uid=inst.study_instance_uid,
                    sop_instance_uid=inst.sop_instance_uid,
                    patient_id=inst.patient_id_hash,
                    verdict=inf.verdict,
                    probabilities={
                        "COVID": float(inf.p_covid),
                        "Normal": float(inf.p_normal),
                        "Other": float(inf.p_other),
                    },
                    model_version=inf.model_version,
                    ood=inf.ood,
                    classified_at=aware(inf.created_at),
                    sc_sop_instance_uid=inf.sc_sop_instance_uid,
                )
            if inf.sr_sop_instance_uid:
                results.append(("SR", inf.sr_sop_instance_uid))
            if inf.hm_sop_instance_uid:
                results.append(("HM", inf.hm_sop_instance_uid))
        done = {
            (d.destination, d.sop_instance_uid)
            for d in s.execute(
                select(Delivery).where(Delivery.instance_id == instance_id)
            ).scalars()
            if d.state in DONE_ROW_STATES
        }
        return DeliveryPlan(
            inst.state, inf.id if inf else None, results, done, aware(inst.received_at), report
        )


def close_without_destinations(url: str, instance_id: int) -> None:
    """A classified instance with nothing to deliver to: final as ``classified``."""
    with session_scope(url) as s:
        inst = s.get(Instance, instance_id)
        if inst is not None and inst.finished_at is None:
            inst.finished_at = utcnow()
            inst.reason = NO_DESTINATIONS
            inst.state = State.CLASSIFIED.value
            _event(s, instance_id, State.CLASSIFIED.value, NO_DESTINATIONS)


@dataclass
class Attempt:
    """One result's outcome at one destination (category: success/warning/failure/...)."""

    kind: str
    sop_instance_uid: str
    category: str
    status: str | None
    error: str | None


def record_delivery_attempts(
    url: str, instance_id: int, destination: str, attempts: Sequence[Attempt]
) -> None:
    """One ``deliveries`` row per (destination, result), its attempt count and outcome."""
    now = utcnow()
    with session_scope(url) as s:
        for a in attempts:
            row = s.execute(
                select(Delivery).where(
                    Delivery.instance_id == instance_id,
                    Delivery.destination == destination,
                    Delivery.sop_instance_uid == a.sop_instance_uid,
                )
            ).scalar_one_or_none()
            if row is None:
                row = Delivery(
                    instance_id=instance_id,
                    destination=destination,
                    kind=a.kind,
                    sop_instance_uid=a.sop_instance_uid,
                )
                row.attempts = 0
                s.add(row)
            row.attempts = (row.attempts or 0) + 1
            row.last_status = a.status
            if a.category == "success":
                row.state, row.delivered_at, row.last_error = D_DELIVERED, now, None
            elif a.category == "warning":
                row.state, row.delivered_at, row.last_error = D_WARNING, now, a.error
            elif a.category == "not_supported":
                row.state, row.last_error = D_NOT_SUPPORTED, (a.error or a.category)[:2000]
            else:
                row.state = D_FAILED
                row.last_error = (a.error or a.category)[:2000]


def finish_delivery(
    url: str,
    instance_id: int,
    inference_id: int | None,
    send_ms: float,
    problems: Sequence[str],
    final_attempt: bool,
    delivered_detail: str,
) -> datetime:
    """After a delivery attempt: the send time on the inference, and the instance
    ``delivered`` (no problems), ``delivery_failed`` (problems on the final attempt) or
    back to ``classified`` with a ``retry`` event. Returns the time it was recorded."""
    now = utcnow()
    with session_scope(url) as s:
        inf_row = s.get(Inference, inference_id) if inference_id is not None else None
        if inf_row is not None:
            inf_row.t_send_ms = send_ms  # the last delivery attempt
            parts = [
                inf_row.t_decode_ms,
                inf_row.t_preprocess_ms,
                inf_row.t_forward_ms,
                inf_row.t_cam_ms,
                inf_row.t_build_ms,
                inf_row.t_send_ms,
            ]
            inf_row.t_total_ms = sum(p or 0.0 for p in parts)  # processing, no queue wait
        inst = s.get(Instance, instance_id)
        assert inst is not None
        if not problems:
            inst.state = State.DELIVERED.value
            inst.reason = None
            inst.finished_at = now
            _event(s, instance_id, State.DELIVERED.value, delivered_detail)
        elif final_attempt:
            inst.state = State.DELIVERY_FAILED.value
            inst.reason = "; ".join(problems)[:2000]
            inst.finished_at = now
            _event(s, instance_id, State.DELIVERY_FAILED.value, inst.reason)
        else:
            inst.state = State.CLASSIFIED.value  # an admin re-send from delivery_failed
            _event(s, instance_id, "retry", "delivery: " + "; ".join(problems)[:1900])
    return now


# ------------------------------------------------------------------------- admin retry
@dataclass
class RetryOutcome:
    """What :func:`retry` did: the reset instances, why others were not retriable, and
    which tasks reached the broker (the rest are reset and the sweep queues them)."""

    actions: list[Any]  # db.queries.RetryAction
    notes: list[str]
    sent: set[int]
    pending: set[int]


def send_retries(settings: Settings, actions: Sequence[Any]) -> tuple[set[int], set[int]]:
    """Send the task of every reset instance (``cxr audit retry``, the web console's
    Retry); returns (sent ids, not sent ids). A ``failed`` instance is handed off
    (``received`` -> ``queued``) exactly as the node does after receipt."""
    from cxr.celery_app import get_app
    from cxr.contracts import QUEUE, TASK_CLASSIFY, send_classify

    app = get_app(settings)
    sent: set[int] = set()
    pending: set[int] = set()
    fail_fast = {"max_retries": 0, "interval_start": 0, "interval_step": 0, "interval_max": 0}
    for a in actions:
        try:
            if a.task == TASK_CLASSIFY:
                ok = hand_off(
                    settings.database_url, [a.instance_id], lambda i: send_classify(app, i)
                )
                if not ok:
                    raise ConnectionError("broker unavailable")
            else:
                app.send_task(
                    a.task, args=[a.instance_id], queue=QUEUE, retry=True, retry_policy=fail_fast
                )
            sent.add(a.instance_id)
        except Exception as exc:
            log.warning("retry of instance %d not queued: %s", a.instance_id, type(exc).__name__)
            pending.add(a.instance_id)
    return sent, pending


def retry(
    settings: Settings,
    *,
    uid: str | None = None,
    state: str | None = None,
    instance_id: int | None = None,
    limit: int | None = None,
    who: str = "admin",
) -> RetryOutcome:
    """Reset retriable instances (one audit row, every version of one SOP Instance UID,
    or all in ``state``) with a
    ``retry`` event naming ``who``, commit, then send their tasks."""
    from db.queries import prepare_retry

    with session_scope(settings.database_url) as s:
        actions, notes = prepare_retry(
            s, uid=uid, state=state, instance_id=instance_id, limit=limit, who=who
        )
    if not actions:
        return RetryOutcome([], notes, set(), set())
    sent, pending = send_retries(settings, actions)
    return RetryOutcome(actions, notes, sent, pending)
