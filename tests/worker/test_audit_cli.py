"""``cxr audit`` (list/show/stats/retry/export) and ``cxr db`` against SQLite and the real
PostgreSQL, with audit rows inserted through the ORM; retry sends real Celery messages
to the real Redis."""

from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from apps.cli import main
from db.models import Association, Delivery, Event, Inference, Instance, State
from db.queries import percentile
from db.session import init_db, session_scope
from tests.conftest import free_port

T0 = datetime(2026, 11, 20, 10, 0, 0, tzinfo=UTC)
SECRET_NAME = "Doe^Jane"  # never stored: must never show up
PID_HASH = "9f" * 32


def _hash(patient_id: str) -> str:
    """What the node stores for a PatientID with the default key: HMAC-SHA256."""
    import hashlib
    import hmac

    from cxr.settings import Settings

    key = Settings.model_fields["patient_id_salt"].default
    return hmac.new(key.encode(), patient_id.encode(), hashlib.sha256).hexdigest()


def _inst(uid: str, state: str, received: datetime, calling_ae: str = "MOD1", **kw) -> Instance:  # type: ignore[no-untyped-def]
    return Instance(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        study_instance_uid=uid + ".0",
        series_instance_uid=uid + ".1",
        accession_number="ACC" + uid[-1],
        patient_id_hash=PID_HASH,
        modality="CR",
        view_position="PA",
        rows=64,
        columns=64,
        size_bytes=9000,
        content_sha256=kw.pop("sha", uid.replace(".", "").ljust(64, "0")[:64]),
        calling_ae=calling_ae,
        received_at=received,
        updated_at=received,
        state=state,
        **kw,
    )


def _inference(verdict: str, probs: tuple[float, float, float], fwd: float, **kw) -> Inference:  # type: ignore[no-untyped-def]
    return Inference(
        model_version="1.0.0",
        model_sha256="ab" * 32,
        engine="onnx",
        p_covid=probs[0],
        p_normal=probs[1],
        p_other=probs[2],
        verdict=verdict,
        sc_series_uid="2.25.1",
        sc_sop_instance_uid=kw.pop("sc", "2.25.11"),
        sr_series_uid="2.25.2",
        sr_sop_instance_uid=kw.pop("sr", "2.25.22"),
        t_decode_ms=10.0,
        t_preprocess_ms=5.0,
        t_forward_ms=fwd,
        t_cam_ms=2.0,
        t_build_ms=50.0,
        t_send_ms=20.0,
        t_total_ms=87.0 + fwd,
        **kw,
    )


