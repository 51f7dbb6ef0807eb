"""Celery tasks: ``cxr.classify_instance`` and ``cxr.deliver_instance`` (args: [instance_id]).

Thin wrappers around :mod:`worker.pipeline`, which holds the idempotent logic. What the
tasks add is the retry policy:

* transient infrastructure errors (database ``OperationalError``/``InterfaceError``,
  broker/network errors, timeouts) are retried with exponential backoff (``equal`` jitter
  from ``CXR_RETRY_BACKOFF_BASE``, each wait capped at ``CXR_RETRY_ETA_MAX``) up to
  ``CXR_TASK_MAX_RETRIES`` times, after which the instance ends ``failed`` with the reason;
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

The model is loaded lazily, once per worker process (:func:`worker.pipeline.get_classifier`);
each forked pool process drops the database connections it inherited
(``worker_process_init``).
"""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_postrun, task_prerun, worker_process_init
from celery.utils.time import get_exponential_backoff_interval

from cxr import metrics
from cxr.contracts import QUEUE, TASK_CLASSIFY, TASK_DELIVER
from cxr.logconfig import scrub
from cxr.settings import Settings, get_settings
from db import lifecycle
from db.models import State
from worker import pipeline

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


def _schedule_delivery(task: Task, instance_id: int, settings: Settings, attempt: int) -> None:
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
    task.app.send_task(
        TASK_DELIVER,
        args=[instance_id],
        kwargs={"attempt": attempt + 1},
        queue=QUEUE,
        countdown=countdown,
    )
    log.info("instance %d: delivery attempt %d in %d s", instance_id, attempt + 1, countdown)


@shared_task(
    bind=True,
    name=TASK_CLASSIFY,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def classify_instance(self: Task, instance_id: int, force: bool = False) -> str:
    """Classify one received instance and deliver its results (first delivery attempt)."""
    settings = get_settings()
    final = settings.delivery_max_attempts <= 1
    try:
        out = pipeline.process_instance(
            settings,
            instance_id,
            task_id=self.request.id,
            force=force,
            final_delivery_attempt=final,
        )
    except pipeline.DeliveryIncomplete as exc:
        log.info("instance %d: delivery incomplete (%s)", instance_id, exc.detail)
        metrics.TASK_OUTCOMES.labels("delivery_retry").inc()
        _schedule_delivery(self, instance_id, settings, attempt=1)
        return "delivery_pending"
    except pipeline.ModelUnavailable as exc:
        return _retry_model(self, settings, instance_id, exc)
    except TRANSIENT_ERRORS as exc:
        return _retry_or_fail(self, settings, instance_id, exc)
    except SoftTimeLimitExceeded:
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


MODEL_UNAVAILABLE = "model_unavailable"


def _retry_model(
    task: Task, settings: Settings, instance_id: int, exc: pipeline.ModelUnavailable
) -> str:
    """Retry a task whose worker could not load the model; the instance was not claimed,
    so it stays ``queued`` (after the last retry the re-queue sweep sends it again)."""
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


def _retry_or_fail(task: Task, settings: Settings, instance_id: int, exc: BaseException) -> str:
    retries = task.request.retries
    if retries >= settings.task_max_retries:
        try:
            pipeline.mark_failed(
                settings, instance_id, f"gave up after {retries + 1} attempts: {_reason(exc)}"
            )
        except Exception as exc2:  # DB still down: the re-queue sweep will find it later
            log.error("instance %d: cannot record failure (%s)", instance_id, type(exc2).__name__)
        return State.FAILED.value
    pipeline.release_claim(settings, instance_id, f"transient: {_reason(exc)}")
    metrics.TASK_OUTCOMES.labels("retry").inc()
    countdown = broker_countdown(backoff_seconds(retries, settings), settings)
    log.warning(
        "instance %d: transient %s, retry %d/%d in %d s",
        instance_id,
        type(exc).__name__,
        retries + 1,
        settings.task_max_retries,
        countdown,
    )
    raise task.retry(exc=exc, countdown=countdown, max_retries=settings.task_max_retries)


@shared_task(
    bind=True,
    name=TASK_DELIVER,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def deliver_instance(self: Task, instance_id: int, attempt: int = 1, force: bool = False) -> str:
    """(Re-)send the stored results of a classified (or ``delivery_failed``) instance.

    ``attempt`` counts delivery attempts; the one reaching ``CXR_DELIVERY_MAX_ATTEMPTS``
    is the last, ending ``delivery_failed`` when it fails. An admin re-send (``cxr audit
    retry``) starts again at attempt 1."""
    del force  # accepted for symmetry; a delivered instance is never re-sent
    settings = get_settings()
    final = attempt >= settings.delivery_max_attempts
    try:
        out = pipeline.deliver(settings, instance_id, final_attempt=final)
    except pipeline.DeliveryIncomplete as exc:
        log.info(
            "instance %d: delivery attempt %d incomplete (%s)", instance_id, attempt, exc.detail
        )
        metrics.TASK_OUTCOMES.labels("delivery_retry").inc()
        _schedule_delivery(self, instance_id, settings, attempt=attempt)
        return "delivery_pending"
    except TRANSIENT_ERRORS as exc:
        if self.request.retries >= settings.task_max_retries:
            log.error("instance %d: delivery bookkeeping failed for good", instance_id)
            try:
                pipeline.mark_failed(
                    settings, instance_id, _reason(exc), state=State.DELIVERY_FAILED
                )
            except Exception:
                log.error("instance %d: cannot record delivery failure", instance_id)
            return State.DELIVERY_FAILED.value
        raise self.retry(
            exc=exc,
            countdown=broker_countdown(backoff_seconds(self.request.retries, settings), settings),
            max_retries=settings.task_max_retries,
        ) from exc
    except Exception as exc:
        log.exception("instance %d: unexpected delivery error", instance_id)
        pipeline.mark_failed(settings, instance_id, _reason(exc), state=State.DELIVERY_FAILED)
        return State.DELIVERY_FAILED.value
    return out.action
