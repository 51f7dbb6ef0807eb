"""Fault injection: database down, disk full, broker down, plus status mapping units."""

from __future__ import annotations

import errno
import os

import pytest
from sqlalchemy.exc import OperationalError

from db.models import State
from dicom_node import status
from dicom_node.status import OUT_OF_RESOURCES, SUCCESS
from tests.conftest import make_chest_dataset
from tests.node.conftest import (
    CLOSED_REDIS,
    closed_port,
    events,
    instances,
    redis_queue_len,
    scu_send,
    spool_files,
    tmp_files,
)


def _unreachable_db(db_url: str, tmp_path) -> str:
    if db_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path}"  # a directory: SQLite cannot open it
    return f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/test?connect_timeout=2"


def test_database_down_refuses_and_leaves_no_file(node_factory, db_url, tmp_path):
    node = node_factory(db_url)
    node.settings = node.settings.model_copy(
        update={"database_url": _unreachable_db(db_url, tmp_path)}
    )
    res = scu_send(node.address, [make_chest_dataset(seed=20)])
    assert res.statuses == [OUT_OF_RESOURCES]
    assert spool_files(node) == [] and tmp_files(node) == []
    # and the node recovers when the database is back
    node.settings = node.settings.model_copy(update={"database_url": db_url})
    assert scu_send(node.address, [make_chest_dataset(seed=20)]).statuses == [SUCCESS]
    assert len(spool_files(node)) == 1


def test_disk_full_refuses_without_partial_file(node_factory, db_url, monkeypatch):
    node = node_factory(db_url)
    import cxr.storage

    real_fsync = os.fsync
    spool_tmp = str(node.spool.tmp)

    def fsync(fd: int) -> None:  # ENOSPC for spool writes only (delayed allocation)
        if os.readlink(f"/proc/self/fd/{fd}").startswith(spool_tmp):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(cxr.storage.os, "fsync", fsync)
    res = scu_send(node.address, [make_chest_dataset(seed=21)])
    assert res.statuses == [OUT_OF_RESOURCES]
    assert spool_files(node) == [] and tmp_files(node) == []
    assert instances(db_url, state=State.RECEIVED.value) == []
    assert instances(db_url, state=State.QUEUED.value) == []
    monkeypatch.setattr(cxr.storage.os, "fsync", real_fsync)
    assert scu_send(node.address, [make_chest_dataset(seed=21)]).statuses == [SUCCESS]


def test_identical_resend_after_refusal_is_processed(node_factory, db_url, monkeypatch):
    """A PACS retries the SAME bytes after a transient refusal (disk full): the re-send
    must be stored and queued, not acknowledged as a 'duplicate' of the refused row."""
    node = node_factory(db_url)
    import cxr.storage

    real_fsync = os.fsync
    spool_tmp = str(node.spool.tmp)

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(spool_tmp):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    ds = make_chest_dataset(seed=24)
    monkeypatch.setattr(cxr.storage.os, "fsync", fsync)
    assert scu_send(node.address, [ds]).statuses == [OUT_OF_RESOURCES]
    [refused] = instances(db_url)
    assert refused.state == State.FAILED.value and refused.spool_path is None
    monkeypatch.setattr(cxr.storage.os, "fsync", real_fsync)
    assert scu_send(node.address, [ds]).statuses == [SUCCESS]
    assert node.flush(30)
    [row] = instances(db_url)
    assert row.id == refused.id
    assert row.state in (State.RECEIVED.value, State.QUEUED.value)
    assert node.spool.resolve(row.spool_path).is_file()
    kinds = [e.kind for e in events(db_url)]
    assert "duplicate" not in kinds and kinds.count(State.RECEIVED.value) == 1