def populate(url: str) -> dict[str, int]:
    """A small, known audit trail. Returns ids by name."""
    init_db(url)
    ids: dict[str, int] = {}
    with session_scope(url) as s:
        a = Association(
            calling_ae="MOD1",
            called_ae="CXR",
            peer_host="127.0.0.1",
            peer_port=40000,
            started_at=T0,
            outcome="released",
            n_stored=3,
        )
        s.add(a)
        s.flush()
        # 1: delivered COVID, end to end 3 s
        i1 = _inst(
            "1.2.3.1",
            State.DELIVERED.value,
            T0,
            association_id=a.id,
            finished_at=T0 + timedelta(seconds=3),
        )
        i1.inferences.append(_inference("COVID", (0.8, 0.1, 0.1), 100.0))
        i1.deliveries += [
            Delivery(
                destination="PACS@127.0.0.1:104",
                kind="SC",
                sop_instance_uid="2.25.11",
                attempts=1,
                last_status="0x0000",
                state="delivered",
                delivered_at=T0 + timedelta(seconds=2),
            ),
            Delivery(
                destination="PACS@127.0.0.1:104",
                kind="SR",
                sop_instance_uid="2.25.22",
                attempts=2,
                last_status="0xB000",
                state="delivered_with_warning",
                delivered_at=T0 + timedelta(seconds=3),
            ),
        ]
        for k, dt in (
            ("received", 0),
            ("queued", 0.1),
            ("processing", 0.2),
            ("classified", 1.5),
            ("delivered", 3),
        ):
            i1.events.append(Event(kind=k, at=T0 + timedelta(seconds=dt), detail=f"{k} detail"))
        # 2: delivered Normal, next day, other sender, end to end 1 s
        t2 = T0 + timedelta(days=1)
        i2 = _inst(
            "1.2.3.2",
            State.DELIVERED.value,
            t2,
            calling_ae="MOD2",
            finished_at=t2 + timedelta(seconds=1),
        )
        i2.patient_id_hash = _hash("PID-42")
        i2.inferences.append(_inference("Normal", (0.1, 0.85, 0.05), 200.0))
        i2.deliveries.append(
            Delivery(
                destination="PACS@127.0.0.1:104",
                kind="SC",
                sop_instance_uid="2.25.11",
                attempts=1,
                last_status="0x0000",
                state="delivered",
                delivered_at=t2 + timedelta(seconds=1),
            )
        )
        # 3: delivery_failed COVID
        i3 = _inst(
            "1.2.3.3",
            State.DELIVERY_FAILED.value,
            T0 + timedelta(hours=1),
            reason="SC to PACS: unreachable",
            finished_at=T0 + timedelta(hours=2),
        )
        i3.inferences.append(_inference("COVID", (0.6, 0.2, 0.2), 300.0))
        i3.deliveries.append(
            Delivery(
                destination="PACS@127.0.0.1:104",
                kind="SC",
                sop_instance_uid="2.25.11",
                attempts=5,
                state="failed",
                last_error="association rejected",
            )
        )
        # 4: failed, no inference
        i4 = _inst(
            "1.2.3.4",
            State.FAILED.value,
            T0 + timedelta(hours=3),
            reason="cannot decode pixel data",
            finished_at=T0 + timedelta(hours=3),
            spool_path="incoming/12/1234.dcm",
        )
        # 5: ignored; 6: queued
        i5 = _inst("1.2.3.5", State.IGNORED.value, T0 + timedelta(hours=4), reason="modality CT")
        i6 = _inst("1.2.3.6", State.QUEUED.value, T0 + timedelta(hours=5))
        # 7: a second version of instance 1 (same UID, other content), re-sent later
        i7 = _inst(
            "1.2.3.1",
            State.IGNORED.value,
            T0 + timedelta(days=2),
            sha="f" * 64,
            version=2,
            reason="duplicate version",
        )
        for name, inst in zip(
            ("i1", "i2", "i3", "i4", "i5", "i6", "i7"), (i1, i2, i3, i4, i5, i6, i7), strict=True
        ):
            s.add(inst)
            s.flush()
            ids[name] = inst.id
    return ids


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def audit_db(db_url: str, workdir: Path) -> tuple[str, dict[str, int]]:
    return db_url, populate(db_url)


def _list_json(capsys, url: str, *extra: str) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    rc, out, err = run_cli(
        capsys, "audit", "list", "--database-url", url, "--json", "--limit", "0", *extra
    )
    assert rc == 0, err
    return [json.loads(line) for line in out.splitlines()]


