"""Faults, end to end (Orthanc + `cxr node` + `cxr worker` subprocesses):

* a worker SIGKILLed mid-task, then restarted;
* the PACS stopped during delivery, then started again (and: delivery given up, then an
  admin re-send);
* the broker (a private redis-server) stopped during receipt, then started again.

After each, every instance ends in the right final state, exactly once: the PACS holds
exactly one SC and one SR series per source."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import select

from db.models import Delivery, Event, State
from db.session import session_scope
from tests.conftest import REPO, free_port
from tests.worker.conftest import RedisServer, Stack, wait_for
from tests.worker.test_e2e_pipeline import check_audit_story, check_pacs_holds_results

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, pytest.mark.timeout(300)]

SMALL = ("dx_thorax_monochrome1.dcm", "cr_chest_monochrome1_10bit_no_part10_header.dcm")


@pytest.fixture
def make_stack(tmp_path, orthanc, tiny_model_dir, model_cache_dir):  # type: ignore[no-untyped-def]
    stacks: list[Stack] = []

    def _make(db_url: str, broker_url: str = "", **env: object) -> Stack:
        st = Stack(tmp_path, orthanc, db_url, tiny_model_dir, model_cache_dir, broker_url, **env)
        stacks.append(st)
        return st

    yield _make
    for st in stacks:
        st.close()


def _push(stack: Stack, dicom_samples, names=SMALL) -> dict[str, str]:  # type: ignore[no-untyped-def]
    o = stack.orthanc
    held = {}
    for n in names:
        ans = o.upload(dicom_samples / "chest" / n)
        held[o.tags(ans["ID"])["SOPInstanceUID"]] = ans["ID"]
    o.push("cxr", list(held.values()))
    return held


def _events(stack: Stack, kind: str) -> list[Event]:
    with session_scope(stack.db_url) as s:
        return list(s.execute(select(Event).where(Event.kind == kind)).scalars())


@pytest.mark.redis
@pytest.mark.postgres
def test_worker_sigkilled_mid_task(pg_url, private_redis, make_stack, dicom_samples):  # type: ignore[no-untyped-def]
    stack = make_stack(pg_url, private_redis.url, CXR_REQUEUE_STALE_AFTER=6)
    # the test hook keeps the task in 'processing' for 30 s: it is surely in flight
    w1 = stack.start_worker(CXR_TEST_STAGE_DELAY=30)
    stack.start_node()
    sources = _push(stack, dicom_samples, names=SMALL[:1])
    wait_for(
        lambda: any(r.state == State.PROCESSING.value for r in stack.instances()),
        60,
        what="the instance in processing",
    )
    w1.kill(signal.SIGKILL)
    assert not w1.alive()
    (row,) = stack.instances()
    assert row.state == State.PROCESSING.value  # left behind by the dead worker
    assert stack.orthanc.instances() == list(sources.values())  # nothing delivered yet

    stack.start_worker()  # no delay; its sweep finds the stale claim and re-queues it
    rows = stack.wait_all_final(1, 90)
    assert rows[0].state == State.DELIVERED.value
    assert rows[0].attempts >= 2
    assert _events(stack, "takeover"), "the stale claim was not taken over"
    check_audit_story(stack, set(sources))
    check_pacs_holds_results(stack, sources)


@pytest.mark.redis
@pytest.mark.postgres
def test_sigkilled_task_is_redelivered_by_the_broker_in_its_timeout(
    pg_url, private_redis, make_stack, dicom_samples
):  # type: ignore[no-untyped-def]
    """Issue 9, defect 9: with the re-queue sweep out of the way (a stale age of an hour),
    Redis itself gives a SIGKILLed worker's task to the next worker after the redelivery
    timeout (CXR_TASK_TIME_LIMIT + CXR_RETRY_ETA_MAX + 15 s; 225 s with the defaults, here
    16 + 2 + 15 = 33 s), not after kombu's 100 s scan period on top of it."""
    stack = make_stack(
        pg_url,
        private_redis.url,
        CXR_REQUEUE_STALE_AFTER=3600,
        CXR_TASK_SOFT_TIME_LIMIT=14,
        CXR_TASK_TIME_LIMIT=16,
        CXR_RETRY_ETA_MAX=2,
    )
    timeout = 16 + 2 + 15
    w1 = stack.start_worker(CXR_TEST_STAGE_DELAY=10)
    stack.start_node()
    sources = _push(stack, dicom_samples, names=SMALL[:1])
    wait_for(
        lambda: any(r.state == State.PROCESSING.value for r in stack.instances()),
        60,
        what="the instance in processing",
    )
    seen = time.monotonic()
    w1.kill(signal.SIGKILL)
    stack.start_worker()
    rows = stack.wait_all_final(1, timeout + 60)
    waited = time.monotonic() - seen
    print(f"redelivered and delivered {waited:.1f} s after the claim (timeout {timeout} s)")
    assert rows[0].state == State.DELIVERED.value
    # not earlier than the timeout (nothing else re-sent it), and not a scan period late
    assert timeout - 5 <= waited <= timeout + 25, waited
    assert any(e.detail == "redelivered task resumes" for e in _events(stack, "takeover"))
    check_audit_story(stack, set(sources))
    check_pacs_holds_results(stack, sources)


