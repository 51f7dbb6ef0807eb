"""Read (and retry) queries over the audit trail, shared by ``cxr audit`` and tests.

Everything here is plain SQLAlchemy 2 and works the same on SQLite and PostgreSQL;
percentiles are computed in Python (:func:`percentile`) for that reason.

Time stamps: the columns are ``DateTime(timezone=True)``; PostgreSQL returns aware values,
SQLite naive ones that are UTC. :func:`aware` makes both aware UTC.

No patient name is stored anywhere; the only patient data shown is the salted
``patient_id_hash`` (or the plain ID when ``CXR_PATIENT_ID_STORAGE=plain``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from db.models import Association, Delivery, Event, Inference, Instance, State, utcnow

log = logging.getLogger(__name__)

STAGES = ("decode", "preprocess", "forward", "cam", "build", "send", "total")
DELIVERED_STATES = ("delivered", "delivered_with_warning")
RETRIABLE_STATES = (State.FAILED.value, State.DELIVERY_FAILED.value)
NO_VERDICT = "-"  # verdict label of instances without an inference (stats)


def aware(dt: datetime | None) -> datetime | None:
    """UTC-aware datetime (SQLite gives naive UTC values back)."""
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def parse_when(text: str, end: bool = False) -> datetime:
    """``YYYY-MM-DD`` (a whole UTC day: its start, or with ``end`` the next day's start)
    or an ISO 8601 date-time (naive = UTC)."""
    text = text.strip()
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            dt = datetime.combine(d, time(0), tzinfo=UTC)
            return dt + timedelta(days=1) if end else dt
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD) or ISO date-time") from exc
    return aware(dt)  # type: ignore[return-value]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks
    (numpy's default 'linear' method). None for no values."""
    xs = sorted(float(v) for v in values if v is not None and math.isfinite(float(v)))
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ------------------------------------------------------------------------------- filters
@dataclass
class InstanceFilter:
    since: datetime | None = None  # received_at >= since
    until: datetime | None = None  # received_at < until
    states: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    calling_aes: list[str] = field(default_factory=list)
    patient_id_hashes: list[str] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0
    newest_first: bool = True


def _latest_inference_ids() -> Any:
    """Subquery: the newest inference of every instance (instance_id, inference id)."""
    return (
        select(Inference.instance_id, func.max(Inference.id).label("inference_id"))
        .group_by(Inference.instance_id)
        .subquery("latest")
    )


def _filtered(flt: InstanceFilter) -> Select[Instance, Inference]:
    latest = _latest_inference_ids()
    q = (
        select(Instance, Inference)
        .outerjoin(latest, latest.c.instance_id == Instance.id)
        .outerjoin(Inference, Inference.id == latest.c.inference_id)
    )
    if flt.since is not None:
        q = q.where(Instance.received_at >= flt.since)
    if flt.until is not None:
        q = q.where(Instance.received_at < flt.until)
    if flt.states:
        q = q.where(Instance.state.in_(flt.states))
    if flt.verdicts:
        q = q.where(func.lower(Inference.verdict).in_([v.lower() for v in flt.verdicts]))
    if flt.calling_aes:
        q = q.where(Instance.calling_ae.in_([a.strip() for a in flt.calling_aes]))
    if flt.patient_id_hashes:
        q = q.where(Instance.patient_id_hash.in_(flt.patient_id_hashes))
    order = Instance.id.desc() if flt.newest_first else Instance.id.asc()
    q = q.order_by(order)
    if flt.limit:
        q = q.limit(flt.limit)
    if flt.offset:
        q = q.offset(flt.offset)
    return q


def count_instances(session: Session, flt: InstanceFilter) -> int:
    """How many instances match ``flt`` (its limit and offset ignored): for paging."""
    unpaged = InstanceFilter(**{**flt.__dict__, "limit": None, "offset": 0})
    sub = _filtered(unpaged).order_by(None).subquery()
    return int(session.execute(select(func.count()).select_from(sub)).scalar_one())


@dataclass
class InstanceRow:
    """One line of ``cxr audit list`` / ``export``."""

    id: int
    received_at: datetime | None
    sop_instance_uid: str
    study_instance_uid: str | None
    accession_number: str | None
    patient_id_hash: str | None
    modality: str | None
    view_position: str | None
    calling_ae: str | None
    state: str
    reason: str | None
    attempts: int
    finished_at: datetime | None
    version: int
    size_bytes: int | None
    verdict: str | None = None
    p_covid: float | None = None
    p_normal: float | None = None
    p_other: float | None = None
    model_version: str | None = None
    timings_ms: dict[str, float | None] = field(default_factory=dict)
    delivered_at: datetime | None = None
    end_to_end_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "timings_ms"}
        for k, v in list(d.items()):
            if isinstance(v, datetime):
                d[k] = v.isoformat()
        for stage in STAGES:
            d[f"t_{stage}_ms"] = self.timings_ms.get(stage)
        return d


