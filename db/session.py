"""Engine/session factory and schema upgrade (Alembic) for the audit database."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_lock = threading.Lock()
_engines: dict[str, Engine] = {}


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # durable commits: a Success means it is on disk
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs; create SQLite parent folders."""
    u = make_url(url)
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    return u.render_as_string(hide_password=False)


def get_engine(url: str) -> Engine:
    """One engine per URL per process (safe after fork: call :func:`dispose_engines`)."""
    url = normalise_url(url)
    with _lock:
        eng = _engines.get(url)
        if eng is None:
            if url.startswith("sqlite"):
                eng = create_engine(url, connect_args={"timeout": 30})
                event.listen(eng, "connect", _sqlite_pragmas)
            else:
                # fail fast when the server is unreachable: the node must answer 0xA700
                # quickly rather than let the sender's DIMSE timeout expire
                args = {} if "connect_timeout" in url else {"connect_timeout": 5}
                eng = create_engine(
                    url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args=args
                )
            _engines[url] = eng
        return eng


def dispose_engines() -> None:
    """Drop pooled connections, e.g. in a freshly forked worker process."""
    with _lock:
        for eng in _engines.values():
            eng.dispose(close=False)
        _engines.clear()


def ping(url: str) -> bool:
    """True when the audit database answers ``SELECT 1`` (health checks)."""
    from sqlalchemy import text

    with get_engine(url).connect() as c:
        c.execute(text("SELECT 1"))
    return True


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A transaction: commit on success, roll back on error."""
    sess = session_factory(url)()
    try:
        yield sess
        sess.commit()
    except BaseException:
        sess.rollback()
        raise
    finally:
        sess.close()


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision`` with Alembic (idempotent)."""
    from alembic import command

    log.info("upgrading audit schema to %s", revision)
    command.upgrade(alembic_config(url), revision)


def init_db(url: str) -> Engine:
    """Create/upgrade the schema and return the engine."""
    upgrade(url)
    return get_engine(url)
