"""Per-instance processing: claim -> decode -> classify -> build SC/SR/heat map -> deliver
-> audit.

This module is the whole worker logic, callable without Celery (the Celery tasks in
:mod:`worker.tasks` are thin wrappers around it, and ``benchmarks/pipeline.py`` calls it
directly). Every step is idempotent:

* output UIDs are derived from the source SOP Instance UID and the model version
  (:mod:`worker.uids`), so a re-run builds the *same* objects and the PACS replaces them;
* the ``inferences`` row is upserted by ``(instance_id, model_version)``;
* ``deliveries`` rows are unique by ``(instance, destination, SOP Instance UID)`` and a
  result already acknowledged by a destination is not sent there again; the destinations
  are C-STORE and STOW-RS ones (``CXR_DESTINATIONS``: the SC, SR and heat map) and HL7
  receivers (``CXR_HL7_DESTINATIONS``: one ORU^R01 per image, its row under the SC's UID),
  each sent by the sender of its kind (:mod:`worker.delivery`, :mod:`worker.stow`, :mod:`worker.oru`);
* an instance in a final state is skipped; one in ``processing`` is taken over when its
  claim is stale (older than ``CXR_REQUEUE_STALE_AFTER``, i.e. left by a killed worker) or
  was made by the same Celery task (a redelivery or retry of the same message).

State machine (``instances.state``)::

    received -> queued -> processing -> classified -> delivered
                                    \\-> failed       \\-> delivery_failed (admin: cxr audit retry)

With **no destinations configured** the instance stays ``classified`` with
``finished_at`` set and reason ``"no destinations configured"``: that is its final state
(see :func:`is_finished`); nothing was delivered, so it is never reported as delivered.

Test hook (off by default): ``CXR_TEST_STAGE_DELAY`` = seconds to sleep after the
instance is claimed (``processing``) and before decoding. It exists only so that the
end-to-end tests can SIGKILL a worker while a task is certainly in flight; it is read
from the environment only, is not a documented setting, and is 0 unless set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr import metrics
from cxr.logconfig import register_dataset_phi, scrub
from cxr.settings import AnyDestination, Hl7Destination, Settings
from cxr.storage import Spool
from db import lifecycle
from db.lifecycle import NO_DESTINATIONS, is_final
from db.models import State

#: the classify task's outcome when the first delivery went to the delivery lane
DELIVERY_QUEUED = "delivery_queued"

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

    from worker.uids import OutputUIDs

log = logging.getLogger(__name__)

TEST_DELAY_ENV = "CXR_TEST_STAGE_DELAY"
__all__ = ["NO_DESTINATIONS", "is_finished"]


class PermanentError(Exception):
    """The instance cannot be processed, and retrying will not help (-> ``failed``)."""


class ModelUnavailable(Exception):
    """The model could not be loaded: a problem of this worker, not of the instance (the
    task is retried later; the instance is neither claimed nor failed)."""


class DeliveryIncomplete(Exception):
    """At least one result was not acknowledged by a destination (retry with backoff)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass
class Outcome:
    """What one call of :func:`process_instance` / :func:`deliver_instance` did."""

    instance_id: int
    action: str  # skipped / classified / delivered / delivery_pending / failed / ignored
    state: str | None = None
    reason: str | None = None
    verdict: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


#: "final" has one definition, in the audit lifecycle (db/lifecycle.py)
is_finished = is_final


def _test_delay() -> float:
    try:
        return max(0.0, float(os.environ.get(TEST_DELAY_ENV, "0") or 0))
    except ValueError:
        return 0.0


# --------------------------------------------------------------------------- classifier
# the prefork parent serves /healthz: it sets this variable to a file path, and the pool
# processes create that file while the model cannot be loaded (remove it once loaded)
MODEL_STATUS_ENV = "CXR_MODEL_STATUS_FILE"
_model_error: str | None = None