def _delivered_at(session: Session, ids: Iterable[int]) -> dict[int, datetime]:
    """Per instance: when its last result was acknowledged (max delivered_at)."""
    ids = list(ids)
    out: dict[int, datetime] = {}
    for chunk in range(0, len(ids), 500):
        part = ids[chunk : chunk + 500]
        rows = session.execute(
            select(Delivery.instance_id, func.max(Delivery.delivered_at))
            .where(Delivery.instance_id.in_(part), Delivery.state.in_(DELIVERED_STATES))
            .group_by(Delivery.instance_id)
        ).all()
        out.update({i: aware(t) for i, t in rows if t is not None})  # type: ignore[misc]
    return out


def _row(inst: Instance, inf: Inference | None, delivered_at: datetime | None) -> InstanceRow:
    received = aware(inst.received_at)
    r = InstanceRow(
        id=inst.id,
        received_at=received,
        sop_instance_uid=inst.sop_instance_uid,
        study_instance_uid=inst.study_instance_uid,
        accession_number=inst.accession_number,
        patient_id_hash=inst.patient_id_hash,
        modality=inst.modality,
        view_position=inst.view_position,
        calling_ae=inst.calling_ae,
        state=inst.state,
        reason=inst.reason,
        attempts=inst.attempts or 0,
        finished_at=aware(inst.finished_at),
        version=inst.version or 1,
        size_bytes=inst.size_bytes,
    )
    if inf is not None:
        r.verdict = inf.verdict
        r.p_covid, r.p_normal, r.p_other = inf.p_covid, inf.p_normal, inf.p_other
        r.model_version = inf.model_version
        r.timings_ms = {s: getattr(inf, f"t_{s}_ms") for s in STAGES}
    if inst.state == State.DELIVERED.value:
        r.delivered_at = delivered_at or aware(inst.finished_at)
        if r.delivered_at is not None and received is not None:
            r.end_to_end_ms = max(0.0, (r.delivered_at - received).total_seconds() * 1000.0)
    return r


def list_instances(session: Session, flt: InstanceFilter) -> list[InstanceRow]:
    pairs = session.execute(_filtered(flt)).all()
    delivered = _delivered_at(session, [i.id for i, _ in pairs if i.state == State.DELIVERED.value])
    return [_row(inst, inf, delivered.get(inst.id)) for inst, inf in pairs]


# --------------------------------------------------------------------------------- show
@dataclass
class InstanceHistory:
    instance: InstanceRow
    association: dict[str, Any] | None
    events: list[dict[str, Any]]
    inferences: list[dict[str, Any]]
    deliveries: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "instance": self.instance.as_dict(),
            "association": self.association,
            "events": self.events,
            "inferences": self.inferences,
            "deliveries": self.deliveries,
        }


def _iso(v: Any) -> Any:
    return aware(v).isoformat() if isinstance(v, datetime) else v  # type: ignore[union-attr]


def _columns(obj: Any, names: Sequence[str]) -> dict[str, Any]:
    return {n: _iso(getattr(obj, n)) for n in names}


