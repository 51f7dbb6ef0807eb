"""Celery tasks: ``cxr.classify_instance`` and ``cxr.deliver_instance`` (args: [instance_id]).

Thin wrappers around :mod:`worker.pipeline`, which holds the idempotent logic. What the
tasks add is the retry policy:

* transient infrastructure errors (database ``OperationalError``/``InterfaceError``,
  broker/network errors, timeouts) are retried by Celery itself (``autoretry_for``,
  ``retry_backoff`` from ``CXR_RETRY_BACKOFF_BASE``, each wait capped at
  ``CXR_RETRY_ETA_MAX``, ``retry_jitter``) up to ``CXR_TASK_MAX_RETRIES`` times, after
  which :meth:`CxrTask.on_failure` closes the instance ``failed`` (classification) or
  ``delivery_failed`` (delivery) with the reason;
* a destination that refuses or cannot be reached is retried by ``cxr.deliver_instance``
  with the full backoff (up to ``CXR_RETRY_BACKOFF_MAX``), up to
  ``CXR_DELIVERY_MAX_ATTEMPTS`` attempts in all, after which the instance ends
  ``delivery_failed`` (``cxr audit retry`` sends ``cxr.deliver_instance`` again for it).
  A wait longer than ``CXR_RETRY_ETA_MAX`` is not a broker countdown: it waits in the
  audit DB and the re-queue sweep sends it when due (:mod:`db.lifecycle`), so the Redis
  visibility timeout, which is also how long a killed worker's task waits, stays short
  (:attr:`cxr.settings.Settings.redelivery_timeout`);
* a model that cannot be loaded (:class:`worker.pipeline.ModelUnavailable`: broken
  artifact, or the soft time limit hit while loading) is this worker's problem, not the
  instance's: the task is retried with the same backoff without claiming the instance
  (its ``attempts`` are not consumed); after ``CXR_TASK_MAX_RETRIES`` retries the message
  is dropped and the instance stays ``queued`` for the re-queue sweep; the worker's
  ``/healthz`` reports ``model`` unhealthy meanwhile;
* any other error is permanent: the instance ends ``failed`` with the reason.

Both tasks accept an optional keyword ``force`` (default False): ``classify_instance(id,
force=True)`` re-classifies an instance even in a final state (an admin re-run; output
UIDs are the same, so the PACS replaces the results).

The first delivery attempt of a classified instance runs in the process's delivery lane
(:mod:`worker.lane`), so the task takes the next image while the results travel.

The model is loaded lazily, once per worker process (:func:`worker.pipeline.get_classifier`);
each forked pool process drops the database connections it inherited
(``worker_process_init``).
"""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Celery, Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_postrun, task_prerun, worker_process_init, worker_process_shutdown
from celery.utils.time import get_exponential_backoff_interval

from cxr import metrics
from cxr.contracts import QUEUE, TASK_CLASSIFY, TASK_DELIVER
from cxr.logconfig import scrub
from cxr.settings import Settings, get_settings
from db import lifecycle
from db.models import State
from worker import pipeline
from worker.delivery import close_delivery_pool
from worker.lane import Job, close_lane, current_lane, get_lane

log = logging.getLogger(__name__)


def _transient_errors() -> tuple[type[BaseException], ...]:
    import kombu.exceptions
    import sqlalchemy.exc

    errs: list[type[BaseException]] = [
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
        sqlalchemy.exc.TimeoutError,
        kombu.exceptions.OperationalError,
        ConnectionError,
        TimeoutError,
    ]
    try:
        import redis.exceptions

        errs += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


TRANSIENT_ERRORS = _transient_errors()


def backoff_seconds(retries: int, settings: Settings) -> int:
    """Exponential backoff with "equal" jitter: the wait before retry ``retries + 1`` is
    between half and all of ``CXR_RETRY_BACKOFF_BASE * 2**retries`` (capped at
    ``CXR_RETRY_BACKOFF_MAX``). With the defaults (5 s, 300 s, 10 attempts) a result is
    retried for about 10-20 minutes, through a PACS restart or a maintenance window;
    full jitter (0 .. cap) used to let 5 attempts pass in a few seconds."""
    cap = get_exponential_backoff_interval(
        factor=settings.retry_backoff_base,
        retries=retries,
        maximum=settings.retry_backoff_max,
        full_jitter=False,
    )
    return max(1, int(round(cap / 2 + random.uniform(0, cap / 2))))


@task_prerun.connect
def _task_started(**_kwargs: Any) -> None:
    pipeline.mark_busy(True)