def _set_model_error(error: str | None) -> None:
    global _model_error
    _model_error = error
    path = os.environ.get(MODEL_STATUS_ENV)
    if not path:
        return
    try:
        if error is None:
            os.unlink(path)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(error)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot record the model status in %s: %s", path, type(exc).__name__)


def model_healthy() -> bool:
    """False while the last attempt to load the model failed (in any pool process when
    ``CXR_MODEL_STATUS_FILE`` is set, else in this process): a ``/healthz`` check."""
    path = os.environ.get(MODEL_STATUS_ENV)
    if path:
        return not os.path.exists(path)
    return _model_error is None


# the prefork parent's /healthz also watches the pool's tasks: each pool process keeps a
# file ``busy-<pid>`` in this folder while it runs a task (its mtime: when it started)
TASK_STATUS_ENV = "CXR_TASK_STATUS_DIR"


def mark_busy(busy: bool) -> None:
    folder = os.environ.get(TASK_STATUS_ENV)
    if not folder:
        return
    path = os.path.join(folder, f"busy-{os.getpid()}")
    try:
        if busy:
            with open(path, "w", encoding="utf-8") as f:
                f.write(str(time.time()))
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot record the task status in %s: %s", folder, type(exc).__name__)


def tasks_healthy(limit_seconds: float, now: float | None = None) -> bool:
    """False when a live pool process has run one task for longer than ``limit_seconds``
    (the hard time limit should have ended it: the pool is wedged). Files of pool
    processes that died (SIGKILL) are removed: their tasks are redelivered."""
    folder = os.environ.get(TASK_STATUS_ENV)
    if not folder or not os.path.isdir(folder):
        return True
    now = time.time() if now is None else now
    for name in os.listdir(folder):
        if not name.startswith("busy-"):
            continue
        path = os.path.join(folder, name)
        try:
            pid = int(name[5:])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        except PermissionError:
            pass
        try:
            if now - os.path.getmtime(path) > limit_seconds:
                return False
        except FileNotFoundError:
            continue
    return True


def get_classifier(settings: Settings) -> Any:
    """The process's classifier: :func:`ml.runtime.get_classifier`, the one model cache
    (loaded on first use, never in the prefork parent). This adds the health flag and the
    error a task reports.

    Raises :class:`ModelUnavailable` when it cannot be loaded (broken artifact, or the
    task's soft time limit hit while loading)."""
    from ml.runtime import get_classifier as _load
    from ml.runtime import is_loaded

    fresh = not is_loaded(settings)
    t0 = time.perf_counter()
    try:
        clf = _load(settings)
    except Exception as exc:  # includes celery's SoftTimeLimitExceeded
        reason = scrub(f"cannot load the model: {type(exc).__name__}: {exc}")[:1000]
        _set_model_error(reason)
        log.error("%s", reason)
        raise ModelUnavailable(reason) from exc
    if fresh:
        _set_model_error(None)
        log.info(
            "model %s %s loaded (%s) in %.1f s",
            getattr(clf, "name", "?"),
            getattr(clf, "version", "?"),
            getattr(clf, "engine", "?"),
            time.perf_counter() - t0,
        )
    return clf


def reset_classifier() -> None:
    """Forget the loaded model (after fork, or in tests)."""
    from ml.runtime import clear_classifier_cache

    clear_classifier_cache()


def model_info(classifier: Any) -> Any:
    from worker.results import ModelInfo

    if hasattr(ModelInfo, "from_classifier"):
        return ModelInfo.from_classifier(classifier)
    return ModelInfo(name=classifier.name, version=classifier.version, sha256=classifier.sha256)