def instance_history(session: Session, uid: str) -> list[InstanceHistory]:
    """Every received version of one SOP Instance UID with its whole story (oldest first).
    An integer audit row id is accepted too."""
    uid = uid.strip()
    q = select(Instance).where(Instance.sop_instance_uid == uid)
    if uid.isdigit() and "." not in uid:
        q = select(Instance).where((Instance.sop_instance_uid == uid) | (Instance.id == int(uid)))
    instances = session.execute(q.order_by(Instance.id)).scalars().all()
    out: list[InstanceHistory] = []
    delivered = _delivered_at(session, [i.id for i in instances])
    for inst in instances:
        infs = list(inst.inferences)
        row = _row(inst, infs[-1] if infs else None, delivered.get(inst.id))
        assoc = None
        if inst.association_id is not None:
            a = session.get(Association, inst.association_id)
            if a is not None:
                assoc = _columns(
                    a,
                    (
                        "id",
                        "calling_ae",
                        "called_ae",
                        "peer_host",
                        "peer_port",
                        "tls",
                        "started_at",
                        "ended_at",
                        "outcome",
                        "reason",
                    ),
                )
        events = [
            _columns(e, ("id", "at", "kind", "detail", "association_id")) for e in inst.events
        ]
        inferences = [
            _columns(
                i,
                (
                    "id",
                    "created_at",
                    "model_version",
                    "model_sha256",
                    "engine",
                    "verdict",
                    "p_covid",
                    "p_normal",
                    "p_other",
                    "ood_score",
                    "ood",
                    "sc_series_uid",
                    "sc_sop_instance_uid",
                    "sr_series_uid",
                    "sr_sop_instance_uid",
                    "hm_series_uid",
                    "hm_sop_instance_uid",
                )
                + tuple(f"t_{s}_ms" for s in STAGES),
            )
            for i in infs
        ]
        deliveries = [
            _columns(
                d,
                (
                    "id",
                    "destination",
                    "kind",
                    "sop_instance_uid",
                    "attempts",
                    "last_status",
                    "last_error",
                    "state",
                    "delivered_at",
                ),
            )
            for d in inst.deliveries
        ]
        out.append(InstanceHistory(row, assoc, events, inferences, deliveries))
    return out


# -------------------------------------------------------------------------------- stats
@dataclass
class LatencyStats:
    n: int
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None


@dataclass
class Stats:
    total: int
    per_state: dict[str, int]
    per_verdict: dict[str, int]
    latency: dict[str, LatencyStats]  # stage -> stats (STAGES + "end_to_end")

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "per_state": self.per_state,
            "per_verdict": self.per_verdict,
            "latency_ms": {k: v.__dict__ for k, v in self.latency.items()},
        }


def _latency(values: list[float]) -> LatencyStats:
    clean = [v for v in values if v is not None]
    return LatencyStats(
        n=len(clean),
        p50_ms=percentile(clean, 50),
        p95_ms=percentile(clean, 95),
        max_ms=max(clean) if clean else None,
    )


def compute_stats(session: Session, flt: InstanceFilter | None = None) -> Stats:
    """Counts per state and verdict, p50/p95 per stage (latest inference of each
    instance) and end to end (received_at -> last result acknowledged)."""
    flt = flt or InstanceFilter()
    flt = InstanceFilter(
        since=flt.since,
        until=flt.until,
        states=flt.states,
        verdicts=flt.verdicts,
        calling_aes=flt.calling_aes,
        patient_id_hashes=flt.patient_id_hashes,
        limit=None,
    )
    rows = list_instances(session, flt)
    per_state = Counter(r.state for r in rows)
    per_verdict = Counter(r.verdict or NO_VERDICT for r in rows)
    latency: dict[str, LatencyStats] = {}
    for stage in STAGES:
        latency[stage] = _latency([r.timings_ms.get(stage) for r in rows if r.timings_ms])  # type: ignore[misc]
    latency["end_to_end"] = _latency([r.end_to_end_ms for r in rows if r.end_to_end_ms is not None])
    order = [s.value for s in State]
    return Stats(
        total=len(rows),
        per_state={
            s: per_state[s]
            for s in sorted(
                per_state, key=lambda x: (x not in order, order.index(x) if x in order else 0, x)
            )
        },
        per_verdict=dict(sorted(per_verdict.items())),
        latency=latency,
    )


@dataclass
class TimeBucket:
    start: datetime
    per_state: dict[str, int]
    per_verdict: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat(),
            "per_state": self.per_state,
            "per_verdict": self.per_verdict,
        }


def counts_over_time(
    session: Session,
    since: datetime,
    until: datetime,
    buckets: int = 24,
    flt: InstanceFilter | None = None,
) -> list[TimeBucket]:
    """Instances received in [since, until) in ``buckets`` equal slices: counts per state
    and per verdict (latest inference; ``-`` without one) in each, oldest first. The rows
    are those of :func:`list_instances`, the query behind ``cxr audit stats``."""
    if until <= since or buckets < 1:
        raise ValueError("need since < until and at least one bucket")
    base = flt or InstanceFilter()
    q = _filtered(
        InstanceFilter(
            **{**base.__dict__, "since": since, "until": until, "limit": None, "offset": 0}
        )
    ).with_only_columns(Instance.received_at, Instance.state, Inference.verdict)
    width = (until - since) / buckets
    out = [TimeBucket(since + width * i, {}, {}) for i in range(buckets)]
    start = aware(since)
    assert start is not None
    # three columns per row, no ORM objects: a 90-day window of a busy site stays cheap
    for received_at, state, verdict in session.execute(q.order_by(None)):
        at = aware(received_at)
        if at is None:
            continue
        i = min(buckets - 1, max(0, int((at - start) / width)))
        b = out[i]
        b.per_state[state] = b.per_state.get(state, 0) + 1
        v = verdict or NO_VERDICT
        b.per_verdict[v] = b.per_verdict.get(v, 0) + 1
    return out


