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

    def failing_classify(settings, instance_id, classifier=None, **kw):  # type: ignore[no-untyped-def]
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


# ---------------------------------------- the lane's lease: a killed lane's work is re-sent
def test_lane_owner_ids_are_unique_and_fit_the_column() -> None:
    import os

    from worker.lane import new_owner_id

    a, b = new_owner_id(), new_owner_id()
    assert a != b and a.startswith("lane:") and f":{os.getpid()}:" in a
    assert len(a) <= 64  # instances.claimed_by and leases.name are String(64)


def test_heartbeat_takes_the_lease_before_start_returns_renews_it_and_gives_it_up() -> None:
    beats: list[tuple[str, bool, float]] = []
    lane = DeliveryLane(
        lambda job: None,
        heartbeat=lambda owner, renew: beats.append((owner, renew, time.monotonic())),
        heartbeat_every=0.05,
    )
    owner = lane.start()
    assert owner == lane.owner
    assert beats and beats[0][:2] == (owner, True)  # before any work can name the owner
    assert lane.start() == owner and len([b for b in beats if b[1]]) < 3  # idempotent
    time.sleep(0.5)
    renewals = [b for b in beats if b[1]]
    assert len(renewals) >= 4, renewals
    assert lane.stop(5)
    assert beats[-1][:2] == (owner, False)  # a clean stop gives the lease up
    n = len(beats)
    time.sleep(0.2)
    assert len(beats) == n  # and renews it no more


def test_a_lane_without_a_lease_hands_out_no_owner() -> None:
    """The DB is down when the lane starts: start() says no owner (the sweep's age rule
    covers that work), the heartbeat keeps trying, and owns up once it gets through."""
    down = threading.Event()
    down.set()

    def beat(owner: str, renew: bool) -> None:
        if down.is_set():
            raise sqlalchemy.exc.OperationalError("UPDATE leases", {}, Exception("db gone"))

    lane = DeliveryLane(lambda job: None, heartbeat=beat, heartbeat_every=0.05)
    assert lane.start() is None
    down.clear()
    time.sleep(0.3)
    assert lane.start() == lane.owner
    assert lane.stop(5)


_SEEDS: list[int] = []


def _classified(settings, owner: str | None, age_s: float) -> int:  # type: ignore[no-untyped-def]
    """A classified, undelivered instance whose first delivery was handed to ``owner``,
    classified ``age_s`` seconds ago."""
    from datetime import timedelta

    from sqlalchemy import update

    from db.models import utcnow

    _SEEDS.append(len(_SEEDS) + 100)
    iid = insert_instance(
        settings, dataset_bytes(make_chest_dataset(seed=_SEEDS[-1])), state=State.CLASSIFIED.value
    )
    with session_scope(settings.database_url) as s:
        s.execute(
            update(Instance)
            .where(Instance.id == iid)
            .values(claimed_by=owner, updated_at=utcnow() - timedelta(seconds=age_s))
        )
    return iid


def test_the_sweep_resends_a_dead_lanes_deliveries_at_once(db_url: str, tmp_path: Path) -> None:
    """An instance handed to a lane whose lease lapsed (or never existed) is an orphan: the
    sweep re-sends its delivery after the grace, not after CXR_REQUEUE_STALE_AFTER; one
    whose lane is alive, or that is younger than the grace, is left alone (SQLite and
    PostgreSQL)."""
    from datetime import timedelta

    from cxr.settings import load_settings
    from db import lifecycle
    from db.models import Lease, utcnow
    from db.session import init_db

    s = load_settings(database_url=db_url, spool_dir=tmp_path / "spool", metrics_port=0)
    init_db(db_url)
    alive, lapsed, gone = "lane:h:1:aaaa", "lane:h:2:bbbb", "lane:h:3:cccc"
    assert lifecycle.take_lease(db_url, alive, alive, 60)
    assert lifecycle.take_lease(db_url, lapsed, lapsed, 60, now=utcnow() - timedelta(seconds=120))
    ids = {
        "alive": _classified(s, alive, 30),
        "lapsed": _classified(s, lapsed, 30),
        "gone": _classified(s, gone, 30),
        "young": _classified(s, gone, 0),
        "no lane": _classified(s, None, 30),
    }
    sent: list[tuple[int, int | None]] = []

    def resend(i: int, attempt: int | None) -> None:
        sent.append((i, attempt))

    assert lifecycle.requeue_undelivered(db_url, resend, stale_after=3600, orphan_grace=5) == 2
    assert sorted(sent) == sorted([(ids["lapsed"], None), (ids["gone"], None)])
    with session_scope(db_url) as ss:
        for key in ("lapsed", "gone"):
            inst = ss.get(Instance, ids[key])
            assert inst is not None and inst.claimed_by is None  # the deliver task has it now
            ev = ss.execute(
                select(Event).where(
                    Event.instance_id == ids[key], Event.kind == "delivery_requeued"
                )
            ).scalar_one()
            assert ev.detail == "delivery re-sent: its worker's delivery lane is gone"
    # nothing twice; the live lane's work waits for its lane, the young one for the grace
    sent.clear()
    assert lifecycle.requeue_undelivered(db_url, resend, stale_after=3600, orphan_grace=5) == 0
    # the live lane dies (its lease given up): its work is re-sent on the next sweep
    assert lifecycle.release_lease(db_url, alive, alive)
    assert lifecycle.requeue_undelivered(db_url, resend, stale_after=3600, orphan_grace=5) == 1
    assert sent == [(ids["alive"], None)]
    # the age rule still covers work with no lane, and lapsed lane leases are pruned
    sent.clear()
    assert lifecycle.requeue_undelivered(db_url, resend, stale_after=10, orphan_grace=5) == 1
    assert sent == [(ids["no lane"], None)]
    assert lifecycle.prune_lane_leases(db_url, older_than=30) == 1  # the lapsed one
    with session_scope(db_url) as ss:
        assert {r.name for r in ss.execute(select(Lease)).scalars()} == {alive}


def test_a_finished_lane_attempt_gives_the_instance_up(
    tmp_path: Path, sqlite_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the lane's attempt is over (here: a retry scheduled), the instance no longer
    names the lane, so the death of that lane's process later does not make it an orphan
    (the retry already owns it: a second send would restart its attempt count)."""
    from db import lifecycle
    from worker import tasks

    s = _env_settings(monkeypatch, tmp_path, sqlite_url, tiny_model_dir)
    owner, other = "lane:h:1:aaaa", "lane:h:2:bbbb"
    mine = _classified(s, owner, 30)
    theirs = _classified(s, other, 30)
    seen: list[int] = []

    def attempt(app, settings, instance_id, n, built=None):  # type: ignore[no-untyped-def]
        seen.append(instance_id)
        return "delivery_retry"

    monkeypatch.setattr(tasks, "deliver_attempt", attempt)
    tasks._run_lane_job(Job(mine, {}, None, owner))
    tasks._run_lane_job(Job(theirs, {}, None, owner))  # not this lane's: left alone
    assert seen == [mine, theirs]
    assert _state(s.database_url, mine).claimed_by is None
    assert _state(s.database_url, theirs).claimed_by == other
    sent: list[int] = []
    # neither lane holds a lease: only the instance still naming a lane is an orphan
    assert (
        lifecycle.requeue_undelivered(s.database_url, lambda i, a: sent.append(i), stale_after=3600)
        == 1
    )
    assert sent == [theirs]