# --------------------------------------------------------------------------- claim
def claim(
    settings: Settings, instance_id: int, task_id: str | None = None, force: bool = False
) -> tuple[str, str | None]:
    """Take an instance for classification (:func:`db.lifecycle.claim`): a claim older
    than ``CXR_REQUEUE_STALE_AFTER`` or made by the same task is taken over; after
    ``CXR_TASK_MAX_RETRIES`` + 2 claims the instance is closed as ``failed``."""
    return lifecycle.claim(
        settings.database_url,
        instance_id,
        task_id,
        stale_after=settings.requeue_stale_after,
        max_claims=settings.task_max_retries + 2,
        force=force,
    )


def mark_failed(
    settings: Settings, instance_id: int, reason: str, state: State = State.FAILED
) -> None:
    """Close an instance for good with its reason (``failed`` or ``delivery_failed``)."""
    reason = scrub(reason)[:2000]
    if not lifecycle.mark_failed(settings.database_url, instance_id, reason, state):
        return  # gone, or another attempt finished it meanwhile
    metrics.TASK_OUTCOMES.labels(state.value).inc()
    log.warning("instance %d %s: %s", instance_id, state.value, reason)


def release_claim(settings: Settings, instance_id: int, detail: str) -> None:
    """Put a ``processing`` instance back to ``queued`` before a retry (best effort)."""
    try:
        lifecycle.release_claim(settings.database_url, instance_id, scrub(detail)[:2000])
    except Exception as exc:  # the DB itself may be what is down
        log.warning(
            "could not release instance %d before retry: %s", instance_id, type(exc).__name__
        )


# --------------------------------------------------------------------------- classify
@dataclass
class _Built:
    sc_uid: str
    sr_uid: str | None
    verdict: str
    # the result objects themselves, handed to the first delivery attempt (the spool
    # copies are for retries and the audit, never re-read on the first attempt)
    datasets: dict[str, Dataset] = field(default_factory=dict)


def _result_uids(
    settings: Settings,
    spool: Spool,
    instance_id: int,
    sop_uid: str,
    version: int,
    display: np.ndarray,
    model_version: str,
) -> OutputUIDs:
    """The UIDs of this instance's results (:func:`worker.uids.output_uids`).

    * A re-run of an instance already classified by this model version (a redelivered
      task, a forced re-run, an admin retry) reuses the UIDs recorded with it: its results
      replace themselves in the PACS, whatever happened in the spool since.
    * A later content under a known SOP Instance UID (``version`` > 1) that shows the same
      image, in the same study and for the same patient, as an earlier one (the PACS
      re-sending it in other bytes) takes that earlier one's results' UIDs (oldest match
      first): they replace the earlier results instead of adding a second result series.
    * Other pixels key as their own version: new UIDs, so that the PACS never holds two
      different results under one UID. An earlier file that is gone or unreadable counts
      as different."""
    from celery.exceptions import SoftTimeLimitExceeded

    from ml.preprocess import dicom_to_display
    from worker.uids import OutputUIDs, output_uids

    url = settings.database_url

    def recorded(iid: int, key: int) -> OutputUIDs | None:
        rec = lifecycle.recorded_result_uids(url, iid, model_version)
        if rec is None:
            return None
        derived = output_uids(sop_uid, model_version, key).as_dict()
        return OutputUIDs(**{k: rec.get(k, v) for k, v in derived.items()})

    own = recorded(instance_id, version)
    if own is not None:
        return own
    if version > 1:
        for earlier_id, earlier, path in lifecycle.earlier_contents(url, instance_id):
            try:
                before = dicom_to_display(spool.read_dataset(path), max_pixels=settings.max_pixels)
            except SoftTimeLimitExceeded:
                raise
            except Exception:  # purged or unreadable: cannot be the same image
                continue
            if before.shape == display.shape and np.array_equal(before, display):
                return recorded(earlier_id, earlier) or output_uids(sop_uid, model_version, earlier)
    return output_uids(sop_uid, model_version, version)