# -------------------------------------------------------------------------------- retry
@dataclass
class RetryAction:
    instance_id: int
    sop_instance_uid: str
    from_state: str
    to_state: str
    task: str


def retry_candidates(
    s: Session, *, uid: str | None = None, state: str | None = None
) -> list[tuple[int, str, str]]:
    """(id, SOP Instance UID, state) of the instances ``cxr audit retry --dry-run`` would
    reset: the one with ``uid``, else those in ``state``; oldest first."""
    q = select(Instance.id, Instance.sop_instance_uid, Instance.state)
    q = q.where(Instance.sop_instance_uid == uid) if uid else q.where(Instance.state == state)
    return [(int(i), str(u), str(st)) for i, u, st in s.execute(q.order_by(Instance.id))]


def prepare_retry(
    session: Session,
    uid: str | None = None,
    state: str | None = None,
    limit: int | None = None,
    who: str = "admin",
    instance_id: int | None = None,
) -> tuple[list[RetryAction], list[str]]:
    """Reset retriable instances (``failed`` -> ``received``, ``delivery_failed`` ->
    ``classified``; ``attempts`` back to 0, reason cleared), add a ``retry`` event, and
    say which task each needs (``cxr.classify_instance`` for ``failed``). A ``failed``
    instance without a spool file (refused by the node at receipt) is not retriable. Returns
    (actions, notes about instances that are not retriable). The caller commits, then
    sends the tasks."""
    from cxr.contracts import TASK_CLASSIFY, TASK_DELIVER

    if sum(x is not None for x in (uid, state, instance_id)) != 1:
        raise ValueError("give a SOP Instance UID, an audit row id or a state")
    q = select(Instance)
    if instance_id is not None:
        q = q.where(Instance.id == instance_id)
    elif uid is not None:
        q = q.where(Instance.sop_instance_uid == uid.strip())
    else:
        if state not in RETRIABLE_STATES:
            raise ValueError(f"state must be one of {', '.join(RETRIABLE_STATES)}")
        q = q.where(Instance.state == state)
    q = q.order_by(Instance.id)
    if limit:
        q = q.limit(limit)
    notes: list[str] = []
    actions: list[RetryAction] = []
    now = utcnow()
    for inst in session.execute(q.with_for_update()).scalars():
        if inst.state == State.FAILED.value and not inst.spool_path:
            notes.append(
                f"instance {inst.id} was refused at receipt (nothing stored): not retriable"
            )
            continue
        if inst.state == State.FAILED.value:
            to, task = State.RECEIVED.value, TASK_CLASSIFY
        elif inst.state == State.DELIVERY_FAILED.value:
            to, task = State.CLASSIFIED.value, TASK_DELIVER
        else:
            notes.append(f"instance {inst.id} is {inst.state}: not retriable")
            continue
        session.add(
            Event(
                instance_id=inst.id,
                kind="retry",
                detail=f"{who} retry: {inst.state} -> {to} ({task}); was: {(inst.reason or '')[:500]}",
            )
        )
        actions.append(RetryAction(inst.id, inst.sop_instance_uid, inst.state, to, task))
        inst.state = to
        inst.reason = None
        inst.finished_at = None
        inst.updated_at = now
        # a fresh budget of claims: one that failed by running out of attempts would
        # otherwise be failed again at once by worker.pipeline.claim()
        inst.attempts = 0
    if uid is not None and not actions and not notes:
        notes.append(f"no instance with SOP Instance UID {uid}")
    if instance_id is not None and not actions and not notes:
        notes.append(f"no instance with audit row id {instance_id}")
    return actions, notes


def oldest_processing_age(session: Session, now: datetime | None = None) -> float | None:
    """Seconds since the longest-held ``processing`` claim was taken (None: none held).
    A worker whose tasks stop completing leaves claims that only grow older: /healthz."""
    oldest = session.execute(
        select(func.min(Instance.updated_at)).where(Instance.state == State.PROCESSING.value)
    ).scalar_one_or_none()
    if oldest is None:
        return None
    now = now or datetime.now(UTC)
    return (now - (aware(oldest) or now)).total_seconds()
