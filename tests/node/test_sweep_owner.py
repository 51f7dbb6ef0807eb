"""One sweep owner (issue #10, point 1): the node sweeps by default, workers do not, and
any two sweepers against one audit DB share the ``requeue-sweep`` lease, so each
stranded instance is re-queued once (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from cxr.settings import load_settings
from db import lifecycle
from db.models import State, utcnow
from db.session import init_db
from tests.conftest import make_chest_dataset
from tests.node.conftest import (
    CLOSED_REDIS,
    closed_port,
    events,
    instances,
    redis_queue_len,
    scu_send,
)

SUCCESS = 0x0000


def _settings(db_url: str, tmp_path: Any, **kw: Any) -> Any:
    values: dict[str, Any] = {
        "database_url": db_url,
        "spool_dir": tmp_path / "spool",
        "requeue_interval": 3600,
        "metrics_port": 0,
    }
    values.update(kw)
    return load_settings(**values)


def _stranded(db_url: str, n: int) -> list[int]:
    """``n`` instances left ``received`` (their hand-off never happened)."""
    ids = []
    for i in range(n):
        r = lifecycle.Receipt(
            sop_instance_uid=f"1.2.826.0.1.3680043.10.1078.{i + 1}",
            content_sha256=f"{i:064x}",
            calling_ae="PACS",
            association_id=None,
            spool_path=f"incoming/00/{i:064x}.dcm",
        )
        out = lifecycle.record_receipt(db_url, r)
        assert out.kind == "stored"
        ids.append(out.instance_id)
    return ids


def test_lease_is_held_by_one_process_at_a_time(db_url: str) -> None:
    init_db(db_url)
    name, t0 = "test-lease", utcnow()
    assert lifecycle.take_lease(db_url, name, "A", 10, now=t0)
    assert not lifecycle.take_lease(db_url, name, "B", 10, now=t0 + timedelta(seconds=5))
    assert lifecycle.take_lease(db_url, name, "A", 10, now=t0 + timedelta(seconds=9))  # renew
    assert not lifecycle.take_lease(db_url, name, "B", 10, now=t0 + timedelta(seconds=15))
    # A stops renewing (died): B takes over once it expired
    assert lifecycle.take_lease(db_url, name, "B", 10, now=t0 + timedelta(seconds=20))
    assert not lifecycle.take_lease(db_url, name, "A", 10, now=t0 + timedelta(seconds=21))
    # a clean stop releases it at once
    assert not lifecycle.release_lease(db_url, name, "A")
    assert lifecycle.release_lease(db_url, name, "B")
    assert lifecycle.lease_holder(db_url, name) is None
    assert lifecycle.take_lease(db_url, name, "A", 10)
    assert lifecycle.lease_holder(db_url, name) == "A"


def test_two_sweepers_requeue_each_stranded_instance_once(db_url: str, tmp_path: Any) -> None:
    """Two sweepers (own holders, own connections) start together, each sweeping five
    times; every stranded instance is sent exactly once and gets one ``requeued`` event."""
    init_db(db_url)
    settings = _settings(db_url, tmp_path)
    ids = _stranded(db_url, 12)
    sent: list[tuple[str, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(2)
    results: dict[str, list[lifecycle.SweepResult]] = {}
    errors: list[BaseException] = []

    def sweeper(holder: str) -> None:
        def send(i: int) -> None:
            with lock:
                sent.append((holder, i))

        try:
            start.wait()
            results[holder] = [
                lifecycle.sweep(settings, send, None, holder=holder, received_older_than=0)
                for _ in range(5)
            ]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sweeper, args=(h,)) for h in ("node-1", "node-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(i for _, i in sent) == ids  # each once
    ran = {h: [r.ran for r in rs] for h, rs in results.items()}
    assert sorted(any(v) for v in ran.values()) == [False, True]  # one sweeper ran, one not
    assert len({h for h, _ in sent}) == 1
    assert {r.state for r in instances(db_url)} == {State.QUEUED.value}
    requeued = [e.instance_id for e in events(db_url) if e.kind == "requeued"]
    assert sorted(requeued) == ids


def test_two_sweepers_in_two_processes(db_url: str, tmp_path: Any) -> None:
    """The same with two OS processes (as a node and a ``cxr worker --sweep``)."""
    import json
    import subprocess
    import sys

    init_db(db_url)
    ids = _stranded(db_url, 8)
    script = (
        "import json, sys\n"
        "from cxr.settings import load_settings\n"
        "from db import lifecycle\n"
        "s = load_settings(database_url=sys.argv[1], spool_dir=sys.argv[2],"
        " requeue_interval=3600, metrics_port=0)\n"
        "sent = []\n"
        "for _ in range(5):\n"
        "    lifecycle.sweep(s, sent.append, None, holder=sys.argv[3], received_older_than=0)\n"
        "print(json.dumps(sent))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, db_url, str(tmp_path / "spool"), holder],
            stdout=subprocess.PIPE,
            text=True,
        )
        for holder in ("p1", "p2")
    ]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(outs[0] + outs[1]) == ids
    assert sorted(len(o) for o in outs) == [0, len(ids)]


def test_second_node_does_not_sweep_until_the_first_stops(
    node_factory: Any, db_url: str, node_redis: str, tmp_path: Any
) -> None:
    """Two nodes on one audit DB: the first holds the sweep lease, the second's sweeps
    send nothing; after the first stops (releasing the lease) the second takes over."""
    spool = tmp_path / "shared-spool"
    down = node_factory(db_url, spool_dir=spool, broker_url=CLOSED_REDIS.format(port=closed_port()))
    assert scu_send(down.address, [make_chest_dataset(seed=31)]).statuses == [SUCCESS]
    assert down.flush(30)
    [row] = instances(db_url)
    assert row.state == State.RECEIVED.value  # broker down: stranded
    first = node_factory(db_url, spool_dir=spool)  # sweeps at start, but the lease is taken
    assert first.sweep(received_older_than=0) == 0
    assert redis_queue_len(node_redis) == 0
    assert lifecycle.lease_holder(db_url, lifecycle.SWEEP_LEASE) == down.sweep_holder
    down.stop(timeout=5)
    assert first.sweep(received_older_than=0) == 1
    assert lifecycle.lease_holder(db_url, lifecycle.SWEEP_LEASE) == first.sweep_holder
    assert redis_queue_len(node_redis) == 1
    assert first.sweep(received_older_than=0) == 0  # queued now: nothing left to send
    assert [r.state for r in instances(db_url)] == [State.QUEUED.value]


def test_workers_do_not_sweep_by_default() -> None:
    import argparse

    from apps import worker_cli as cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.register(sub, "worker")
    assert parser.parse_args(["worker"]).sweep is False
    assert parser.parse_args(["worker", "--no-sweep"]).sweep is False
    assert parser.parse_args(["worker", "--sweep"]).sweep is True


def test_0005_leases_upgrade_downgrade(db_url: str) -> None:
    """Migration 0005 adds the ``leases`` table and removes it again."""
    from alembic import command
    from sqlalchemy import inspect

    from db.session import alembic_config, dispose_engines, get_engine

    cfg = alembic_config(db_url)
    command.upgrade(cfg, "0004")
    assert "leases" not in inspect(get_engine(db_url)).get_table_names()
    command.upgrade(cfg, "head")
    assert "leases" in inspect(get_engine(db_url)).get_table_names()
    assert lifecycle.take_lease(db_url, "x", "A", 10)
    command.downgrade(cfg, "0004")
    assert "leases" not in inspect(get_engine(db_url)).get_table_names()
    command.upgrade(cfg, "head")
    dispose_engines()


def test_node_sweeps_by_default_and_can_hand_it_off() -> None:
    import argparse

    from apps import node_cli as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(), "node")
    assert parser.parse_args(["node"]).no_sweep is False
    assert parser.parse_args(["node", "--no-sweep"]).no_sweep is True