def classify(
    settings: Settings,
    instance_id: int,
    classifier: Any | None = None,
    delivery_owner: str | None = None,
) -> tuple[_Built, dict[str, float]]:
    """Decode, classify, build SC (+SR), store them in the spool, upsert the inference and
    move the instance to ``classified`` (with ``delivery_owner``, the delivery lane that
    will send them). The caller holds the ``processing`` claim."""
    from ml.ood import OOD_MESSAGE
    from ml.preprocess import PreprocessError, dicom_to_display
    from worker.results import build_heatmap, build_secondary_capture, build_structured_report

    timings: dict[str, float] = {}
    delay = _test_delay()
    if delay:
        log.warning("%s=%s: test hook sleeping", TEST_DELAY_ENV, delay)
        time.sleep(delay)

    src = lifecycle.source_of(settings.database_url, instance_id)
    if src is None:
        raise PermanentError("instance row vanished")
    spool_path, sop_uid, source_version = src
    if not spool_path:
        raise PermanentError("no spool file recorded for this instance")
    spool = Spool(settings.spool_dir)

    t0 = time.perf_counter()
    try:
        ds = spool.read_dataset(spool_path)
    except FileNotFoundError as exc:
        raise PermanentError(f"spool file missing: {spool.resolve(spool_path).name}") from exc
    except Exception as exc:
        raise PermanentError(f"unreadable DICOM: {type(exc).__name__}: {exc}") from exc
    # from now on the patient's name/ID must never reach a log line or an audit reason
    register_dataset_phi(ds)
    try:
        display = dicom_to_display(ds, max_pixels=settings.max_pixels)
    except PreprocessError as exc:
        raise PermanentError(f"cannot decode image: {exc}") from exc
    timings["decode"] = (time.perf_counter() - t0) * 1000

    clf = classifier if classifier is not None else get_classifier(settings)
    try:
        pred = clf.predict_display(display)
    except PreprocessError as exc:
        raise PermanentError(f"cannot preprocess image: {exc}") from exc
    for k in ("preprocess", "forward", "cam"):
        timings[k] = float(pred.timings_ms.get(k, 0.0))

    t1 = time.perf_counter()
    model = model_info(clf)
    uids = _result_uids(settings, spool, instance_id, sop_uid, source_version, display, clf.version)
    sc = build_secondary_capture(ds, display, pred, model, uids, settings)
    spool.store_result(uids.sc_sop, sc)
    built: dict[str, Dataset] = {uids.sc_sop: sc}
    heatmap = None
    if settings.send_heatmap and getattr(pred, "cam", None) is not None:
        try:
            heatmap = build_heatmap(ds, pred, model, uids, settings)
        except ValueError as exc:  # e.g. a multi-frame or colour source: SC and SR still go
            log.warning("instance %d: no heat map: %s", instance_id, scrub(str(exc)))
    if heatmap is not None:
        spool.store_result(uids.hm_sop, heatmap)
    sr_uid = None
    if settings.send_sr:
        sr = build_structured_report(ds, pred, model, uids, sc, heatmap=heatmap)
        spool.store_result(uids.sr_sop, sr)
        sr_uid = uids.sr_sop
        built[sr_uid] = sr
    if heatmap is not None:
        built[uids.hm_sop] = heatmap
    timings["build"] = (time.perf_counter() - t1) * 1000

    no_dest = not settings.delivery_destinations
    lifecycle.record_classification(
        settings.database_url,
        instance_id,
        lifecycle.InferenceRecord(
            model_version=clf.version,
            model_sha256=clf.sha256,
            engine=getattr(clf, "engine", None),
            probabilities={k: float(v) for k, v in pred.probabilities.items()},
            verdict=pred.label,
            ood_score=getattr(pred, "ood_score", None),
            ood=getattr(pred, "ood", None),
            sc_series_uid=uids.sc_series,
            sc_sop_instance_uid=uids.sc_sop,
            sr_series_uid=uids.sr_series if sr_uid else None,
            sr_sop_instance_uid=sr_uid,
            timings_ms=timings,
            hm_series_uid=uids.hm_series if heatmap is not None else None,
            hm_sop_instance_uid=uids.hm_sop if heatmap is not None else None,
        ),
        f"{pred.label} (model {clf.version})"
        + (
            f"; {OOD_MESSAGE} (ood_score {pred.ood_score:.1f})"
            if getattr(pred, "ood", None)
            else ""
        ),
        no_destinations=no_dest,
        delivery_owner=delivery_owner,
    )
    metrics.INFERENCES.labels(pred.label).inc()
    for k, v in timings.items():
        metrics.STAGE_SECONDS.labels(k).observe(v / 1000)
    return _Built(uids.sc_sop, sr_uid, pred.label, built), timings