@task_postrun.connect
def _task_finished(**_kwargs: Any) -> None:
    pipeline.mark_busy(False)


@worker_process_init.connect
def _after_fork(**_kwargs: Any) -> None:
    """A forked pool process must not share the parent's DB connections or model."""
    from db.session import dispose_engines

    dispose_engines()
    pipeline.reset_classifier()


def _reason(exc: BaseException) -> str:
    return scrub(f"{type(exc).__name__}: {exc}")[:1000]


def broker_countdown(countdown: int, settings: Settings) -> int:
    """A retry countdown the broker may hold: at most ``CXR_RETRY_ETA_MAX`` (see
    :attr:`cxr.settings.Settings.redelivery_timeout`)."""
    return max(0, min(countdown, settings.retry_eta_max))


def _schedule_delivery(app: Celery, instance_id: int, settings: Settings, attempt: int) -> None:
    """Queue ``cxr.deliver_instance`` after a backoff (``attempt`` = attempts made so far).

    A backoff the broker may hold (``CXR_RETRY_ETA_MAX``) is a task countdown; a longer
    one waits in the audit DB and the re-queue sweep sends it when due."""
    countdown = backoff_seconds(attempt - 1, settings)
    if countdown > settings.retry_eta_max:
        lifecycle.schedule_delivery_retry(
            settings.database_url, instance_id, attempt + 1, countdown
        )
        log.info(
            "instance %d: delivery attempt %d in %d s (waiting in the audit DB)",
            instance_id,
            attempt + 1,
            countdown,
        )
        return
    app.send_task(
        TASK_DELIVER,
        args=[instance_id],
        kwargs={"attempt": attempt + 1},
        queue=QUEUE,
        countdown=countdown,
    )
    log.info("instance %d: delivery attempt %d in %d s", instance_id, attempt + 1, countdown)


def _retry_options() -> dict[str, Any]:
    """Celery's own retry for transient errors (``autoretry_for``): exponential backoff
    from ``CXR_RETRY_BACKOFF_BASE``, each wait capped at ``CXR_RETRY_ETA_MAX`` (a wait the
    broker holds); the count is :attr:`CxrTask.max_retries`. Read once, when the worker
    imports its tasks."""
    s = get_settings()
    return {
        "autoretry_for": TRANSIENT_ERRORS,
        "retry_backoff": s.retry_backoff_base,
        "retry_backoff_max": s.retry_eta_max,
        # no jitter: Celery's is full jitter (0 .. cap), with which the retries could all
        # pass within seconds of a database restart; 5, 10, 20, 30, 30 s ride it out
        "retry_jitter": False,
    }