@pytest.mark.redis
def test_pacs_down_during_delivery_then_back(private_redis, make_stack, tmp_path, dicom_samples):  # type: ignore[no-untyped-def]
    stack = make_stack(
        f"sqlite:///{tmp_path / 'audit.db'}",
        private_redis.url,
        CXR_DELIVERY_MAX_ATTEMPTS=30,
        CXR_RETRY_BACKOFF_MAX=1,
    )
    stack.start_worker(CXR_TEST_STAGE_DELAY=15)  # classification waits until the PACS is down
    stack.start_node()
    sources = _push(stack, dicom_samples)
    stack.orthanc.stop()

    def failed_attempts() -> list[Delivery]:
        with session_scope(stack.db_url) as s:
            return list(s.execute(select(Delivery).where(Delivery.state == "failed")).scalars())

    wait_for(failed_attempts, 60, what="a failed delivery attempt while the PACS is down")
    # nothing could be delivered: none is final yet (one may still be in the classifier)
    states = [r.state for r in stack.instances()]
    assert State.CLASSIFIED.value in states and State.DELIVERED.value not in states, states
    time.sleep(2)
    stack.orthanc.start()
    rows = stack.wait_all_final(len(sources), 90)
    assert all(r.state == State.DELIVERED.value for r in rows)
    with session_scope(stack.db_url) as s:
        dels = list(s.execute(select(Delivery)).scalars())
    assert len(dels) == 3 * len(sources)  # SC, SR and heat map
    assert all(d.state == "delivered" for d in dels)
    assert max(d.attempts for d in dels) >= 2
    check_audit_story(stack, set(sources))
    check_pacs_holds_results(stack, sources)