# --------------------------------------------------------------------------- deliver
def _status_text(outcome: Any) -> str | None:
    st = getattr(outcome, "status", None)
    if st is None:
        return None
    if isinstance(st, int):
        return f"0x{st:04X}"
    return str(st)


def deliver(
    settings: Settings,
    instance_id: int,
    final_attempt: bool = True,
    built: dict[str, Dataset] | None = None,
) -> Outcome:
    """Send the stored results of a classified instance to every destination.

    Results already acknowledged by a destination are not re-sent to it. When all are
    acknowledged the instance becomes ``delivered``; otherwise :class:`DeliveryIncomplete`
    is raised (the caller retries with backoff) unless ``final_attempt``, in which case the
    instance becomes ``delivery_failed``. ``built``: the result datasets just made by
    :func:`classify` (first attempt); without them they are read from the spool.
    """
    t0 = time.perf_counter()
    spool = Spool(settings.spool_dir)
    url = settings.database_url
    plan = lifecycle.delivery_plan(url, instance_id)
    if plan is None:
        return Outcome(instance_id, "skipped", None, "instance not found")
    if plan.state == State.DELIVERED.value:
        return Outcome(instance_id, "skipped", plan.state, "already delivered")
    if plan.state not in (State.CLASSIFIED.value, State.DELIVERY_FAILED.value):
        return Outcome(instance_id, "skipped", plan.state, "not classified")
    results, done = plan.results, plan.done
    if plan.inference_id is None or not results:
        mark_failed(settings, instance_id, "classified but no inference/results recorded")
        return Outcome(instance_id, "failed", State.FAILED.value, "no results")
    destinations = settings.delivery_destinations
    if not destinations:
        lifecycle.close_without_destinations(url, instance_id)
        return Outcome(instance_id, "classified", State.CLASSIFIED.value, NO_DESTINATIONS)

    datasets: dict[str, Dataset] = dict(built or {})
    problems: list[str] = []
    for dest in destinations:
        if dest.kind == "hl7":
            if plan.report is None or plan.report_uid is None:
                continue  # pragma: no cover - an inference always has its SC
            if (str(dest), plan.report_uid) in done:
                continue
            model_name = _model_name(datasets, plan.report_uid, spool)
            if model_name is None:
                mark_failed(settings, instance_id, "result file missing from spool (SC)")
                return Outcome(instance_id, "failed", State.FAILED.value, "result missing")
            pending = [(lifecycle.ORU_KIND, plan.report_uid)]
            outcomes = [_send_oru(dest, plan.report, model_name, settings)]
            _record(settings, instance_id, dest, pending, outcomes, problems)
            continue
        pending = [(k, uid) for k, uid in results if (str(dest), uid) not in done]
        if not pending:
            continue
        to_send = []
        for _kind, uid in pending:
            if uid not in datasets:
                path = spool.result_path(uid)
                if not path.exists():
                    mark_failed(
                        settings, instance_id, f"result file missing from spool: {path.name}"
                    )
                    return Outcome(instance_id, "failed", State.FAILED.value, "result missing")
                datasets[uid] = spool.read_dataset(path)
            to_send.append(datasets[uid])
        outcomes = _send(dest, to_send, settings)
        _record(settings, instance_id, dest, pending, outcomes, problems)

    send_ms = (time.perf_counter() - t0) * 1000
    metrics.STAGE_SECONDS.labels("send").observe(send_ms / 1000)
    now = lifecycle.finish_delivery(
        url,
        instance_id,
        plan.inference_id,
        send_ms,
        problems,
        final_attempt,
        f"{len(results)} result(s) to {len(destinations)} destination(s)",
    )
    received_at = plan.received_at
    if not problems:
        if received_at is not None:
            metrics.STAGE_SECONDS.labels("end_to_end").observe(
                max(0.0, (now - received_at).total_seconds())
            )
        metrics.TASK_OUTCOMES.labels(State.DELIVERED.value).inc()
        return Outcome(
            instance_id, "delivered", State.DELIVERED.value, timings_ms={"send": send_ms}
        )
    if final_attempt:
        metrics.TASK_OUTCOMES.labels(State.DELIVERY_FAILED.value).inc()
        log.warning("instance %d delivery_failed: %s", instance_id, "; ".join(problems))
        return Outcome(
            instance_id, "delivery_failed", State.DELIVERY_FAILED.value, "; ".join(problems)
        )
    raise DeliveryIncomplete("; ".join(problems))