def test_broker_down_then_sweep(node_factory, db_url, node_redis):
    node = node_factory(db_url, broker_url=CLOSED_REDIS.format(port=closed_port()))
    res = scu_send(node.address, [make_chest_dataset(seed=22), make_chest_dataset(seed=23)])
    assert res.statuses == [SUCCESS, SUCCESS]
    assert node.flush(30)
    rows = instances(db_url)
    assert [r.state for r in rows] == [State.RECEIVED.value] * 2
    assert all(node.spool.resolve(r.spool_path).is_file() for r in rows)
    # the broker comes back: the sweep queues what was stranded
    from worker.celery_app import make_celery

    node.celery_app = make_celery(node.settings.model_copy(update={"broker_url": node_redis}))
    assert node.sweep(received_older_than=0) == 2
    assert [r.state for r in instances(db_url)] == [State.QUEUED.value] * 2
    assert redis_queue_len(node_redis) == 2
    assert "requeued" in [e.kind for e in events(db_url, rows[0].id)]


def test_status_mapping_is_single_and_named():
    assert status.status_for_exception(OperationalError("x", {}, Exception())) == OUT_OF_RESOURCES
    assert status.status_for_exception(OSError(errno.ENOSPC, "full")) == OUT_OF_RESOURCES
    assert status.status_for_exception(status.CannotUnderstand("x")) == status.CANNOT_UNDERSTAND
    assert (
        status.status_for_exception(status.DoesNotMatchSOPClass("x"))
        == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    )
    assert status.status_for_exception(RuntimeError("bug")) == status.PROCESSING_FAILURE
    assert (
        status.OUT_OF_RESOURCES,
        status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        status.CANNOT_UNDERSTAND,
    ) == (0xA700, 0xA900, 0xC000)

    class H:
        seen: list = []

        def on_refused(self, event, refusal):
            self.seen.append((event, refusal.reason))

        @status.dimse_status
        def handle(self, event):
            raise OSError(errno.ENOSPC, "full")

    h = H()
    assert h.handle("ev") == OUT_OF_RESOURCES
    assert h.seen == [("ev", "disk_full")]


@pytest.mark.parametrize("bad", [b"", b"\x00" * 200, b"DICM" * 10])
def test_parse_header_rejects_garbage(bad):
    from dicom_node.filters import parse_header

    with pytest.raises(status.StoreRefused):
        h = parse_header(bad)
        if not h.text("SOPInstanceUID"):
            raise status.CannotUnderstand("no uid")


def test_sweep_runs_at_start(node_factory, db_url, node_redis, tmp_path):
    """Instances stranded in 'received' by a dead broker are queued when a node starts."""
    from datetime import timedelta

    from sqlalchemy import update

    from db.models import Instance, utcnow
    from db.session import session_scope

    spool = tmp_path / "shared-spool"
    down = node_factory(db_url, spool_dir=spool, broker_url=CLOSED_REDIS.format(port=closed_port()))
    assert scu_send(down.address, [make_chest_dataset(seed=24)]).statuses == [SUCCESS]
    down.flush()
    down.stop()
    with session_scope(db_url) as s:
        s.execute(update(Instance).values(updated_at=utcnow() - timedelta(hours=1)))
    node_factory(db_url, spool_dir=spool)  # working broker; sweeps once at start
    from tests.node.conftest import wait_for

    assert wait_for(lambda: instances(db_url, state=State.QUEUED.value), timeout=20)
    assert redis_queue_len(node_redis) == 1


def test_metrics_endpoint(node_factory, sqlite_url):
    import json
    import urllib.request

    from tests.conftest import free_port

    mport = free_port()
    node = node_factory(sqlite_url, metrics_port=mport, metrics_host="127.0.0.1")
    assert scu_send(node.address, [make_chest_dataset(seed=25)]).statuses == [SUCCESS]
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    accepted = [ln for ln in body.splitlines() if ln.startswith("cxr_instances_accepted_total ")]
    assert accepted and float(accepted[0].split()[-1]) >= 1
    health = json.loads(
        urllib.request.urlopen(f"http://127.0.0.1:{mport}/healthz", timeout=5).read()
    )
    assert health["checks"]["scp"] is True
