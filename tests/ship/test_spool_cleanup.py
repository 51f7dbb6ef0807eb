"""Spool retention (db.lifecycle.cleanup_spool, `cxr run --cleanup-spool`), SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from cxr.settings import load_settings
from cxr.storage import Spool
from db.lifecycle import cleanup_spool
from db.models import Event, Inference, Instance, State
from db.session import init_db, session_scope


def _add(
    s, spool: Spool, uid: str, state: State, age_days: float, data: bytes, finished: bool = True
) -> tuple[int, Path]:
    path, sha = spool.store_incoming(data)
    when = datetime.now(UTC) - timedelta(days=age_days)
    row = Instance(
        sop_instance_uid=uid,
        content_sha256=sha,
        state=state.value,
        spool_path=spool.relative(path),
        received_at=when,
        updated_at=when,
        finished_at=when if finished else None,
    )
    s.add(row)
    s.flush()
    return row.id, path


def _inference(instance_id: int, sc: str, sr: str, hm: str) -> Inference:
    """An inference row naming its SC, SR and heat-map results."""
    return Inference(
        instance_id=instance_id,
        model_version="v",
        model_sha256="x",
        p_covid=0.1,
        p_normal=0.8,
        p_other=0.1,
        verdict="Normal",
        sc_sop_instance_uid=sc,
        sr_sop_instance_uid=sr,
        hm_sop_instance_uid=hm,
    )


def test_cleanup_deletes_only_old_finished_files(db_url: str, tmp_path: Path) -> None:
    settings = load_settings(
        database_url=db_url, spool_dir=tmp_path / "spool", spool_retention_days=30
    )
    init_db(db_url)
    spool = Spool(settings.spool_dir)
    with session_scope(db_url) as s:
        old_id, old_path = _add(s, spool, "1.1", State.DELIVERED, 40, b"old delivered")
        s.add(_inference(old_id, "9.1", "9.2", "9.3"))
        ign_id, ign_path = _add(s, spool, "1.2", State.IGNORED, 31, b"old ignored")
        _, new_path = _add(s, spool, "1.3", State.DELIVERED, 5, b"recent")
        _, busy_path = _add(s, spool, "1.4", State.QUEUED, 90, b"old but queued", False)
        _, pend_path = _add(s, spool, "1.5", State.CLASSIFIED, 90, b"awaiting delivery", False)
        # same content as an old row, but a newer retained version: the file must stay
        _add(s, spool, "1.6", State.FAILED, 50, b"shared content")
        _, shared_path = _add(s, spool, "1.7", State.DELIVERED, 1, b"shared content")
    results = [spool.results / f"9.{k}.dcm" for k in (1, 2, 3)]  # SC, SR, heat map
    for r in results:
        r.write_bytes(b"result")

    dry = cleanup_spool(settings, dry_run=True)
    assert (dry.files, dry.instances) == (5, 3)
    assert old_path.exists() and all(r.exists() for r in results)

    res = cleanup_spool(settings)
    assert (res.files, res.instances) == (5, 3)
    assert res.bytes == len(b"old delivered") + len(b"old ignored") + 3 * len(b"result")
    assert not old_path.exists() and not ign_path.exists()
    assert not any(r.exists() for r in results)
    for kept in (new_path, busy_path, pend_path, shared_path):
        assert kept.exists(), kept
    with session_scope(db_url) as s:
        assert s.get(Instance, old_id).spool_path is None
        assert s.get(Instance, ign_id).spool_path is None
        kinds = s.scalars(select(Event.kind).where(Event.instance_id == old_id)).all()
        assert "spool_purged" in kinds
    assert cleanup_spool(settings).files == 0  # idempotent


def test_retention_zero_keeps_everything(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    settings = load_settings(database_url=url, spool_dir=tmp_path / "spool", spool_retention_days=0)
    init_db(url)
    spool = Spool(settings.spool_dir)
    with session_scope(url) as s:
        _, path = _add(s, spool, "1.1", State.DELIVERED, 400, b"x")
    assert cleanup_spool(settings).files == 0
    assert path.exists()


def test_cli_cleanup_spool(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    init_db(url)
    spool = Spool(tmp_path / "spool")
    with session_scope(url) as s:
        _, path = _add(s, spool, "1.1", State.IGNORED, 10, b"abc")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        CXR_DATABASE_URL=url, CXR_SPOOL_DIR=str(tmp_path / "spool"), CXR_SPOOL_RETENTION_DAYS="7"
    )
    cmd = [sys.executable, "-m", "apps.cli", "run", "--cleanup-spool"]
    res = subprocess.run(
        [*cmd, "--dry-run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "would delete 1 file(s), 3 bytes" in res.stdout and path.exists()
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "deleted 1 file(s)" in res.stdout
    assert not path.exists()


def test_cleanup_keeps_results_a_retained_instance_shares(db_url: str, tmp_path: Path) -> None:
    """The same image re-sent under its SOP Instance UID (a newer row) keys its results
    like the first one: purging the old row must not delete result files the retained
    row's inference still names (its retries read them from the spool)."""
    settings = load_settings(
        database_url=db_url, spool_dir=tmp_path / "spool", spool_retention_days=30
    )
    init_db(db_url)
    spool = Spool(settings.spool_dir)

    with session_scope(db_url) as s:
        old_id, old_path = _add(s, spool, "2.1", State.DELIVERED, 40, b"first bytes")
        new_id, new_path = _add(s, spool, "2.1", State.DELIVERY_FAILED, 1, b"other bytes")
        s.add(_inference(old_id, "8.1", "8.2", "8.3"))
        s.add(_inference(new_id, "8.1", "8.2", "8.3"))
        only_id, _ = _add(s, spool, "2.2", State.DELIVERED, 40, b"alone")
        s.add(_inference(only_id, "8.4", "8.5", "8.6"))
    shared = [spool.results / f"8.{k}.dcm" for k in (1, 2, 3)]
    alone = [spool.results / f"8.{k}.dcm" for k in (4, 5, 6)]
    for r in shared + alone:
        r.write_bytes(b"result")
    res = cleanup_spool(settings)
    assert res.instances == 2
    assert not old_path.exists() and new_path.exists()
    assert all(r.exists() for r in shared)  # the retained row still needs them
    assert not any(r.exists() for r in alone)
