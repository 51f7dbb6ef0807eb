"""The delivery lane (worker/lane.py) and Celery's own retry of transient errors
(worker/tasks.py: autoretry_for + on_failure)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy.exc
from sqlalchemy import select

from db.models import Event, Instance, State
from db.session import session_scope
from tests.conftest import make_chest_dataset
from tests.worker.conftest import dataset_bytes, insert_instance
from tests.worker.test_worker_robustness import _eager_app, _env_settings, _state
from worker import pipeline
from worker.lane import DeliveryLane, Job


def test_lane_runs_jobs_off_the_caller_and_drains() -> None:
    ran: list[tuple[int, str]] = []
    lane = DeliveryLane(lambda job: ran.append((job.instance_id, threading.current_thread().name)))
    for i in range(5):
        lane.submit(Job(i))
    assert lane.drain(10)
    assert [i for i, _ in ran] == list(range(5))  # one thread: in order
    assert all(name.startswith("cxr-delivery-") for _, name in ran)
    assert lane.pending == 0
    assert lane.stop(5)


def test_a_full_lane_holds_the_producer_back() -> None:
    """At most ``depth`` jobs wait: the next submit blocks until the lane moves."""
    gate = threading.Event()
    started = threading.Event()

    def run(job: Job) -> None:
        started.set()
        gate.wait(30)

    lane = DeliveryLane(run, threads=1, depth=2)
    lane.submit(Job(1))
    assert started.wait(5)  # job 1 is running, the queue is empty
    lane.submit(Job(2))
    lane.submit(Job(3))  # the queue is full now
    fourth = threading.Thread(target=lane.submit, args=(Job(4),), daemon=True)
    fourth.start()
    fourth.join(0.5)
    assert fourth.is_alive(), "a full lane must block the producer"
    assert lane.pending == 4  # counted, still waiting to enter the queue
    gate.set()
    fourth.join(10)
    assert not fourth.is_alive()
    assert lane.drain(10) and lane.pending == 0
    assert lane.stop(5)


def test_a_submit_that_times_out_is_not_counted() -> None:
    """A full lane answers False after the timeout (the task then sends the delivery
    through the broker) and leaves no phantom pending job behind."""
    gate = threading.Event()
    started = threading.Event()

    def run(job: Job) -> None:
        started.set()
        gate.wait(30)

    lane = DeliveryLane(run, threads=1, depth=1)
    assert lane.submit(Job(1))
    assert started.wait(5)
    assert lane.submit(Job(2))  # fills the queue
    t0 = time.monotonic()
    assert lane.submit(Job(3), timeout=0.3) is False
    assert 0.25 <= time.monotonic() - t0 < 5
    assert lane.pending == 2
    gate.set()
    assert lane.drain(10) and lane.pending == 0
    assert lane.stop(5)


def test_stop_keeps_to_its_timeout_with_a_stuck_job() -> None:
    gate = threading.Event()
    lane = DeliveryLane(lambda job: gate.wait(30), threads=1, depth=1)
    lane.submit(Job(1))
    lane.submit(Job(2))
    t0 = time.monotonic()
    assert lane.stop(0.5) is False  # not drained: the sweep re-sends what is left
    assert time.monotonic() - t0 < 3
    gate.set()


def test_a_job_that_raises_does_not_stop_the_lane() -> None:
    seen: list[int] = []

    def run(job: Job) -> None:
        seen.append(job.instance_id)
        if job.instance_id == 1:
            raise RuntimeError("boom")

    lane = DeliveryLane(run)
    for i in (1, 2, 3):
        lane.submit(Job(i))
    assert lane.drain(10)
    assert seen == [1, 2, 3]
    assert lane.stop(5)


def test_drain_times_out_while_a_job_runs() -> None:
    gate = threading.Event()
    lane = DeliveryLane(lambda job: gate.wait(30))
    lane.submit(Job(1))
    t0 = time.monotonic()
    assert lane.drain(0.3) is False
    assert time.monotonic() - t0 < 5
    gate.set()
    assert lane.drain(10)
    assert lane.stop(5)


def test_datasets_are_released_after_the_job() -> None:
    jobs: list[Job] = []
    lane = DeliveryLane(jobs.append)
    lane.submit(Job(7, {"1.2.3": make_chest_dataset(rows=8, cols=8)}))
    assert lane.drain(10)
    assert jobs[0].datasets == {}  # the lane does not keep pixel data alive
    assert lane.stop(5)


# ------------------------------------------------ Celery's autoretry for transient errors
def test_transient_error_is_retried_by_celery_then_fails_with_the_reason(
    tmp_path: Path, sqlite_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database error on every try: Celery's autoretry runs CXR_TASK_MAX_RETRIES
    retries (eager apply runs them at once), the claim is released before each, and when
    they are used up on_failure closes the instance ``failed`` with the reason."""
    s = _env_settings(monkeypatch, tmp_path, sqlite_url, tiny_model_dir, CXR_TASK_MAX_RETRIES="2")
    app = _eager_app(s)
    from worker.celery_app import TASK_CLASSIFY

    iid = insert_instance(s, dataset_bytes(make_chest_dataset(rows=64, cols=64)))
    calls: list[str] = []
    real_classify = pipeline.classify

    def failing_classify(settings, instance_id, classifier=None):  # type: ignore[no-untyped-def]
        calls.append(_state(s.database_url, instance_id).state)
        raise sqlalchemy.exc.OperationalError("UPDATE instances", {}, Exception("db gone"))

    monkeypatch.setattr(pipeline, "classify", failing_classify)
    res = app.tasks[TASK_CLASSIFY].apply(args=[iid])
    assert res.failed()  # Celery gave up: the exception, after 1 try + 2 retries
    assert isinstance(res.result, sqlalchemy.exc.OperationalError)
    assert calls == [State.PROCESSING.value] * 3  # claimed afresh on every try
    inst = _state(s.database_url, iid)
    assert inst.state == State.FAILED.value
    assert inst.reason and inst.reason.startswith("gave up after 3 attempts: OperationalError")
    with session_scope(s.database_url) as ss:
        kinds = [
            e.kind for e in ss.execute(select(Event).where(Event.instance_id == iid)).scalars()
        ]
    assert kinds.count(State.PROCESSING.value) == 3 and kinds[-1] == State.FAILED.value
    # the claim was given up before every retry (and before giving up), with the reason
    with session_scope(s.database_url) as ss:
        retries = [
            e.detail
            for e in ss.execute(select(Event).where(Event.instance_id == iid)).scalars()
            if e.kind == "retry"
        ]
    assert len(retries) == 3 and all(d.startswith("transient: OperationalError") for d in retries)

    # the same instance, the database back: a re-run classifies it
    monkeypatch.setattr(pipeline, "classify", real_classify)
    out = app.tasks[TASK_CLASSIFY].apply(args=[iid], kwargs={"force": True}).get()
    assert out == "classified"
    with session_scope(s.database_url) as ss:
        assert ss.get(Instance, iid).state == State.CLASSIFIED.value  # type: ignore[union-attr]


def test_transient_error_in_delivery_ends_delivery_failed(
    tmp_path: Path, sqlite_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _env_settings(
        monkeypatch,
        tmp_path,
        sqlite_url,
        tiny_model_dir,
        CXR_TASK_MAX_RETRIES="1",
        CXR_DESTINATIONS="PACS@127.0.0.1:9",
    )
    app = _eager_app(s)
    from worker.celery_app import TASK_DELIVER

    iid = insert_instance(
        s, dataset_bytes(make_chest_dataset(rows=64, cols=64)), state=State.CLASSIFIED.value
    )
    tries: list[int] = []

    def failing_deliver(settings, instance_id, final_attempt=True, built=None):  # type: ignore[no-untyped-def]
        tries.append(instance_id)
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("db gone"))

    monkeypatch.setattr(pipeline, "deliver", failing_deliver)
    res = app.tasks[TASK_DELIVER].apply(args=[iid])
    assert res.failed() and len(tries) == 2
    inst = _state(s.database_url, iid)
    assert inst.state == State.DELIVERY_FAILED.value
    assert inst.reason and "gave up after 2 attempts" in inst.reason