class CxrTask(Task):  # type: ignore[misc]
    """Base of the two tasks: late acks, redelivery when a worker is lost, no results,
    Celery's autoretry for :data:`TRANSIENT_ERRORS`; when the retries are used up
    :meth:`on_failure` closes the instance with the reason (``failed`` for
    classification, ``delivery_failed`` for delivery)."""

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    #: the state an instance ends in when this task gives up on a transient error
    gave_up_state = State.FAILED

    @property
    def max_retries(self) -> int:
        return get_settings().task_max_retries

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        if not isinstance(exc, TRANSIENT_ERRORS) or not args:
            return  # every other error was mapped to a state inside the task
        instance_id = int(args[0])
        retries = self.request.retries
        try:
            pipeline.mark_failed(
                get_settings(),
                instance_id,
                f"gave up after {retries + 1} attempts: {_reason(exc)}",
                state=self.gave_up_state,
            )
        except Exception as exc2:  # DB still down: the re-queue sweep will find it later
            log.error("instance %d: cannot record failure (%s)", instance_id, type(exc2).__name__)

    def on_retry(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        if not isinstance(exc, TRANSIENT_ERRORS):
            return  # the model-unavailable retry counts and logs itself
        metrics.TASK_OUTCOMES.labels("retry").inc()
        log.warning(
            "instance %s: transient %s, retry %d/%d",
            args[0] if args else "?",
            type(exc).__name__,
            self.request.retries + 1,
            self.max_retries,
        )


class DeliverTask(CxrTask):
    gave_up_state = State.DELIVERY_FAILED


@shared_task(bind=True, base=CxrTask, name=TASK_CLASSIFY, **_retry_options())
def classify_instance(self: Task, instance_id: int, force: bool = False) -> str:
    """Classify one received instance; its first delivery attempt runs in this process's
    delivery lane (:mod:`worker.lane`, ``CXR_DELIVERY_THREADS``) or, with 0 threads,
    inside this task."""
    settings = get_settings()
    handoff = None
    owner = None
    handed_off: list[int] = []  # set once the instance is classified and handed over
    if settings.delivery_threads > 0 and settings.delivery_destinations:
        lane = get_lane(
            _run_lane_job,
            settings.delivery_threads,
            heartbeat=_lane_heartbeat,
            heartbeat_every=settings.requeue_interval,
        )
        owner = lane.start()  # recorded with the classification: the sweep's cue
        app = self.app

        def handoff(iid: int, datasets: dict[str, Any]) -> None:
            # the instance is classified and its results are in the spool: whatever
            # happens here (a lane full for longer than half the soft time limit, or
            # the limit itself), its delivery is never lost and it is never failed
            queued = False
            try:
                queued = lane.submit(
                    Job(iid, datasets, app, owner), timeout=settings.task_soft_time_limit / 2
                )
            finally:
                handed_off.append(iid)
                if not queued:
                    _deliver_via_broker(app, settings, iid, "the delivery lane is full")

    try:
        out = pipeline.process_instance(
            settings,
            instance_id,
            task_id=self.request.id,
            force=force,
            final_delivery_attempt=settings.delivery_max_attempts <= 1,
            handoff=handoff,
            delivery_owner=owner,
        )
    except pipeline.DeliveryIncomplete as exc:
        log.info("instance %d: delivery incomplete (%s)", instance_id, exc.detail)
        metrics.TASK_OUTCOMES.labels("delivery_retry").inc()
        _schedule_delivery(self.app, instance_id, settings, attempt=1)
        return "delivery_pending"
    except pipeline.ModelUnavailable as exc:
        return _retry_model(self, settings, instance_id, exc)
    except TRANSIENT_ERRORS as exc:
        # Celery retries it (autoretry_for); the claim is given up first so that the
        # retry (or the sweep, if the retry message is lost) may claim it again
        _release_quietly(settings, instance_id, exc)
        raise
    except SoftTimeLimitExceeded:
        if handed_off:  # classified, results in the spool, delivery on its way
            log.warning("instance %d: time limit while handing over its delivery", instance_id)
            return pipeline.DELIVERY_QUEUED
        pipeline.mark_failed(
            settings, instance_id, f"time limit of {settings.task_soft_time_limit} s exceeded"
        )
        return State.FAILED.value
    except Exception as exc:
        log.exception("instance %d: unexpected error", instance_id)
        pipeline.mark_failed(settings, instance_id, _reason(exc))
        return State.FAILED.value
    log.info("instance %d: %s (%s)", instance_id, out.action, out.verdict or out.reason or "")
    return out.action


def _release_quietly(settings: Settings, instance_id: int, exc: BaseException) -> None:
    try:
        pipeline.release_claim(settings, instance_id, f"transient: {_reason(exc)}")
    except Exception as exc2:  # the DB itself is what is down
        log.warning("instance %d: claim not released (%s)", instance_id, type(exc2).__name__)


MODEL_UNAVAILABLE = "model_unavailable"


def _retry_model(
    task: Task, settings: Settings, instance_id: int, exc: pipeline.ModelUnavailable
) -> str:
    """Retry a task whose worker could not load the model; the instance was not claimed,
    so it stays ``queued`` (after the last retry the re-queue sweep sends it again). Not
    Celery's autoretry: giving up here drops the message without failing the instance
    (the model, not the instance, is broken)."""
    metrics.TASK_OUTCOMES.labels(MODEL_UNAVAILABLE).inc()
    retries = task.request.retries
    if retries >= settings.task_max_retries:
        log.error(
            "instance %d: model still unavailable after %d retries; left queued for the sweep",
            instance_id,
            retries,
        )
        return MODEL_UNAVAILABLE
    countdown = broker_countdown(backoff_seconds(retries, settings), settings)
    log.warning(
        "instance %d: model unavailable, retry %d/%d in %d s",
        instance_id,
        retries + 1,
        settings.task_max_retries,
        countdown,
    )
    raise task.retry(exc=exc, countdown=countdown, max_retries=settings.task_max_retries)


def deliver_attempt(
    app: Celery,
    settings: Settings,
    instance_id: int,
    attempt: int,
    built: dict[str, Any] | None = None,
) -> str:
    """One delivery attempt and what its outcome means, in one place (the deliver task
    and the lane): delivered / retry scheduled / ``delivery_failed``. Transient
    infrastructure errors propagate (the caller retries them)."""
    final = attempt >= settings.delivery_max_attempts
    try:
        out = pipeline.deliver(settings, instance_id, final_attempt=final, built=built)
    except pipeline.DeliveryIncomplete as exc:
        log.info(
            "instance %d: delivery attempt %d incomplete (%s)", instance_id, attempt, exc.detail
        )
        metrics.TASK_OUTCOMES.labels("delivery_retry").inc()
        _schedule_delivery(app, instance_id, settings, attempt=attempt)
        return "delivery_pending"
    except TRANSIENT_ERRORS:
        raise
    except Exception as exc:
        log.exception("instance %d: unexpected delivery error", instance_id)
        pipeline.mark_failed(settings, instance_id, _reason(exc), state=State.DELIVERY_FAILED)
        return State.DELIVERY_FAILED.value
    return out.action


def _deliver_via_broker(app: Celery, settings: Settings, instance_id: int, why: str) -> None:
    """Send the first delivery attempt as ``cxr.deliver_instance`` (it reads the spool
    copies); if the broker is down too, the instance stays ``classified`` and the sweep
    re-sends it."""
    log.warning("instance %d: %s; delivery handed to the deliver task", instance_id, why)
    try:
        app.send_task(
            TASK_DELIVER,
            args=[instance_id],
            kwargs={"attempt": 1},
            queue=QUEUE,
            countdown=broker_countdown(backoff_seconds(0, settings), settings),
        )
    except Exception as exc:
        log.error(
            "instance %d: left classified for the sweep (%s)", instance_id, type(exc).__name__
        )


#: a delivery lane's lease lasts this many sweep intervals past each renewal
LANE_LEASE_INTERVALS = 3


def _lane_heartbeat(owner: str, renew: bool) -> None:
    """Renew (or give up) the lease that says this process's delivery lane is alive; the
    sweep re-sends the deliveries of a lane whose lease lapsed (:mod:`worker.lane`)."""
    settings = get_settings()
    if renew:
        seconds = LANE_LEASE_INTERVALS * settings.requeue_interval
        lifecycle.take_lease(settings.database_url, owner, owner, seconds)
    else:
        lifecycle.release_lease(settings.database_url, owner, owner)


def _run_lane_job(job: Job) -> None:
    """A first delivery attempt in the lane. A transient error (DB or broker down) goes to
    the broker as ``cxr.deliver_instance`` for the same attempt, where Celery retries it."""
    settings = get_settings()
    try:
        action = deliver_attempt(job.app, settings, job.instance_id, 1, built=job.datasets)
    except TRANSIENT_ERRORS as exc:
        _deliver_via_broker(job.app, settings, job.instance_id, type(exc).__name__)
        return
    finally:
        if job.owner is not None:  # the attempt is over: a retry is not this lane's
            try:
                lifecycle.release_delivery_owner(settings.database_url, job.instance_id, job.owner)
            except Exception as exc:  # the DB is down: at worst one duplicate re-send
                log.warning(
                    "instance %d: lane owner not released (%s)",
                    job.instance_id,
                    type(exc).__name__,
                )
    log.info("instance %d: %s", job.instance_id, action)


@shared_task(bind=True, base=DeliverTask, name=TASK_DELIVER, **_retry_options())
def deliver_instance(self: Task, instance_id: int, attempt: int = 1, force: bool = False) -> str:
    """(Re-)send the stored results of a classified (or ``delivery_failed``) instance.

    ``attempt`` counts delivery attempts; the one reaching ``CXR_DELIVERY_MAX_ATTEMPTS``
    is the last, ending ``delivery_failed`` when it fails. An admin re-send (``cxr audit
    retry``) starts again at attempt 1. Transient errors: Celery's autoretry."""
    del force  # accepted for symmetry; a delivered instance is never re-sent
    return deliver_attempt(self.app, get_settings(), instance_id, attempt)


@worker_process_shutdown.connect
def _drain_on_shutdown(**_kwargs: Any) -> None:
    """A clean stop sends what the lane holds before the process ends (what a hard kill
    loses, the sweep re-sends), then releases the pooled associations."""
    lane = current_lane()
    if lane is not None and lane.pending:
        log.info("delivery lane: draining %d delivery(ies) before exit", lane.pending)
    if not close_lane(timeout=get_settings().dimse_timeout):  # also gives the lease up
        log.warning("delivery lane: not drained; the sweep re-sends what is left")
    close_delivery_pool()