# ---------------------------------------------------------------------------------- list
def test_list_filters(audit_db, capsys) -> None:  # type: ignore[no-untyped-def]
    url, ids = audit_db
    rows = _list_json(capsys, url)
    assert [r["id"] for r in rows] == sorted(ids.values(), reverse=True)  # newest first
    assert {r["id"] for r in _list_json(capsys, url, "--state", "delivered")} == {
        ids["i1"],
        ids["i2"],
    }
    assert {
        r["id"] for r in _list_json(capsys, url, "--state", "failed", "--state", "ignored")
    } == {ids["i4"], ids["i5"], ids["i7"]}
    assert {r["id"] for r in _list_json(capsys, url, "--verdict", "covid")} == {
        ids["i1"],
        ids["i3"],
    }
    assert {r["id"] for r in _list_json(capsys, url, "--calling-ae", "MOD2")} == {ids["i2"]}
    # dates: --since/--until are whole UTC days, --until inclusive
    day1 = {
        r["id"] for r in _list_json(capsys, url, "--since", "2026-11-20", "--until", "2026-11-20")
    }
    assert day1 == {ids[k] for k in ("i1", "i3", "i4", "i5", "i6")}
    assert {r["id"] for r in _list_json(capsys, url, "--since", "2026-11-21T00:00:00")} == {
        ids["i2"],
        ids["i7"],
    }
    assert {r["id"] for r in _list_json(capsys, url, "--until", "2026-11-20T10:30:00Z")} == {
        ids["i1"]
    }
    assert len(_list_json(capsys, url, "--limit", "2")) == 2
    assert [r["id"] for r in _list_json(capsys, url, "--patient-id", "PID-42")] == [ids["i2"]]
    assert _list_json(capsys, url, "--patient-id", "PID-43") == []
    r1 = next(r for r in rows if r["id"] == ids["i1"])
    assert r1["verdict"] == "COVID" and r1["p_covid"] == pytest.approx(0.8)
    assert r1["end_to_end_ms"] == pytest.approx(3000.0)  # received -> last result acknowledged
    assert r1["t_forward_ms"] == pytest.approx(100.0)


def test_list_table_and_bad_date(audit_db, capsys) -> None:  # type: ignore[no-untyped-def]
    url, _ = audit_db
    rc, out, _ = run_cli(
        capsys, "audit", "list", "--database-url", url, "--state", "delivery_failed"
    )
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("ID") and "STATE" in lines[0] and "VERDICT" in lines[0]
    assert len(lines) == 3 and "delivery_failed" in lines[1] and "1.2.3.3" in lines[1]
    assert lines[-1] == "(1 instance(s))"
    assert SECRET_NAME not in out
    rc, _, err = run_cli(capsys, "audit", "list", "--database-url", url, "--since", "yesterday")
    assert rc == 2 and "YYYY-MM-DD" in err


# ---------------------------------------------------------------------------------- show
def test_show_whole_history(audit_db, capsys) -> None:  # type: ignore[no-untyped-def]
    url, ids = audit_db
    rc, out, err = run_cli(capsys, "audit", "show", "1.2.3.1", "--database-url", url, "--json")
    assert rc == 0, err
    hist = json.loads(out)
    assert [h["instance"]["id"] for h in hist] == [ids["i1"], ids["i7"]]  # both versions
    h = hist[0]
    assert h["instance"]["patient_id_hash"] == PID_HASH
    assert [e["kind"] for e in h["events"]] == [
        "received",
        "queued",
        "processing",
        "classified",
        "delivered",
    ]
    assert h["association"]["calling_ae"] == "MOD1"
    inf = h["inferences"][0]
    assert inf["verdict"] == "COVID" and inf["t_forward_ms"] == 100.0 and inf["t_build_ms"] == 50.0
    assert {(d["kind"], d["state"], d["last_status"]) for d in h["deliveries"]} == {
        ("SC", "delivered", "0x0000"),
        ("SR", "delivered_with_warning", "0xB000"),
    }
    rc, text, _ = run_cli(capsys, "audit", "show", "1.2.3.1", "--database-url", url)
    assert rc == 0
    for needle in (
        "== instance",
        "-- events --",
        "processing detail",
        "-- inferences --",
        "forward=100.0",
        "-- deliveries --",
        "delivered_with_warning",
        "0xB000",
        PID_HASH,
    ):
        assert needle in text, needle
    assert SECRET_NAME not in text
    rc, _, err = run_cli(capsys, "audit", "show", "9.9.9", "--database-url", url)
    assert rc == 1 and "no instance" in err