def _send(dest: AnyDestination, datasets: list[Dataset], settings: Settings) -> list[Any]:
    """The sender of the destination's kind: C-STORE (``dimse``) or STOW-RS (``dicomweb``)."""
    try:
        if dest.kind == "dicomweb":
            from worker.stow import stow_datasets

            return list(stow_datasets(dest, datasets, settings))
        if dest.kind == "dimse":
            from worker.delivery import store_datasets

            return list(store_datasets(dest, datasets, settings))
        raise ValueError(f"no dataset sender for a {dest.kind} destination")
    except Exception as exc:  # delivery should classify, but never let one crash us
        log.warning("delivery to %s raised %s", dest, type(exc).__name__)
        return [_Unreachable(f"{type(exc).__name__}: {exc}") for _ in datasets]


def _model_name(datasets: dict[str, Dataset], sc_uid: str, spool: Spool) -> str | None:
    """The model name of a result (the SC's ManufacturerModelName; the inference row
    holds the version only): from the SC at hand, else from the spool copy's header (its
    pixel data is not read, and the header is not kept for sending)."""
    ds = datasets.get(sc_uid)
    if ds is None:
        path = spool.result_path(sc_uid)
        if not path.exists():
            return None
        ds = spool.read_dataset(path, stop_before_pixels=True)
    return str(ds.get("ManufacturerModelName", "") or "cxr-model")


def _send_oru(
    dest: Hl7Destination, report: lifecycle.ReportFacts, model_name: str, settings: Settings
) -> Any:
    """The MLLP sender: one ORU^R01 for the classified image, checked for its ACK."""
    from worker.oru import build_oru, send_oru

    try:
        message = build_oru(
            report,
            model_name,
            urgent_threshold=settings.urgent_threshold,
            patient_id_storage=settings.patient_id_storage,
            sending_facility=settings.institution_name,
            receiving_application=settings.hl7_receiving_application,
            receiving_facility=settings.hl7_receiving_facility,
        )
        return send_oru(
            str(dest),
            dest.host,
            dest.port,
            message,
            report.sc_sop_instance_uid,
            settings.hl7_ack_timeout,
        )
    except Exception as exc:  # never let one crash the other deliveries
        log.warning("HL7 delivery to %s raised %s", dest, type(exc).__name__)
        return _Unreachable(f"{type(exc).__name__}")


@dataclass
class _Unreachable:
    error: str
    category: str = "unreachable"
    status: int | None = None


