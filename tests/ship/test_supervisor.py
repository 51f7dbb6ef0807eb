"""apps.supervisor pieces: restart with back-off, SIGTERM forwarding and grace, status lines
from the audit DB (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
import logging
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from apps import supervisor as sup
from cxr.settings import load_settings


def _settings(tmp_path: Path, **kw: object):  # type: ignore[no-untyped-def]
    return load_settings(
        database_url=f"sqlite:///{tmp_path / 'a.db'}",
        spool_dir=tmp_path / "spool",
        metrics_port=0,
        **kw,
    )


def _sup(tmp_path: Path, argv_list: list[list[str]], grace: float = 10.0) -> sup.Supervisor:
    s = sup.Supervisor(_settings(tmp_path), workers=1, grace=grace, out=io.StringIO())
    s.children = [sup.Child(f"c{i}", argv, {}) for i, argv in enumerate(argv_list)]
    return s


def test_crashed_child_is_restarted_with_backoff(tmp_path: Path, caplog) -> None:
    s = _sup(tmp_path, [[sys.executable, "-c", "import sys; sys.exit(3)"]])
    c = s.children[0]
    caplog.set_level(logging.INFO, logger="apps.supervisor")
    s.supervise_once(0.0)  # first start
    first_pid = c.proc.pid
    c.proc.wait(10)
    s.supervise_once(100.0)  # noticed dead: restart scheduled in 1 s
    assert c.restart_at == pytest.approx(101.0)
    assert f"c0 (pid {first_pid}) exited with code 3; restarting in 1 s" in caplog.text
    s.supervise_once(100.5)
    assert c.restarts == 0  # not before the back-off
    s.supervise_once(101.0)
    assert c.restarts == 1 and c.proc.pid != first_pid
    c.proc.wait(10)
    s.supervise_once(200.0)
    assert c.restart_at == pytest.approx(202.0)  # doubled
    for _ in range(10):  # never more than BACKOFF_MAX_S
        s.supervise_once(c.restart_at)
        c.proc.wait(10)
        s.supervise_once(c.restart_at or 0.0)
    assert c.backoff == sup.BACKOFF_MAX_S


def test_backoff_resets_after_a_stable_run(tmp_path: Path) -> None:
    s = _sup(tmp_path, [[sys.executable, "-c", "import time; time.sleep(30)"]])
    c = s.children[0]
    c.backoff = 16.0
    s.supervise_once(0.0)
    try:
        s.supervise_once(c.started_at + sup.STABLE_AFTER_S + 1)
        assert c.backoff == sup.BACKOFF_START_S
    finally:
        c.proc.kill()
        c.proc.wait()


# each child creates the file named by argv[1] once its SIGTERM handler is in place
GRACEFUL = (
    "import pathlib, signal, sys, time\n"
    "def bye(*a):\n"
    "    time.sleep(0.5); sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, bye)\n"
    "pathlib.Path(sys.argv[1]).touch()\n"
    "time.sleep(60)\n"
)
STUBBORN = (
    "import pathlib, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "pathlib.Path(sys.argv[1]).touch()\n"
    "time.sleep(60)\n"
)


def _child(tmp_path: Path, code: str, name: str) -> list[str]:
    return [sys.executable, "-c", code, str(tmp_path / f"{name}.up")]


def _start_all(s: sup.Supervisor) -> None:
    """Start the children and wait until each has installed its handler (a SIGTERM any
    earlier would meet Python's default handler)."""
    s.supervise_once(0.0)
    markers = [Path(c.argv[-1]) for c in s.children]
    deadline = time.monotonic() + 60
    while not all(m.exists() for m in markers):
        assert time.monotonic() < deadline, "children did not start"
        time.sleep(0.05)


def test_shutdown_waits_for_children_and_exits_0(tmp_path: Path) -> None:
    s = _sup(tmp_path, [_child(tmp_path, GRACEFUL, "a"), _child(tmp_path, GRACEFUL, "b")])
    _start_all(s)
    t0 = time.monotonic()
    assert s.shutdown() == 0
    assert time.monotonic() - t0 >= 0.4  # waited for the children's own clean-up
    assert all(c.proc.returncode == 0 for c in s.children)
    assert "cxr run: stopped" in s.out.getvalue()


def test_shutdown_kills_after_grace_and_exits_1(tmp_path: Path) -> None:
    s = _sup(tmp_path, [_child(tmp_path, STUBBORN, "a")], grace=1.0)
    _start_all(s)
    assert s.shutdown() == 1
    assert s.children[0].proc.returncode == -signal.SIGKILL


def test_children_are_python_m_cxr_cli(tmp_path: Path) -> None:
    s = sup.Supervisor(_settings(tmp_path), workers=3)
    s.metrics_dir = str(tmp_path / "m")
    s.build_children()
    names = [c.name for c in s.children]
    assert names == ["node", "worker-1", "worker-2", "worker-3", "web"]
    assert s.children[0].argv == [sys.executable, "-m", "apps.cli", "node"]
    assert s.children[1].argv[-1] == "worker"
    # the node owns the re-queue sweep: no worker runs it (db.lifecycle.sweep)
    assert [c.argv[-1] for c in s.children[1:4]] == ["worker"] * 3
    assert s.children[4].argv[-1] == "web"
    assert s.children[4].env["CXR_WEB_PORT"] == str(s.settings.web_port)
    env = s.children[0].env
    assert env["CXR_METRICS_PORT"] == "0" and env["PROMETHEUS_MULTIPROC_DIR"] == s.metrics_dir


def test_format_status() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    row = SimpleNamespace(
        id=7,
        state="delivered",
        sop_instance_uid="1.2.3",
        reason=None,
        received_at=t0.replace(tzinfo=None),
        finished_at=t0 + timedelta(seconds=2.5),
        updated_at=t0 + timedelta(seconds=2.5),
    )
    inf = SimpleNamespace(
        verdict="COVID", p_covid=0.8123, p_normal=0.1, p_other=0.0877, t_total_ms=640.0
    )
    line = sup.format_status(row, inf)
    assert line.startswith("[DELIVERED")
    assert "#7 sop=1.2.3 verdict=COVID p(COVID)=0.812 p(Normal)=0.100 p(Other)=0.088" in line
    assert "latency=2.50s (worker 0.64s)" in line
    ignored = SimpleNamespace(**{**row.__dict__, "state": "ignored", "reason": "not a chest"})
    assert "reason=not a chest" in sup.format_status(ignored, None)


def test_status_poller_reports_each_finished_instance_once(db_url: str) -> None:
    from db.models import Inference, Instance, State
    from db.session import init_db, session_scope

    init_db(db_url)
    start = datetime.now(UTC) - timedelta(seconds=1)
    poller = sup.StatusPoller(db_url, start)
    now = datetime.now(UTC)

    def inst(uid: str, state: State, finished: bool) -> Instance:
        return Instance(
            sop_instance_uid=uid,
            content_sha256=uid.ljust(64, "0"),
            state=state.value,
            received_at=now - timedelta(seconds=3),
            updated_at=now,
            finished_at=now if finished else None,
        )

    with session_scope(db_url) as s:
        done = inst("1.1", State.DELIVERED, True)
        nodest = inst("1.2", State.CLASSIFIED, True)  # no destinations: final
        pending = inst("1.3", State.CLASSIFIED, False)  # delivery still to come
        busy = inst("1.4", State.PROCESSING, False)
        s.add_all([done, nodest, pending, busy])
        s.flush()
        s.add(
            Inference(
                instance_id=done.id,
                model_version="v",
                model_sha256="x",
                p_covid=0.1,
                p_normal=0.8,
                p_other=0.1,
                verdict="Normal",
                t_total_ms=500.0,
            )
        )
        pending_id = pending.id
    lines = poller.poll()
    assert len(lines) == 2, lines
    assert any("sop=1.1 verdict=Normal" in ln for ln in lines)
    assert any("sop=1.2" in ln for ln in lines)
    assert poller.poll() == []  # no repeats
    with session_scope(db_url) as s:
        row = s.get(Instance, pending_id)
        row.state, row.finished_at = State.DELIVERY_FAILED.value, datetime.now(UTC)
    lines = poller.poll()
    assert len(lines) == 1 and "[DELIVERY_FAILED" in lines[0] and "sop=1.3" in lines[0]


def test_busy_ports_give_a_one_line_error(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess

    from tests.conftest import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(CXR_DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}", CXR_DICOM_HOST="127.0.0.1")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for var, other in (
            ("CXR_DICOM_PORT", "CXR_METRICS_PORT"),
            ("CXR_METRICS_PORT", "CXR_DICOM_PORT"),
        ):
            res = subprocess.run(
                [sys.executable, "-m", "apps.cli", "run"],
                env={**env, var: str(port), other: str(free_port())},
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert res.returncode == 2, res.stderr
            assert f"({var})" in res.stderr and "in use" in res.stderr
