"""Audit schema (SQLAlchemy 2). Documented for admins in docs/audit-schema.md.

Patient name is never stored. PatientID is stored only as a salted SHA-256 unless
``CXR_PATIENT_ID_STORAGE=plain``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class State(enum.StrEnum):
    """Life cycle of one received instance (``instances.state``)."""

    RECEIVED = "received"  # durable on disk + row committed; not yet on the queue
    QUEUED = "queued"  # handed to the broker
    PROCESSING = "processing"  # a worker holds it
    CLASSIFIED = "classified"  # inference done, results built, not yet delivered
    DELIVERED = "delivered"  # every destination acknowledged the results (final)
    IGNORED = "ignored"  # acknowledged but deliberately not classified (final)
    FAILED = "failed"  # could not be processed; reason says why (final)
    DELIVERY_FAILED = "delivery_failed"  # results built, delivery gave up (admin can retry)


FINAL_STATES = frozenset({State.DELIVERED, State.IGNORED, State.FAILED, State.DELIVERY_FAILED})


class Base(DeclarativeBase):
    pass


class Association(Base):
    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(64))
    peer_port: Mapped[int | None] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(default=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str] = mapped_column(
        String(32), default="open"
    )  # open/released/aborted/rejected
    reason: Mapped[str | None] = mapped_column(Text)
    n_stored: Mapped[int] = mapped_column(Integer, default=0)
    n_ignored: Mapped[int] = mapped_column(Integer, default=0)
    n_duplicate: Mapped[int] = mapped_column(Integer, default=0)
    n_refused: Mapped[int] = mapped_column(Integer, default=0)
    n_echo: Mapped[int] = mapped_column(Integer, default=0)

    instances: Mapped[list[Instance]] = relationship(back_populates="association")


class Instance(Base):
    """One received version of one SOP instance."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "content_sha256", name="uq_instance_version"),
        Index("ix_instances_state", "state"),
        Index("ix_instances_received_at", "received_at"),
        Index("ix_instances_study", "study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    patient_id_hash: Mapped[str | None] = mapped_column(String(128))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    content_sha256: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    spool_path: Mapped[str | None] = mapped_column(Text)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(String(32), default=State.RECEIVED.value)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # a delivery retry waiting in the DB (backoff longer than CXR_RETRY_ETA_MAX): the
    # attempt number it will be, and when the sweep sends it (db/lifecycle.py)
    retry_due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    retry_attempt: Mapped[int | None] = mapped_column(Integer)
    # the Celery task id holding the ``processing`` claim (a redelivery of the same
    # message resumes it; db/lifecycle.py claim)
    claimed_by: Mapped[str | None] = mapped_column(String(64))

    association: Mapped[Association | None] = relationship(back_populates="instances")
    events: Mapped[list[Event]] = relationship(
        back_populates="instance", order_by="Event.id", cascade="all, delete-orphan"
    )
    inferences: Mapped[list[Inference]] = relationship(
        back_populates="instance", order_by="Inference.id", cascade="all, delete-orphan"
    )
    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="instance", order_by="Delivery.id", cascade="all, delete-orphan"
    )


class Event(Base):
    """Append-only history of an instance: every state change, duplicate, retry."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))  # a State value, or duplicate/retry/...
    detail: Mapped[str | None] = mapped_column(Text)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))

    instance: Mapped[Instance] = relationship(back_populates="events")


class Inference(Base):
    __tablename__ = "inferences"
    __table_args__ = (UniqueConstraint("instance_id", "model_version", name="uq_inference_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    model_version: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(64))
    engine: Mapped[str | None] = mapped_column(String(16))
    p_covid: Mapped[float] = mapped_column(Float)
    p_normal: Mapped[float] = mapped_column(Float)
    p_other: Mapped[float] = mapped_column(Float)
    verdict: Mapped[str] = mapped_column(String(16), index=True)
    # out-of-distribution score of the image and its flag (NULL: model without detector)
    ood_score: Mapped[float | None] = mapped_column(Float)
    ood: Mapped[bool | None] = mapped_column(Boolean)
    sc_series_uid: Mapped[str | None] = mapped_column(String(64))
    sc_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sr_series_uid: Mapped[str | None] = mapped_column(String(64))
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    # the heat map (DICOM Segmentation, FRACTIONAL); NULL when not sent (migration 0004)
    hm_series_uid: Mapped[str | None] = mapped_column(String(64))
    hm_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    t_decode_ms: Mapped[float | None] = mapped_column(Float)
    t_preprocess_ms: Mapped[float | None] = mapped_column(Float)
    t_forward_ms: Mapped[float | None] = mapped_column(Float)
    t_cam_ms: Mapped[float | None] = mapped_column(Float)
    t_build_ms: Mapped[float | None] = mapped_column(Float)
    t_send_ms: Mapped[float | None] = mapped_column(Float)
    t_total_ms: Mapped[float | None] = mapped_column(Float)

    instance: Mapped[Instance] = relationship(back_populates="inferences")


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("instance_id", "destination", "sop_instance_uid", name="uq_delivery"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(8))  # SC, SR, HM (heat map); ORU (HL7 message)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[str | None] = mapped_column(String(16))  # e.g. 0x0000, 0xB000
    last_error: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(32), default="pending")
    # pending / delivered / delivered_with_warning / failed / not_supported (an optional
    # result, the heat map, that the destination does not take)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    instance: Mapped[Instance] = relationship(back_populates="deliveries")


class Lease(Base):
    """A named lease (migration 0005): which process holds a periodic duty, e.g. the
    re-queue sweep, until when. Taken and renewed by a conditional UPDATE in
    ``db.lifecycle.take_lease``, so two processes never hold it at once."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    renewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