# --------------------------------------------------------------------------------- stats
def test_stats(audit_db, capsys) -> None:  # type: ignore[no-untyped-def]
    url, _ = audit_db
    rc, out, err = run_cli(capsys, "audit", "stats", "--database-url", url, "--json")
    assert rc == 0, err
    st_ = json.loads(out)
    assert st_["total"] == 7
    assert st_["per_state"] == {
        "queued": 1,
        "delivered": 2,
        "ignored": 2,
        "failed": 1,
        "delivery_failed": 1,
    }
    assert st_["per_verdict"] == {"COVID": 2, "Normal": 1, "-": 4}
    fwd = st_["latency_ms"]["forward"]
    assert fwd["n"] == 3
    assert fwd["p50_ms"] == pytest.approx(200.0) and fwd["p95_ms"] == pytest.approx(290.0)
    e2e = st_["latency_ms"]["end_to_end"]
    assert (
        e2e["n"] == 2
        and e2e["p50_ms"] == pytest.approx(2000.0)
        and e2e["p95_ms"] == pytest.approx(2900.0)
    )
    # filtered: only the first day's delivered instance
    rc, out, _ = run_cli(
        capsys,
        "audit",
        "stats",
        "--database-url",
        url,
        "--json",
        "--until",
        "2026-11-20",
        "--state",
        "delivered",
    )
    st_ = json.loads(out)
    assert st_["total"] == 1 and st_["latency_ms"]["end_to_end"]["p95_ms"] == pytest.approx(3000.0)
    rc, text, _ = run_cli(capsys, "audit", "stats", "--database-url", url)
    assert rc == 0 and "per state:" in text and "end_to_end" in text and "delivery_failed" in text


def test_percentile_matches_numpy() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@given(
    st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=60),
    st.sampled_from([0, 5, 50, 90, 95, 99, 100]),
)
def test_percentile_property(values: list[float], q: int) -> None:
    assert percentile(values, q) == pytest.approx(
        float(np.percentile(values, q)), rel=1e-9, abs=1e-9
    )