def test_delivery_gives_up_then_admin_resend(make_stack, tmp_path, dicom_samples):  # type: ignore[no-untyped-def]
    """Embedded broker. The PACS stays down: delivery_failed with the reason; once it is
    back, `cxr audit retry --state delivery_failed` re-sends and it is delivered."""
    stack = make_stack(
        f"sqlite:///{tmp_path / 'audit.db'}",
        CXR_DELIVERY_MAX_ATTEMPTS=2,
        CXR_RETRY_BACKOFF_MAX=1,
    )
    stack.start_worker(CXR_TEST_STAGE_DELAY=15)
    stack.start_node()
    sources = _push(stack, dicom_samples, names=SMALL[:1])
    stack.orthanc.stop()
    rows = stack.wait_all_final(1, 120)
    assert rows[0].state == State.DELIVERY_FAILED.value
    assert rows[0].reason and "unreachable" in rows[0].reason
    stack.orthanc.start()

    # the admin's re-send: delivery_failed -> classified + cxr.deliver_instance
    res = subprocess.run(
        [sys.executable, "-m", "apps.cli", "audit", "retry", "--state", "delivery_failed"],
        env=stack.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for(
        lambda: stack.instances()[0].state == State.DELIVERED.value,
        60,
        what="delivered after the admin re-send",
    )
    check_pacs_holds_results(stack, sources)


@pytest.mark.postgres
def test_broker_down_during_receipt_then_back(pg_url, make_stack, tmp_path, dicom_samples):  # type: ignore[no-untyped-def]
    redis = RedisServer(tmp_path / "redis", free_port()).start()
    try:
        stack = make_stack(pg_url, redis.url)
        stack.start_worker()
        stack.start_node()
        redis.stop()
        sources = _push(stack, dicom_samples)  # the node acknowledges: the files are durable
        rows = stack.instances()
        assert {r.sop_instance_uid for r in rows} == set(sources)
        assert all(r.state == State.RECEIVED.value for r in rows), [r.state for r in rows]
        time.sleep(2)
        redis.start()
        rows = stack.wait_all_final(len(sources), 120)
        assert all(r.state == State.DELIVERED.value for r in rows)
        check_audit_story(stack, set(sources))
        check_pacs_holds_results(stack, sources)
    finally:
        redis.stop()


def test_sigterm_is_a_warm_shutdown(make_stack, tmp_path, dicom_samples):  # type: ignore[no-untyped-def]
    """SIGTERM to `cxr worker` while a task is in flight: the task finishes (delivered)
    and the worker exits cleanly."""
    import os

    stack = make_stack(f"sqlite:///{tmp_path / 'audit.db'}")
    w = stack.start_worker(CXR_TEST_STAGE_DELAY=4)
    stack.start_node()
    sources = _push(stack, dicom_samples, names=SMALL[:1])
    wait_for(
        lambda: any(r.state == State.PROCESSING.value for r in stack.instances()),
        60,
        what="the instance in processing",
    )
    os.kill(w.p.pid, signal.SIGTERM)  # the main process only, as a service manager does
    assert w.p.wait(60) == 0, w.log()[-3000:]
    (row,) = stack.instances()
    assert row.state == State.DELIVERED.value, (row.state, w.log()[-3000:])
    check_pacs_holds_results(stack, sources)


@pytest.mark.redis
@pytest.mark.postgres
def test_worker_sigkilled_with_a_delivery_in_its_lane(
    pg_url, private_redis, make_stack, dicom_samples
):  # type: ignore[no-untyped-def]
    """Issue 10: the classify task has returned (acked: the broker will never redeliver
    it) and the instance's first delivery sits in the worker's delivery lane, waiting for
    a PACS that does not answer (Orthanc SIGSTOPped), when the worker is SIGKILLed. The
    lane's lease lapses (3 sweep intervals), the node's sweep re-sends the delivery at
    once - not after CXR_REQUEUE_STALE_AFTER, here an hour - and the next worker delivers
    it, exactly once."""
    import os

    stack = make_stack(pg_url, private_redis.url, CXR_REQUEUE_STALE_AFTER=3600)
    # the stage delay keeps the instance away from delivery until Orthanc is stopped
    w1 = stack.start_worker(CXR_TEST_STAGE_DELAY=2)
    stack.start_node()
    sources = _push(stack, dicom_samples, names=SMALL[:1])
    orthanc_pid = stack.orthanc.proc.pid
    os.kill(orthanc_pid, signal.SIGSTOP)
    try:
        wait_for(lambda: "delivery_queued" in w1.log(), 60, what="the task handed over")
        (row,) = stack.instances()
        assert row.state == State.CLASSIFIED.value and row.finished_at is None
        assert row.claimed_by and row.claimed_by.startswith("lane:"), row.claimed_by
        time.sleep(0.5)  # the lane thread is now waiting for the association
        w1.kill(signal.SIGKILL)
        killed = time.monotonic()
        (row,) = stack.instances()
        assert row.state == State.CLASSIFIED.value  # nothing went out
    finally:
        os.kill(orthanc_pid, signal.SIGCONT)
    wait_for(
        lambda: _events(stack, "delivery_requeued"), 30, what="the sweep re-sending the delivery"
    )
    resent = time.monotonic() - killed
    stack.start_worker()
    rows = stack.wait_all_final(1, 90)
    print(f"delivery re-sent {resent:.1f} s after the kill")
    assert resent < 20, resent  # 3 sweep intervals of 1 s, plus the orphan grace of 5 s
    assert rows[0].state == State.DELIVERED.value
    assert rows[0].attempts == 1  # classified once: only the delivery was re-sent
    (ev,) = _events(stack, "delivery_requeued")
    assert ev.detail == "delivery re-sent: its worker's delivery lane is gone"
    check_audit_story(stack, set(sources))
    check_pacs_holds_results(stack, sources)
