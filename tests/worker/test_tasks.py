"""The worker pipeline (worker.pipeline) and its Celery tasks (worker.tasks), against a real
audit database (SQLite and PostgreSQL), real sample files and a real PACS (Orthanc) as the
destination. The full multi-process flow is in test_e2e_*.py."""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from cxr.settings import load_settings
from db.lifecycle import delivery_plan
from db.models import Delivery, Event, Inference, Instance, State, utcnow
from db.session import init_db, session_scope
from tests.conftest import free_port, make_chest_dataset
from tests.worker.conftest import dataset_bytes, insert_instance
from worker import pipeline

pytestmark = pytest.mark.orthanc


def _settings(tmp_path: Path, db_url: str, model_dir: Path, dest: str = "", **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("spool_dir", tmp_path / "spool")
    s = load_settings(
        database_url=db_url,
        model_dir=model_dir,
        model_cache_dir=tmp_path / "model-cache",
        destinations=dest,
        metrics_port=0,
        **kw,
    )
    init_db(s.database_url)
    return s


def _dest(orthanc) -> str:  # type: ignore[no-untyped-def]
    return f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"


def _sample(dicom_samples: Path, name: str = "dx_thorax_monochrome1.dcm") -> Path:
    return dicom_samples / "chest" / name


def _state(settings, iid: int) -> Instance:  # type: ignore[no-untyped-def]
    with session_scope(settings.database_url) as s:
        inst = s.get(Instance, iid)
        assert inst is not None
        s.expunge(inst)
        return inst


def test_classify_and_deliver_to_pacs(tmp_path, db_url, tiny_model_dir, orthanc, dicom_samples):  # type: ignore[no-untyped-def]
    s = _settings(tmp_path, db_url, tiny_model_dir, _dest(orthanc))
    src = _sample(dicom_samples)
    iid = insert_instance(s, src)
    out = pipeline.process_instance(s, iid)
    assert out.action == "delivered", out
    assert {"decode", "preprocess", "forward", "cam", "build", "send", "total"} <= set(
        out.timings_ms
    )

    source = pydicom.dcmread(src, stop_before_pixels=True)
    with session_scope(s.database_url) as ss:
        inst = ss.get(Instance, iid)
        assert inst.state == State.DELIVERED.value and inst.finished_at is not None
        infs = ss.execute(select(Inference).where(Inference.instance_id == iid)).scalars().all()
        assert len(infs) == 1
        inf = infs[0]
        assert inf.p_covid + inf.p_normal + inf.p_other == pytest.approx(1.0, abs=1e-4)
        assert inf.verdict in ("COVID", "Normal", "Other")
        for col in (
            "t_decode_ms",
            "t_preprocess_ms",
            "t_forward_ms",
            "t_cam_ms",
            "t_build_ms",
            "t_send_ms",
            "t_total_ms",
        ):
            assert getattr(inf, col) is not None and getattr(inf, col) >= 0, col
        dels = ss.execute(select(Delivery).where(Delivery.instance_id == iid)).scalars().all()
        assert sorted(d.kind for d in dels) == ["HM", "SC", "SR"]
        assert all(d.state == "delivered" and d.last_status == "0x0000" for d in dels)
        kinds = [
            e.kind
            for e in ss.execute(
                select(Event).where(Event.instance_id == iid).order_by(Event.id)
            ).scalars()
        ]
        assert kinds == ["queued", "processing", "classified", "delivered"]
        sc_uid, sr_uid = inf.sc_sop_instance_uid, inf.sr_sop_instance_uid
        hm_uid = inf.hm_sop_instance_uid

    # the PACS holds exactly what we sent - the SC, the SR, the heat map - in the source's study
    tags = {t["SOPInstanceUID"]: t for t in orthanc.all_instance_tags()}
    assert set(tags) == {sc_uid, sr_uid, hm_uid}
    assert tags[hm_uid]["Modality"] == "SEG"
    for uid in (sc_uid, sr_uid, hm_uid):
        assert tags[uid]["StudyInstanceUID"] == source.StudyInstanceUID
        assert tags[uid]["SeriesInstanceUID"] != source.SeriesInstanceUID
    assert tags[sr_uid]["Modality"] == "SR"
    sc = pydicom.dcmread(io.BytesIO(orthanc.file(tags[sc_uid]["_id"])))
    assert sc.BurnedInAnnotation == "YES"
    assert "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription.upper()
    refs = [r.ReferencedSOPInstanceUID for r in sc.SourceImageSequence]
    assert refs == [source.SOPInstanceUID]


def test_rerun_replaces_not_duplicates(
    tmp_path, sqlite_url, tiny_model_dir, orthanc, dicom_samples
):  # type: ignore[no-untyped-def]
    s = _settings(tmp_path, sqlite_url, tiny_model_dir, _dest(orthanc))
    iid = insert_instance(s, _sample(dicom_samples))
    assert pipeline.process_instance(s, iid).action == "delivered"
    first = sorted(orthanc.instances())
    # a second message for a final instance is skipped, nothing is sent
    again = pipeline.process_instance(s, iid)
    assert again.action == "skipped" and again.state == State.DELIVERED.value
    # a forced re-run (admin) rebuilds, re-sends the same UIDs and upserts the rows
    # (mark the deliveries not done so that the results really go out a second time)
    with session_scope(s.database_url) as ss:
        ss.execute(update(Delivery).where(Delivery.instance_id == iid).values(state="failed"))
    forced = pipeline.process_instance(s, iid, force=True)
    assert forced.action == "delivered"
    assert sorted(orthanc.instances()) == first  # same SOP Instance UIDs: replaced
    with session_scope(s.database_url) as ss:
        assert ss.query(Inference).filter_by(instance_id=iid).count() == 1
        dels = ss.query(Delivery).filter_by(instance_id=iid).all()
        assert sorted(d.kind for d in dels) == ["HM", "SC", "SR"]
        assert all(d.attempts == 2 for d in dels)


def test_stale_processing_is_taken_over_fresh_one_is_not(
    tmp_path, sqlite_url, tiny_model_dir, dicom_samples
):  # type: ignore[no-untyped-def]
    s = _settings(tmp_path, sqlite_url, tiny_model_dir, requeue_stale_after=600)
    iid = insert_instance(s, _sample(dicom_samples), state="queued")
    # a worker claimed it (task A) and is alive: another task must not take it
    assert pipeline.claim(s, iid, task_id="task-A") == ("classify", "processing")
    assert pipeline.process_instance(s, iid, task_id="task-B").action == "skipped"
    # the same message redelivered (worker killed, same task id) resumes at once
    out = pipeline.process_instance(s, iid, task_id="task-A")
    assert out.action == "classified" and out.reason == pipeline.NO_DESTINATIONS
    # a claim older than CXR_REQUEUE_STALE_AFTER (a dead worker's): the re-queue sweep
    # re-sends it - and refreshes updated_at - and the new task takes it over
    iid2 = insert_instance(s, dataset_bytes(make_chest_dataset(rows=96, cols=80)))
    assert pipeline.claim(s, iid2, task_id="task-C")[0] == "classify"
    with session_scope(s.database_url) as ss:
        ss.execute(
            update(Instance)
            .where(Instance.id == iid2)
            .values(updated_at=utcnow() - timedelta(seconds=1200))
        )
    from db.lifecycle import requeue_stranded

    sent: list[int] = []  # what the sweep publishes (the broker itself is not under test)
    assert requeue_stranded(s, sent.append) == 1
    assert sent == [iid2]
    assert pipeline.process_instance(s, iid2, task_id="task-D").action == "classified"
    with session_scope(s.database_url) as ss:
        kinds = [e.kind for e in ss.query(Event).filter_by(instance_id=iid2).order_by(Event.id)]
    assert kinds[-4:] == ["requeued", "takeover", "processing", "classified"], kinds
    # a third, late message (e.g. from a second sweeper) finds it final
    assert pipeline.process_instance(s, iid2, task_id="task-E").action == "skipped"


def test_no_destinations_ends_classified_and_final(
    tmp_path, sqlite_url, tiny_model_dir, dicom_samples
):  # type: ignore[no-untyped-def]
    s = _settings(tmp_path, sqlite_url, tiny_model_dir)
    iid = insert_instance(s, _sample(dicom_samples))
    out = pipeline.process_instance(s, iid)
    assert out.action == "classified"
    inst = _state(s, iid)
    assert inst.state == State.CLASSIFIED.value and inst.reason == pipeline.NO_DESTINATIONS
    assert pipeline.is_finished(inst.state, inst.finished_at)
    assert pipeline.process_instance(s, iid).action == "skipped"
    # the results were still built and kept in the spool
    with session_scope(s.database_url) as ss:
        inf = ss.query(Inference).filter_by(instance_id=iid).one()
    from cxr.storage import Spool

    assert Spool(s.spool_dir).result_path(inf.sc_sop_instance_uid).is_file()


def test_undecodable_instance_fails_with_reason(tmp_path, sqlite_url, tiny_model_dir):  # type: ignore[no-untyped-def]
    s = _settings(tmp_path, sqlite_url, tiny_model_dir)
    ds = make_chest_dataset(rows=64, cols=64)
    ds.PixelData = ds.PixelData[:100]  # truncated pixel data
    iid = insert_instance(s, dataset_bytes(ds))
    out = pipeline.process_instance(s, iid)
    assert out.action == "failed"
    inst = _state(s, iid)
    assert inst.state == State.FAILED.value
    assert inst.reason and "decode" in inst.reason
    # and it is final: not retried by another message
    assert pipeline.process_instance(s, iid).action == "skipped"


def test_unreachable_destination_then_delivery_failed_then_resend(
    tmp_path, sqlite_url, tiny_model_dir, orthanc, dicom_samples
):  # type: ignore[no-untyped-def]
    dead = f"DEAD@127.0.0.1:{free_port()}"  # nobody listens there
    s = _settings(tmp_path, sqlite_url, tiny_model_dir, f"{dead},{_dest(orthanc)}")
    iid = insert_instance(s, _sample(dicom_samples))
    with pytest.raises(pipeline.DeliveryIncomplete):
        pipeline.process_instance(s, iid)
    assert _state(s, iid).state == State.CLASSIFIED.value
    # Orthanc got the three results on the first attempt; it is not sent to again
    n_orthanc = len(orthanc.instances())
    assert n_orthanc == 3
    out = pipeline.deliver(s, iid, final_attempt=True)
    assert out.action == "delivery_failed"
    inst = _state(s, iid)
    assert inst.state == State.DELIVERY_FAILED.value and "DEAD" in (inst.reason or "")
    with session_scope(s.database_url) as ss:
        rows = {
            (d.destination.split("@")[0], d.kind): d
            for d in ss.query(Delivery).filter_by(instance_id=iid)
        }
    assert rows[("DEAD", "SC")].state == "failed" and rows[("DEAD", "SC")].attempts == 2
    assert rows[("ORTHANC", "SC")].state == "delivered" and rows[("ORTHANC", "SC")].attempts == 1
    # an admin re-send once the destination is fixed: only to the missing one
    s2 = _settings(tmp_path, sqlite_url, tiny_model_dir, _dest(orthanc))
    assert pipeline.deliver(s2, iid, final_attempt=True).action == "delivered"
    assert _state(s2, iid).state == State.DELIVERED.value


def test_a_retry_reads_the_results_from_a_relative_spool_dir(
    tmp_path, sqlite_url, tiny_model_dir, orthanc, dicom_samples, monkeypatch
):  # type: ignore[no-untyped-def]
    """The default CXR_SPOOL_DIR is relative (``var/spool``). A later attempt (retry, or an
    admin's ``cxr audit retry``) reads the results back from the spool: it once looked in
    ``var/spool/var/spool/results/`` and closed the instance with FileNotFoundError."""
    monkeypatch.chdir(tmp_path)
    dead = f"DEAD@127.0.0.1:{free_port()}"
    s = _settings(tmp_path, sqlite_url, tiny_model_dir, dead, spool_dir=Path("var/spool"))
    iid = insert_instance(s, _sample(dicom_samples))
    with pytest.raises(pipeline.DeliveryIncomplete):
        pipeline.process_instance(s, iid)
    assert (tmp_path / "var" / "spool" / "results").is_dir()
    # the PACS is fixed: the next attempt has no datasets in memory, only the spool
    s2 = _settings(
        tmp_path, sqlite_url, tiny_model_dir, _dest(orthanc), spool_dir=Path("var/spool")
    )
    out = pipeline.deliver(s2, iid, final_attempt=True)
    assert out.action == "delivered", out
    assert _state(s2, iid).state == State.DELIVERED.value
    assert len(orthanc.instances()) == 3  # SC, SR, heat map


def test_new_content_under_a_known_uid_gets_new_result_uids(
    tmp_path, sqlite_url, tiny_model_dir, orthanc, dicom_samples
):  # type: ignore[no-untyped-def]
    """Contents received under one SOP Instance UID (the node records versions 1, 2, 3):
    the same image in other header bytes (the PACS re-sending the study) keys its results
    as the first one, so they replace them instead of adding a second result series; other
    pixels under the same UID get results under new UIDs, or the PACS (Orthanc keeps the
    first object under a UID) would go on showing the first verdict."""
    s = _settings(tmp_path, sqlite_url, tiny_model_dir, _dest(orthanc))
    first = pydicom.dcmread(_sample(dicom_samples))
    iid1 = insert_instance(s, _sample(dicom_samples))
    assert pipeline.process_instance(s, iid1).action == "delivered"
    resent = pydicom.dcmread(_sample(dicom_samples))
    resent.InstitutionName = "FORWARDED BY THE PACS"  # other bytes, the same image
    iid2 = insert_instance(s, dataset_bytes(resent), version=2)
    assert pipeline.process_instance(s, iid2).action == "delivered"
    other = make_chest_dataset(rows=256, cols=256)
    other.SOPInstanceUID = first.SOPInstanceUID
    other.StudyInstanceUID = first.StudyInstanceUID
    iid3 = insert_instance(s, dataset_bytes(other), version=3)
    assert pipeline.process_instance(s, iid3).action == "delivered"

    def result_uids(iid: int) -> set[str]:
        with session_scope(s.database_url) as ss:
            inf = ss.query(Inference).filter_by(instance_id=iid).one()
            return {inf.sc_sop_instance_uid, inf.sr_sop_instance_uid, inf.hm_sop_instance_uid}

    uids1, uids2, uids3 = result_uids(iid1), result_uids(iid2), result_uids(iid3)
    assert len(uids1) == len(uids3) == 3
    assert uids2 == uids1  # the same image: the same results, replaced in the PACS
    assert uids3.isdisjoint(uids1)  # other pixels: new results beside the first ones
    assert len(orthanc.instances()) == 6
    # version 1's file is purged by retention: a forced re-run of version 2 keeps its
    # recorded UIDs, and a 4th copy of the same image matches version 2 and takes them too
    with session_scope(s.database_url) as ss:
        ss.execute(update(Instance).where(Instance.id == iid1).values(spool_path=None))
        ss.execute(update(Delivery).where(Delivery.instance_id == iid2).values(state="failed"))
    assert pipeline.process_instance(s, iid2, force=True).action == "delivered"
    assert result_uids(iid2) == uids1
    again = pydicom.dcmread(_sample(dicom_samples))
    again.InstitutionName = "FORWARDED AGAIN"
    iid4 = insert_instance(s, dataset_bytes(again), version=4)
    assert pipeline.process_instance(s, iid4).action == "delivered"
    assert result_uids(iid4) == uids1
    assert len(orthanc.instances()) == 6


def test_celery_task_eager_runs_pipeline(
    tmp_path, sqlite_url, tiny_model_dir, orthanc, dicom_samples, workdir, monkeypatch
):  # type: ignore[no-untyped-def]
    """The registered task names run the pipeline (eager apply: same code path as a worker)."""
    monkeypatch.setenv("CXR_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("CXR_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("CXR_MODEL_DIR", str(tiny_model_dir))
    monkeypatch.setenv("CXR_DESTINATIONS", _dest(orthanc))
    monkeypatch.setenv("CXR_METRICS_PORT", "0")
    from cxr.settings import get_settings
    from worker.celery_app import TASK_CLASSIFY, TASK_DELIVER, make_celery
    from worker.lane import current_lane

    get_settings.cache_clear()
    s = get_settings()
    init_db(s.database_url)
    app = make_celery(s)
    import worker.tasks  # noqa: F401

    app.loader.import_default_modules()
    assert {TASK_CLASSIFY, TASK_DELIVER} <= set(app.tasks)
    iid = insert_instance(s, _sample(dicom_samples))
    res = app.tasks[TASK_CLASSIFY].apply(args=[iid])
    # the first delivery runs in the process's delivery lane (CXR_DELIVERY_THREADS=1)
    assert res.get() == "delivery_queued"
    lane = current_lane()
    assert lane is not None and lane.drain(60)
    assert _state(s, iid).state == State.DELIVERED.value
    assert app.tasks[TASK_DELIVER].apply(args=[iid]).get() == "skipped"


def test_backoff_is_exponential_and_capped(tmp_path, sqlite_url, tiny_model_dir):  # type: ignore[no-untyped-def]
    from worker.tasks import backoff_seconds

    s = _settings(tmp_path, sqlite_url, tiny_model_dir, retry_backoff_max=80)
    for retries in range(8):
        cap = min(80, 5 * 2**retries)
        vals = {backoff_seconds(retries, s) for _ in range(50)}
        assert all(max(1, cap // 2) <= v <= cap for v in vals), (retries, vals)
    assert max(backoff_seconds(10, s) for _ in range(200)) <= 80


def test_default_delivery_schedule_outlasts_a_pacs_restart(tmp_path, sqlite_url, tiny_model_dir):  # type: ignore[no-untyped-def]
    """Issue 9, defect 5: with the default settings the attempts span well over the 60 s
    a PACS restart takes (they used to be spent in 5.6-13.9 s)."""
    from worker.tasks import backoff_seconds

    s = _settings(tmp_path, sqlite_url, tiny_model_dir)
    assert s.delivery_max_attempts == 10 and s.retry_backoff_max == 300
    for _ in range(20):
        waits = [backoff_seconds(a, s) for a in range(s.delivery_max_attempts - 1)]
        assert sum(waits) >= 600  # at least 10 minutes between the first and last attempt
        assert max(waits) <= 300


def test_tasks_health_reports_a_wedged_pool(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """/healthz of a worker turns unhealthy when a live pool process has run one task for
    longer than the hard limit (issue 9: health that tells the truth); a dead pool
    process's marker (SIGKILL, its task is redelivered) does not count and is removed."""
    import os
    import subprocess
    import time

    from worker.pipeline import TASK_STATUS_ENV, mark_busy, tasks_healthy

    monkeypatch.setenv(TASK_STATUS_ENV, str(tmp_path))
    assert tasks_healthy(60)
    mark_busy(True)
    assert tasks_healthy(60)
    assert not tasks_healthy(60, now=time.time() + 120)  # the same task 2 minutes later
    mark_busy(False)
    assert tasks_healthy(60, now=time.time() + 120)
    dead = subprocess.Popen(["true"])
    dead.wait()
    marker = tmp_path / f"busy-{dead.pid}"
    marker.write_text("0")
    os.utime(marker, (0, 0))
    assert tasks_healthy(60) and not marker.exists()


@pytest.mark.redis
def test_long_delivery_backoff_waits_in_the_db_not_in_the_broker(
    tmp_path, db_url, tiny_model_dir, private_redis
):  # type: ignore[no-untyped-def]
    """Issue 9, defect 9: a retry wait the broker would hold longer than
    CXR_RETRY_ETA_MAX is written to the audit DB instead (Redis would otherwise need a
    visibility timeout longer than the wait, and a killed worker's task would wait that
    long too); the sweep sends it once it is due, exactly once with two sweepers."""
    import redis

    from cxr.contracts import send_deliver
    from db import lifecycle
    from worker.celery_app import QUEUE, make_celery
    from worker.tasks import _schedule_delivery

    def requeue_undelivered(s, app, stale_after):  # type: ignore[no-untyped-def]
        """The node's undelivered sweep (db.lifecycle), sending through this app."""
        return lifecycle.requeue_undelivered(
            s.database_url, lambda i, attempt: send_deliver(app, i, attempt), stale_after
        )

    dead = f"DEAD@127.0.0.1:{free_port()}"
    s = _settings(
        tmp_path,
        db_url,
        tiny_model_dir,
        dead,
        broker_url=private_redis.url,
        retry_backoff_base=40,
        retry_eta_max=10,
    )
    app = make_celery(s)
    r = redis.Redis.from_url(private_redis.url)
    iid = insert_instance(s, dataset_bytes(make_chest_dataset()), state=State.CLASSIFIED.value)

    before = utcnow()
    _schedule_delivery(app, iid, s, attempt=1)
    assert r.llen(QUEUE) == 0  # nothing parked in the broker
    inst = _state(s, iid)
    assert inst.retry_attempt == 2
    due = (
        inst.retry_due_at.replace(tzinfo=before.tzinfo)
        if inst.retry_due_at.tzinfo is None
        else inst.retry_due_at
    )  # type: ignore[union-attr]
    assert before + timedelta(seconds=19) <= due <= utcnow() + timedelta(seconds=41)
    # not due yet: the sweep sends nothing, and the stale-undelivered rule leaves it alone
    assert requeue_undelivered(s, app, stale_after=0) == 0
    assert r.llen(QUEUE) == 0
    # due: sent once, with its attempt number; a second sweeper finds nothing
    with session_scope(s.database_url) as ss:
        ss.execute(
            update(Instance)
            .where(Instance.id == iid)
            .values(retry_due_at=utcnow() - timedelta(seconds=1))
        )
    assert requeue_undelivered(s, app, stale_after=3600) == 1
    assert requeue_undelivered(s, app, stale_after=3600) == 0
    assert r.llen(QUEUE) == 1
    import json

    msg = json.loads(r.lindex(QUEUE, 0))
    assert msg["headers"]["task"] == "cxr.deliver_instance"
    assert json.loads(__import__("base64").b64decode(msg["body"]))[1] == {"attempt": 2}
    assert _state(s, iid).retry_due_at is None
    # a due retry of an instance that finished meanwhile is dropped, not sent
    lifecycle.schedule_delivery_retry(s.database_url, iid, 3, 0)
    with session_scope(s.database_url) as ss:
        ss.execute(
            update(Instance)
            .where(Instance.id == iid)
            .values(state=State.DELIVERED.value, finished_at=utcnow())
        )
    assert lifecycle.take_due_delivery_retries(s.database_url) == []
    assert _state(s, iid).retry_due_at is None

    # a short wait stays a broker countdown (published now, with an ETA)
    r.delete(QUEUE)
    s2 = _settings(
        tmp_path,
        db_url,
        tiny_model_dir,
        dead,
        broker_url=private_redis.url,
        retry_backoff_base=4,
        retry_eta_max=10,
    )
    iid2 = insert_instance(
        s2, dataset_bytes(make_chest_dataset(seed=2)), state=State.CLASSIFIED.value
    )
    _schedule_delivery(app, iid2, s2, attempt=1)
    assert r.llen(QUEUE) == 1
    assert json.loads(r.lindex(QUEUE, 0))["headers"]["eta"]
    assert _state(s2, iid2).retry_due_at is None


def test_redelivery_timeout_follows_the_task_limits(tmp_path, sqlite_url, tiny_model_dir):  # type: ignore[no-untyped-def]
    """The Redis visibility timeout is the time limit + the longest broker-held wait +
    15 s (225 s with the defaults, was 360 s), and kombu scans for expired messages every
    5 s (it scanned every 100 s)."""
    from worker.celery_app import make_celery

    s = _settings(tmp_path, sqlite_url, tiny_model_dir, broker_url="redis://127.0.0.1:6379/0")
    assert s.redelivery_timeout == s.task_time_limit + s.retry_eta_max + 15 == 225
    opts = make_celery(s).conf.broker_transport_options
    assert opts["visibility_timeout"] == 225
    assert opts["unacked_restore_interval"] == 5 and opts["unacked_restore_throttle"] == 1


@pytest.mark.parametrize("send_heatmap", [True, False])
def test_heatmap_is_built_unless_switched_off(
    tmp_path, sqlite_url, tiny_model_dir, dicom_samples, send_heatmap: bool
):  # type: ignore[no-untyped-def]
    """CXR_SEND_HEATMAP: the heat map is recorded and kept with the SC/SR, or not built
    at all (and the SR then does not reference one)."""
    from cxr.storage import Spool

    s = _settings(tmp_path, sqlite_url, tiny_model_dir, send_heatmap=send_heatmap)
    iid = insert_instance(s, _sample(dicom_samples))
    assert pipeline.process_instance(s, iid).action == "classified"
    with session_scope(s.database_url) as ss:
        inf = ss.query(Inference).filter_by(instance_id=iid).one()
    spool = Spool(s.spool_dir)
    sr = pydicom.dcmread(spool.result_path(inf.sr_sop_instance_uid))
    referenced = {str(e.value) for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    if send_heatmap:
        assert inf.hm_sop_instance_uid and inf.hm_series_uid
        hm = pydicom.dcmread(spool.result_path(inf.hm_sop_instance_uid))
        assert hm.Modality == "SEG" and hm.SegmentationType == "FRACTIONAL"
        assert inf.hm_sop_instance_uid in referenced
    else:
        assert inf.hm_sop_instance_uid is None and inf.hm_series_uid is None
        assert len(list(spool.results.iterdir())) == 2  # SC and SR only


def test_a_pacs_without_segmentation_storage_still_gets_sc_and_sr(
    tmp_path, sqlite_url, tiny_model_dir, dicom_samples
):  # type: ignore[no-untyped-def]
    """The heat map is optional: a PACS that accepts no presentation context for
    Segmentation Storage gets the SC and SR, the heat-map row says `not_supported` (not
    retried), and the instance is delivered, not delivery_failed."""
    from pydicom.uid import (
        ComprehensiveSRStorage,
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
    )
    from pynetdicom import AE, evt

    received: list[str] = []

    def on_store(event) -> int:  # type: ignore[no-untyped-def]
        received.append(str(event.request.AffectedSOPClassUID))
        return 0x0000

    ae = AE(ae_title="OLD_PACS")
    for uid in (SecondaryCaptureImageStorage, ComprehensiveSRStorage):
        ae.add_supported_context(uid, ExplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        s = _settings(tmp_path, sqlite_url, tiny_model_dir, f"OLD_PACS@127.0.0.1:{port}")
        iid = insert_instance(s, _sample(dicom_samples))
        assert pipeline.process_instance(s, iid).action == "delivered"
        assert _state(s, iid).state == State.DELIVERED.value
        with session_scope(s.database_url) as ss:
            rows = {d.kind: d for d in ss.query(Delivery).filter_by(instance_id=iid).all()}
            assert rows["SC"].state == "delivered" and rows["SR"].state == "delivered"
            assert rows["HM"].state == "not_supported"
            assert "Segmentation Storage" in (rows["HM"].last_error or "")
        assert sorted(received) == sorted([SecondaryCaptureImageStorage, ComprehensiveSRStorage])
        # nothing left to send: a re-delivery does not try the heat map again
        plan = delivery_plan(s.database_url, iid)
        assert plan is not None and all(
            (f"OLD_PACS@127.0.0.1:{port}", uid) in plan.done for _, uid in plan.results
        )
    finally:
        server.shutdown()