def _record(
    settings: Settings,
    instance_id: int,
    dest: AnyDestination,
    pending: list[tuple[str, str]],
    outcomes: list[Any],
    problems: list[str],
) -> None:
    """The attempt's outcome per result into the audit trail; failures into ``problems``."""
    attempts: list[lifecycle.Attempt] = []
    for (kind, uid), out in zip(pending, outcomes, strict=False):
        cat = str(getattr(out, "category", "failure"))
        metrics.DELIVERIES.labels(cat).inc()
        err = getattr(out, "error", None) or getattr(out, "detail", None)
        status = _status_text(out)
        attempts.append(lifecycle.Attempt(kind, uid, cat, status, str(err) if err else None))
        if cat not in ("success", "warning", "not_supported"):
            problems.append(f"{kind} to {dest.label}: {cat} {status or ''}".strip())
    lifecycle.record_delivery_attempts(settings.database_url, instance_id, str(dest), attempts)
    if len(outcomes) < len(pending):
        problems.append(f"{dest.label}: {len(pending) - len(outcomes)} result(s) unanswered")


# --------------------------------------------------------------------------- all in one
def process_instance(
    settings: Settings,
    instance_id: int,
    *,
    task_id: str | None = None,
    classifier: Any | None = None,
    force: bool = False,
    final_delivery_attempt: bool = False,
    handoff: Callable[[int, dict[str, Dataset]], None] | None = None,
    delivery_owner: str | None = None,
) -> Outcome:
    """Claim, classify and deliver one instance (raises :class:`DeliveryIncomplete` when a
    destination did not take the results and ``final_delivery_attempt`` is False; transient
    infrastructure errors propagate for the caller to retry; :class:`PermanentError`
    closes the instance as ``failed``).

    ``handoff``: where a freshly classified instance's first delivery goes instead of
    running here (the delivery lane, :mod:`worker.lane`): called with the instance id and
    the result datasets once the instance is ``classified``; the outcome is then
    ``delivery_queued``. ``delivery_owner``: that lane's owner id, recorded with the
    classification (:func:`db.lifecycle.record_classification`)."""
    # load the model BEFORE claiming: a first task in a fresh process may spend seconds
    # here, and must not look like a stale claim meanwhile
    clf = classifier if classifier is not None else get_classifier(settings)
    t_start = time.perf_counter()
    decision, state = claim(settings, instance_id, task_id=task_id, force=force)
    if decision == "skip":
        metrics.TASK_OUTCOMES.labels("skipped").inc()
        return Outcome(instance_id, "skipped", state)
    timings: dict[str, float] = {}
    verdict = None
    fresh: dict[str, Dataset] | None = None
    if decision == "classify":
        try:
            built, timings = classify(
                settings,
                instance_id,
                clf,
                delivery_owner=delivery_owner if handoff is not None else None,
            )
        except PermanentError as exc:
            reason = scrub(str(exc))
            mark_failed(settings, instance_id, reason)
            return Outcome(instance_id, "failed", State.FAILED.value, reason)
        verdict = built.verdict
        fresh = built.datasets
        if not settings.delivery_destinations:
            metrics.TASK_OUTCOMES.labels(State.CLASSIFIED.value).inc()
            timings["total"] = (time.perf_counter() - t_start) * 1000
            return Outcome(
                instance_id, "classified", State.CLASSIFIED.value, NO_DESTINATIONS, verdict, timings
            )
        if handoff is not None:
            handoff(instance_id, fresh)  # blocks while the lane is full: counted in total
            timings["total"] = (time.perf_counter() - t_start) * 1000
            return Outcome(
                instance_id, DELIVERY_QUEUED, State.CLASSIFIED.value, None, verdict, timings
            )
    out = deliver(
        settings,
        instance_id,
        final_attempt=final_delivery_attempt,
        built=fresh,
    )
    out.verdict = verdict
    out.timings_ms = {**timings, **out.timings_ms}
    out.timings_ms["total"] = (time.perf_counter() - t_start) * 1000
    return out