# -------------------------------------------------------------------------------- export
def test_export_csv(audit_db, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, ids = audit_db
    target = tmp_path / "out.csv"
    rc, _, err = run_cli(capsys, "audit", "export", "--csv", str(target), "--database-url", url)
    assert rc == 0 and "wrote 7 row(s)" in err
    rows = list(csv.DictReader(target.open(encoding="utf-8")))
    assert len(rows) == 7
    by_id = {int(r["id"]): r for r in rows}
    r1 = by_id[ids["i1"]]
    assert r1["verdict"] == "COVID" and float(r1["t_forward_ms"]) == 100.0
    assert float(r1["end_to_end_ms"]) == 3000.0 and r1["patient_id_hash"] == PID_HASH
    assert (
        by_id[ids["i4"]]["reason"] == "cannot decode pixel data"
        and by_id[ids["i4"]]["verdict"] == ""
    )
    assert "patient_name" not in rows[0]
    rc, out, _ = run_cli(
        capsys, "audit", "export", "--csv", "-", "--database-url", url, "--verdict", "Normal"
    )
    got = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and [int(r["id"]) for r in got] == [ids["i2"]]


# --------------------------------------------------------------------------------- retry
def _queued_messages(redis_url: str) -> list[tuple[str, list]]:  # type: ignore[type-arg]
    """(task name, args) of the Celery messages waiting in the Redis list of queue 'cxr'."""
    import redis

    r = redis.Redis.from_url(redis_url)
    out = []
    for raw in r.lrange("cxr", 0, -1):
        msg = json.loads(raw)
        body = json.loads(base64.b64decode(msg["body"]))
        out.append((msg["headers"]["task"], body[0]))
    return out


@pytest.mark.redis
def test_retry_sends_tasks(
    audit_db, capsys, redis_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from cxr.settings import get_settings

    url, ids = audit_db
    monkeypatch.setenv("CXR_BROKER_URL", redis_db)
    monkeypatch.setenv("CXR_DATABASE_URL", url)
    get_settings.cache_clear()
    rc, out, err = run_cli(
        capsys, "audit", "retry", "--state", "delivery_failed", "--database-url", url
    )
    assert rc == 0, err
    assert "1 instance(s) reset, 1 task(s) sent" in out
    rc, out, err = run_cli(capsys, "audit", "retry", "1.2.3.4", "--database-url", url)
    assert rc == 0, err
    assert sorted(_queued_messages(redis_db)) == sorted(
        [("cxr.deliver_instance", [ids["i3"]]), ("cxr.classify_instance", [ids["i4"]])]
    )
    with session_scope(url) as s:
        i3, i4 = s.get(Instance, ids["i3"]), s.get(Instance, ids["i4"])
        assert i3.state == State.CLASSIFIED.value and i3.finished_at is None and i3.reason is None
        assert i4.state == State.QUEUED.value  # received -> queued by the dispatcher
        kinds3 = [e.kind for e in i3.events]
        assert kinds3[-1] == "retry" and "delivery_failed -> classified" in i3.events[-1].detail
        assert [e.kind for e in i4.events][-2:] == ["retry", "queued"]
    # nothing left to retry; a delivered instance is not retriable
    rc, out, _ = run_cli(
        capsys, "audit", "retry", "--state", "delivery_failed", "--database-url", url
    )
    assert rc == 0 and "nothing to retry" in out
    rc, _, err = run_cli(capsys, "audit", "retry", "1.2.3.2", "--database-url", url)
    assert rc == 1 and "not retriable" in err
    # refused by the node at receipt: failed, but nothing was stored to classify again
    with session_scope(url) as s:
        s.add(_inst("1.2.3.8", State.FAILED.value, T0, reason="no pixel data"))
    rc, _, err = run_cli(capsys, "audit", "retry", "--state", "failed", "--database-url", url)
    assert rc == 0 and "refused at receipt" in err
    assert len(_queued_messages(redis_db)) == 2


def test_retry_with_broker_down_leaves_it_to_the_sweep(audit_db, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from cxr.settings import get_settings

    url, ids = audit_db
    monkeypatch.setenv("CXR_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")  # nobody there
    get_settings.cache_clear()
    rc, out, _ = run_cli(capsys, "audit", "retry", "1.2.3.4", "--database-url", url)
    assert rc == 3 and "broker unavailable" in out
    with session_scope(url) as s:
        # reset and recorded; 'received' is what the dispatcher's sweep re-sends
        assert s.get(Instance, ids["i4"]).state == State.RECEIVED.value


def test_retry_dry_run_changes_nothing(audit_db, capsys) -> None:  # type: ignore[no-untyped-def]
    url, ids = audit_db
    rc, out, _ = run_cli(
        capsys, "audit", "retry", "--state", "failed", "--dry-run", "--database-url", url
    )
    assert rc == 0 and f"would retry instance {ids['i4']}" in out
    with session_scope(url) as s:
        assert s.get(Instance, ids["i4"]).state == State.FAILED.value


# ------------------------------------------------------------------------------ cxr db
def test_db_upgrade_and_current(db_url: str, workdir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, out, _ = run_cli(capsys, "db", "current", "--database-url", db_url)
    assert rc == 1 and "(empty)" in out and "behind" in out
    rc, out, _ = run_cli(capsys, "db", "upgrade", "--database-url", db_url)
    assert rc == 0 and "schema at 0005 (head 0005)" in out
    rc, out, _ = run_cli(capsys, "db", "current", "--database-url", db_url)
    assert rc == 0 and "up to date" in out
    rc, out, _ = run_cli(capsys, "db", "upgrade", "--database-url", db_url)  # idempotent
    assert rc == 0


def test_audit_without_schema_is_a_clear_error(workdir: Path, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rc, _, err = run_cli(
        capsys, "audit", "list", "--database-url", f"sqlite:///{tmp_path / 'empty.db'}"
    )
    assert rc == 1 and "cxr db upgrade" in err


def test_console_script_uses_database_url_from_env(tmp_path: Path) -> None:
    """The installed ``cxr`` entry point, with the URL from CXR_DATABASE_URL."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    populate(url)
    env = {"PATH": "/usr/bin:/bin", "CXR_DATABASE_URL": url, "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "apps.cli", "audit", "list", "--verdict", "Normal"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "1.2.3.2" in out.stdout and "(1 instance(s))" in out.stdout
