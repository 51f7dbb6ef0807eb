"""Fixtures of the DICOM node tests: a running StorageNode on a free loopback port, and a
pynetdicom SCU helper."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from tests.conftest import free_port

NODE_AET = "CXR_WORKER"
CLOSED_REDIS = "redis://127.0.0.1:{port}/0"


def closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    return free_port()


@pytest.fixture
def node_redis() -> Iterator[str]:
    """A Redis URL on a scratch DB index of its own (the shared ``redis_db`` index is also
    consumed by other areas' end-to-end workers when suites run side by side)."""
    import redis

    from tests.conftest import REDIS_URL

    url = f"{REDIS_URL}/12"
    r = redis.Redis.from_url(url)
    try:
        r.ping()
    except Exception:
        pytest.fail("Redis on 127.0.0.1:6379 is not reachable (.ci/run starts it)")
    r.flushdb()
    yield url
    r.flushdb()


@pytest.fixture
def node_factory(tmp_path: Path, node_redis: str) -> Iterator[Callable[..., Any]]:
    """``node_factory(db_url, **settings)`` starts a node (stopped at teardown)."""
    from cxr.settings import load_settings
    from dicom_node import StorageNode

    nodes: list[StorageNode] = []

    def make(db_url: str, **overrides: Any) -> StorageNode:
        values: dict[str, Any] = {
            "ae_title": NODE_AET,
            "dicom_host": "127.0.0.1",
            "dicom_port": free_port(),
            "spool_dir": tmp_path / f"spool{len(nodes)}",
            "database_url": db_url,
            "broker_url": node_redis,
            "metrics_port": 0,
            "acse_timeout": 5,
            "dimse_timeout": 10,
            "network_timeout": 10,
            "requeue_interval": 3600,
        }
        values.update(overrides)
        node = StorageNode(load_settings(**values))
        node.start(block=False)
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        n.stop(timeout=5)


@dataclass
class SendResult:
    established: bool
    statuses: list[int | None]
    rejected: bool = False


def _loadable(item: Any) -> Any:
    """A path with a Part 10 header is sent as is; one without is read and re-encoded."""
    if isinstance(item, str | Path):
        with open(item, "rb") as fh:
            head = fh.read(132)
        if head[128:132] != b"DICM":
            ds = pydicom.dcmread(item, force=True)
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
            return ds
    return item


def scu_send(
    address: tuple[str, int],
    items: list[Any],
    calling: str = "PACS",
    called: str = NODE_AET,
    ssl_context: Any = None,
    tls_hostname: str | None = None,
) -> SendResult:
    """C-STORE ``items`` (paths or datasets) over one association, each with its own transfer
    syntax proposed. Returns the status of each (None = no response)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    proposed: dict[tuple[str, str], None] = {}
    items = [_loadable(it) for it in items]
    for it in items:
        ds = (
            it
            if isinstance(it, pydicom.Dataset)
            else pydicom.dcmread(it, stop_before_pixels=True, force=True)
        )
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        proposed[(str(ds.SOPClassUID), str(ts or pydicom.uid.ImplicitVRLittleEndian))] = None
    for sop, ts in proposed:
        ae.add_requested_context(sop, ts)
    ae.add_requested_context(Verification)
    tls = (ssl_context, tls_hostname) if ssl_context is not None else None
    assoc = ae.associate(address[0], address[1], ae_title=called, tls_args=tls)
    if not assoc.is_established:
        return SendResult(False, [], rejected=assoc.is_rejected)
    statuses: list[int | None] = []
    try:
        for it in items:
            st = assoc.send_c_store(it)
            statuses.append(int(st.Status) if "Status" in st else None)
    finally:
        assoc.release()
    return SendResult(True, statuses)


def echo(address: tuple[str, int], calling: str = "PACS", called: str = NODE_AET) -> int | None:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate(address[0], address[1], ae_title=called)
    if not assoc.is_established:
        return None
    try:
        st = assoc.send_c_echo()
        return int(st.Status) if "Status" in st else None
    finally:
        assoc.release()


def instances(db_url: str, **where: Any) -> list[Any]:
    from db.models import Instance
    from db.session import session_scope

    with session_scope(db_url) as s:
        q = select(Instance).order_by(Instance.id)
        for k, v in where.items():
            q = q.where(getattr(Instance, k) == v)
        rows = list(s.execute(q).scalars())
        s.expunge_all()
        return rows


def events(db_url: str, instance_id: int | None = None) -> list[Any]:
    from db.models import Event
    from db.session import session_scope

    with session_scope(db_url) as s:
        q = select(Event).order_by(Event.id)
        if instance_id is not None:
            q = q.where(Event.instance_id == instance_id)
        rows = list(s.execute(q).scalars())
        s.expunge_all()
        return rows


def associations(db_url: str, settle: float = 10.0) -> list[Any]:
    """Association rows, after waiting (up to ``settle`` s) until none is still open: the
    closing update runs in the node's association thread just after the peer's release."""
    rows = wait_for(
        lambda: (r := _associations(db_url)) and all(a.ended_at for a in r) and r, timeout=settle
    )
    return rows or _associations(db_url)


def _associations(db_url: str) -> list[Any]:
    from db.models import Association
    from db.session import session_scope

    with session_scope(db_url) as s:
        rows = list(s.execute(select(Association).order_by(Association.id)).scalars())
        s.expunge_all()
        return rows


def wait_for(pred: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def spool_files(node: Any) -> list[Path]:
    return sorted(p for p in (node.spool.root / "incoming").rglob("*") if p.is_file())


def tmp_files(node: Any) -> list[Path]:
    return sorted(p for p in node.spool.tmp.iterdir())


def redis_queue_len(url: str, queue: str = "cxr") -> int:
    import redis

    return int(redis.Redis.from_url(url).llen(queue))


@pytest.fixture
def quiet_pynetdicom() -> Iterator[None]:
    lg = logging.getLogger("pynetdicom")
    old = lg.level
    lg.setLevel(logging.WARNING)
    yield
    lg.setLevel(old)
