"""Review fixes: a broken model is the worker's problem (retried, instance not failed,
/healthz unhealthy); ``cxr audit retry`` revives an instance that ran out of attempts;
the ``cxr_queue_depth`` gauge follows the audit DB; PHI never reaches a traceback or an
audit reason; ``cxr_instances_received_total`` has no peer-controlled label."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, update

from cxr import logconfig
from cxr.settings import get_settings
from db.models import Event, Instance, State
from db.session import init_db, session_scope
from tests.conftest import make_chest_dataset
from tests.worker.conftest import dataset_bytes, insert_instance
from worker import pipeline


def _state(url: str, iid: int) -> Instance:
    with session_scope(url) as s:
        inst = s.get(Instance, iid)
        assert inst is not None
        s.expunge(inst)
        return inst


def _env_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, model_dir: Path, **env: str
):  # type: ignore[no-untyped-def]
    values = {
        "CXR_DATABASE_URL": url,
        "CXR_SPOOL_DIR": str(tmp_path / "spool"),
        "CXR_MODEL_DIR": str(model_dir),
        "CXR_MODEL_CACHE_DIR": str(tmp_path / "model-cache"),
        "CXR_METRICS_PORT": "0",
        **env,
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    s = get_settings()
    init_db(s.database_url)
    return s


def _eager_app(settings):  # type: ignore[no-untyped-def]
    from worker.celery_app import make_celery

    app = make_celery(settings)
    import worker.tasks  # noqa: F401

    app.loader.import_default_modules()
    return app


@pytest.fixture
def fresh_classifier():  # type: ignore[no-untyped-def]
    from ml.runtime import clear_classifier_cache

    pipeline.reset_classifier()
    clear_classifier_cache()
    yield
    pipeline.reset_classifier()
    clear_classifier_cache()
    pipeline._set_model_error(None)


# ------------------------------------------------------------------------------ A: model
def test_broken_model_is_retried_not_the_instances_failure(
    tmp_path, sqlite_url, tiny_model_dir, workdir, monkeypatch, fresh_classifier
):  # type: ignore[no-untyped-def]
    from cxr.health import health_report, register_health_check, unregister_health_check
    from worker.celery_app import TASK_CLASSIFY
    from worker.tasks import MODEL_UNAVAILABLE

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = sorted(
        p for p in broken.rglob("*") if p.is_file() and p.suffix in (".h5", ".keras", ".onnx")
    )
    assert weights, list(broken.rglob("*"))
    originals = {p: p.read_bytes() for p in weights}
    for p in weights:
        p.write_bytes(b"not a model")
    status_file = tmp_path / "model-status"
    monkeypatch.setenv(pipeline.MODEL_STATUS_ENV, str(status_file))
    s = _env_settings(monkeypatch, tmp_path, sqlite_url, broken, CXR_TASK_MAX_RETRIES="2")
    app = _eager_app(s)
    register_health_check("model", pipeline.model_healthy)
    try:
        iid = insert_instance(s, dataset_bytes(make_chest_dataset(rows=64, cols=64)))
        before = REGISTRY.get_sample_value("cxr_tasks_total", {"outcome": MODEL_UNAVAILABLE}) or 0
        # eager apply runs the retries at once: 1 try + 2 retries, then the message is dropped
        assert app.tasks[TASK_CLASSIFY].apply(args=[iid]).get() == MODEL_UNAVAILABLE
        after = REGISTRY.get_sample_value("cxr_tasks_total", {"outcome": MODEL_UNAVAILABLE})
        assert after == before + 3
        inst = _state(s.database_url, iid)
        assert inst.state == State.QUEUED.value  # not failed: the sweep re-sends it later
        assert (inst.attempts or 0) == 0 and inst.finished_at is None and inst.reason is None
        with session_scope(s.database_url) as ss:
            kinds = [
                e.kind for e in ss.execute(select(Event).where(Event.instance_id == iid)).scalars()
            ]
        assert State.FAILED.value not in kinds and State.PROCESSING.value not in kinds
        # the worker's /healthz says the model is the problem
        assert status_file.exists() and "cannot load the model" in status_file.read_text()
        ok, checks = health_report()
        assert not ok and checks["model"] is False
        # the artifact is repaired: the same message (re-sent by the sweep) is processed
        for p, data in originals.items():
            p.write_bytes(data)
        assert app.tasks[TASK_CLASSIFY].apply(args=[iid]).get() == "classified"
        inst = _state(s.database_url, iid)
        assert inst.state == State.CLASSIFIED.value and inst.attempts == 1
        assert not status_file.exists() and health_report()[1]["model"] is True
    finally:
        unregister_health_check("model")


def test_soft_time_limit_while_loading_is_model_unavailable(
    tmp_path, sqlite_url, tiny_model_dir, workdir, monkeypatch, fresh_classifier
):  # type: ignore[no-untyped-def]
    from celery.exceptions import SoftTimeLimitExceeded

    import ml.runtime

    def _slow_load(settings):  # type: ignore[no-untyped-def]
        raise SoftTimeLimitExceeded("soft time limit (1s) exceeded")

    monkeypatch.setattr(ml.runtime, "get_classifier", _slow_load)
    s = _env_settings(monkeypatch, tmp_path, sqlite_url, tiny_model_dir)
    iid = insert_instance(s, dataset_bytes(make_chest_dataset(rows=64, cols=64)))
    with pytest.raises(pipeline.ModelUnavailable, match="SoftTimeLimitExceeded"):
        pipeline.process_instance(s, iid)
    assert _state(s.database_url, iid).state == State.QUEUED.value
    assert not pipeline.model_healthy()


# ------------------------------------------------------------------------------ B: retry
@pytest.mark.redis
def test_audit_retry_revives_instance_out_of_attempts(
    tmp_path, sqlite_url, tiny_model_dir, workdir, monkeypatch, redis_db, capsys
):  # type: ignore[no-untyped-def]
    import json

    import redis

    from apps.cli import main
    from worker.celery_app import TASK_CLASSIFY

    s = _env_settings(monkeypatch, tmp_path, sqlite_url, tiny_model_dir, CXR_BROKER_URL=redis_db)
    ds = make_chest_dataset(rows=64, cols=64)
    iid = insert_instance(s, dataset_bytes(ds))
    with session_scope(s.database_url) as ss:  # e.g. the worker kept dying on it
        ss.execute(
            update(Instance).where(Instance.id == iid).values(attempts=s.task_max_retries + 2)
        )
    assert pipeline.process_instance(s, iid).action == "skipped"
    inst = _state(s.database_url, iid)
    assert inst.state == State.FAILED.value and "gave up" in (inst.reason or "")

    rc = main(["audit", "retry", str(ds.SOPInstanceUID), "--database-url", s.database_url])
    out, err = capsys.readouterr()
    assert rc == 0, err
    inst = _state(s.database_url, iid)
    assert inst.state == State.QUEUED.value and inst.attempts == 0 and inst.reason is None
    msgs = [json.loads(m) for m in redis.Redis.from_url(redis_db).lrange("cxr", 0, -1)]
    assert [m["headers"]["task"] for m in msgs] == [TASK_CLASSIFY]
    # the worker runs the sent task: claimed afresh, not failed again at once
    app = _eager_app(s)
    assert app.tasks[TASK_CLASSIFY].apply(args=[iid]).get() == "classified"
    inst = _state(s.database_url, iid)
    assert inst.state == State.CLASSIFIED.value and inst.attempts == 1


# ------------------------------------------------------------------------------ C: gauge
def test_worker_sweep_sets_queue_depth_gauge(
    tmp_path, sqlite_url, tiny_model_dir, workdir, monkeypatch
):  # type: ignore[no-untyped-def]
    from apps.worker_cli import sweep_once
    from db.lifecycle import queue_depth

    s = _env_settings(monkeypatch, tmp_path, sqlite_url, tiny_model_dir)
    app = _eager_app(s)
    ids = [
        insert_instance(s, dataset_bytes(make_chest_dataset(rows=32, cols=32, seed=i)), state=st)
        for i, st in enumerate(["queued", "queued", "received", "delivered", "failed"])
    ]
    sweep_once(s, app)
    assert REGISTRY.get_sample_value("cxr_queue_depth") == 3
    with session_scope(s.database_url) as ss:
        ss.execute(update(Instance).where(Instance.id.in_(ids[:2])).values(state="delivered"))
    sweep_once(s, app)
    assert REGISTRY.get_sample_value("cxr_queue_depth") == 1
    assert queue_depth(s) == 1


# ------------------------------------------------------------------------------ D: PHI
@pytest.fixture
def phi_log():  # type: ignore[no-untyped-def]
    """A logger whose handlers (plain and JSON) carry the PHI filter, like configure_logging."""
    plain, js = io.StringIO(), io.StringIO()
    logger = logging.getLogger("tests.phi")
    handlers = []
    for buf, fmt in (
        (plain, logging.Formatter("%(levelname)s %(message)s")),
        (js, logconfig.JsonFormatter()),
    ):
        h = logging.StreamHandler(buf)
        h.addFilter(logconfig.PhiFilter())
        h.setFormatter(fmt)
        logger.addHandler(h)
        handlers.append(h)
    logger.propagate = False
    try:
        yield logger, plain, js
    finally:
        for h in handlers:
            logger.removeHandler(h)
        logger.propagate = True


def test_phi_is_scrubbed_from_tracebacks_and_stacks(phi_log) -> None:  # type: ignore[no-untyped-def]
    logger, plain, js = phi_log
    logconfig.register_phi("Zyxwvut^Quentin", "PIDQ-998877")
    try:
        raise ValueError("bad header for Zyxwvut^Quentin (PIDQ-998877)")
    except ValueError:
        logger.exception("instance %d: unexpected error", 7)
    logger.warning("look at %s", "Quentin", stack_info=True)
    for buf in (plain, js):
        text = buf.getvalue()
        assert "Traceback" in text and "ValueError" in text and "instance 7" in text
        assert "Zyxwvut" not in text and "Quentin" not in text and "PIDQ-998877" not in text
        assert "[PHI]" in text
    assert "Stack (most recent call last)" in plain.getvalue()
    assert '"stack"' in js.getvalue()


def test_pipeline_registers_phi_on_read_and_scrubs_reasons(
    tmp_path, sqlite_url, tiny_model_dir, workdir, monkeypatch, fresh_classifier
):  # type: ignore[no-untyped-def]
    s = _env_settings(monkeypatch, tmp_path, sqlite_url, tiny_model_dir)
    ds = make_chest_dataset(
        rows=64, cols=64, patient_name="Plmokn^Ijuhbz", patient_id="PIDX-55443322"
    )
    ds.PixelData = ds.PixelData[:100]  # fails after the dataset is read, before any result
    iid = insert_instance(s, dataset_bytes(ds))
    assert pipeline.process_instance(s, iid).action == "failed"
    # registered as soon as the worker read the dataset
    assert logconfig.scrub("Plmokn Ijuhbz PIDX-55443322") == "[PHI] [PHI] [PHI]"
    # a reason built from exception text never stores it (tasks.py and pipeline.py)
    from worker.tasks import _reason

    iid2 = insert_instance(s, dataset_bytes(make_chest_dataset(rows=64, cols=64, seed=3)))
    pipeline.mark_failed(s, iid2, _reason(KeyError("Plmokn^Ijuhbz")))
    inst = _state(s.database_url, iid2)
    assert inst.reason is not None and "Plmokn" not in inst.reason and "[PHI]" in inst.reason
    with session_scope(s.database_url) as ss:
        details = [
            e.detail or ""
            for e in ss.execute(select(Event).where(Event.instance_id == iid2)).scalars()
        ]
    assert details and not any("Plmokn" in d for d in details)


# ------------------------------------------------------------------------------ E: labels
def test_instances_received_has_no_peer_label() -> None:
    from cxr import metrics

    assert metrics.INSTANCES_RECEIVED._labelnames == ()
    before = REGISTRY.get_sample_value("cxr_instances_received_total") or 0
    metrics.INSTANCES_RECEIVED.inc()
    assert REGISTRY.get_sample_value("cxr_instances_received_total") == before + 1
