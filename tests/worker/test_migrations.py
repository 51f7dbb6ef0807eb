"""Alembic migrations upgrade and downgrade on SQLite and PostgreSQL (issue 8 adds
0002: the inference's OOD score and flag; issue 9 adds 0003: the delivery retry waiting
in the DB), keeping the rows that were there."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text

from db.session import alembic_config, dispose_engines, get_engine


def _columns(url: str, table: str) -> set[str]:
    return {c["name"] for c in inspect(get_engine(url)).get_columns(table)}


def test_0002_upgrade_downgrade_keeps_rows(db_url: str) -> None:
    cfg = alembic_config(db_url)
    command.upgrade(cfg, "0001")
    assert "ood_score" not in _columns(db_url, "inferences")
    with get_engine(db_url).begin() as c:
        c.execute(
            text(
                "INSERT INTO instances (sop_instance_uid, content_sha256, version, state, received_at,"
                " updated_at, attempts) VALUES ('1.2.3', 'ab', 1, 'classified', CURRENT_TIMESTAMP,"
                " CURRENT_TIMESTAMP, 1)"
            )
        )
        iid = c.execute(text("SELECT id FROM instances")).scalar_one()
        c.execute(
            text(
                "INSERT INTO inferences (instance_id, created_at, model_version, model_sha256,"
                " p_covid, p_normal, p_other, verdict) VALUES"
                f" ({iid}, CURRENT_TIMESTAMP, '1.0.0', 'x', 0.1, 0.8, 0.1, 'Normal')"
            )
        )
    command.upgrade(cfg, "head")
    assert {"ood_score", "ood"} <= _columns(db_url, "inferences")
    with get_engine(db_url).begin() as c:
        row = c.execute(text("SELECT verdict, ood_score, ood FROM inferences")).one()
        assert tuple(row) == ("Normal", None, None)
        c.execute(text("UPDATE inferences SET ood_score = 17.5, ood = :t"), {"t": True})
    command.downgrade(cfg, "0001")
    assert "ood_score" not in _columns(db_url, "inferences")
    with get_engine(db_url).begin() as c:
        assert c.execute(text("SELECT verdict FROM inferences")).scalar_one() == "Normal"
    command.upgrade(cfg, "head")
    dispose_engines()


def test_0003_upgrade_downgrade_keeps_rows(db_url: str) -> None:
    """0003: the delivery retry that waits in the DB (instances.retry_due_at/attempt)."""
    cfg = alembic_config(db_url)
    command.upgrade(cfg, "0002")
    assert "retry_due_at" not in _columns(db_url, "instances")
    with get_engine(db_url).begin() as c:
        c.execute(
            text(
                "INSERT INTO instances (sop_instance_uid, content_sha256, version, state, received_at,"
                " updated_at, attempts) VALUES ('1.2.4', 'cd', 1, 'classified', CURRENT_TIMESTAMP,"
                " CURRENT_TIMESTAMP, 1)"
            )
        )
    command.upgrade(cfg, "head")
    assert {"retry_due_at", "retry_attempt"} <= _columns(db_url, "instances")
    with get_engine(db_url).begin() as c:
        row = c.execute(text("SELECT state, retry_due_at, retry_attempt FROM instances")).one()
        assert tuple(row) == ("classified", None, None)
        c.execute(text("UPDATE instances SET retry_due_at = CURRENT_TIMESTAMP, retry_attempt = 3"))
    command.downgrade(cfg, "0002")
    assert "retry_due_at" not in _columns(db_url, "instances")
    with get_engine(db_url).begin() as c:
        assert c.execute(text("SELECT state FROM instances")).scalar_one() == "classified"
    command.upgrade(cfg, "head")
    dispose_engines()


def test_0004_upgrade_downgrade_keeps_rows(db_url: str) -> None:
    """0004: the heat map's UIDs of an inference (inferences.hm_series_uid/hm_sop_instance_uid)."""
    cfg = alembic_config(db_url)
    command.upgrade(cfg, "0003")
    assert "hm_sop_instance_uid" not in _columns(db_url, "inferences")
    with get_engine(db_url).begin() as c:
        c.execute(
            text(
                "INSERT INTO instances (sop_instance_uid, content_sha256, version, state, received_at,"
                " updated_at, attempts) VALUES ('1.2.5', 'ef', 1, 'classified', CURRENT_TIMESTAMP,"
                " CURRENT_TIMESTAMP, 1)"
            )
        )
        iid = c.execute(text("SELECT id FROM instances WHERE sop_instance_uid = '1.2.5'")).scalar()
        c.execute(
            text(
                "INSERT INTO inferences (instance_id, created_at, model_version, model_sha256,"
                " p_covid, p_normal, p_other, verdict, sc_sop_instance_uid) VALUES"
                f" ({iid}, CURRENT_TIMESTAMP, '1.0.0', 'x', 0.1, 0.8, 0.1, 'Normal', '2.25.7')"
            )
        )
    command.upgrade(cfg, "head")
    assert {"hm_series_uid", "hm_sop_instance_uid"} <= _columns(db_url, "inferences")
    with get_engine(db_url).begin() as c:
        row = c.execute(
            text(
                "SELECT sc_sop_instance_uid, hm_sop_instance_uid FROM inferences"
                f" WHERE instance_id = {iid}"
            )
        ).one()
        assert tuple(row) == ("2.25.7", None)
        c.execute(
            text(f"UPDATE inferences SET hm_sop_instance_uid = '2.25.8' WHERE instance_id = {iid}")
        )
    command.downgrade(cfg, "0003")
    assert "hm_sop_instance_uid" not in _columns(db_url, "inferences")
    with get_engine(db_url).begin() as c:
        assert (
            c.execute(
                text(f"SELECT verdict FROM inferences WHERE instance_id = {iid}")
            ).scalar_one()
            == "Normal"
        )
    command.upgrade(cfg, "head")
    dispose_engines()
