"""``cxr db``: audit database administration.

``cxr db upgrade`` brings the schema to the newest Alembic revision (idempotent; the node
and the workers also do it at start-up). ``cxr db current`` prints the revision of the
database and of the code; it exits 1 when the database is behind (run ``upgrade``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import IO

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        name,
        help="database administration (upgrade)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="db_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", help="audit database URL (default CXR_DATABASE_URL)")
    up = sub.add_parser("upgrade", parents=[common], help="alembic upgrade to the newest schema")
    up.add_argument("--revision", default="head", help="target revision (default head)")
    up.set_defaults(func=cmd_upgrade)
    cur = sub.add_parser("current", parents=[common], help="show the schema revision")
    cur.set_defaults(func=cmd_current)


def _url(args: argparse.Namespace) -> str:
    if getattr(args, "database_url", None):
        return str(args.database_url)
    from cxr.settings import get_settings

    return get_settings().database_url


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_upgrade(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    from db.session import upgrade

    out = out or sys.stdout
    url = _url(args)
    try:
        upgrade(url, args.revision)
    except Exception as exc:
        print(f"cxr db upgrade: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    rev, head = revisions(url)
    out.write(f"{_safe(url)}: schema at {rev} (head {head})\n")
    return 0


def revisions(url: str) -> tuple[str | None, str | None]:
    """(revision of the database or None when empty, head revision of the code)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from db.session import alembic_config, get_engine

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with get_engine(url).connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head


def cmd_current(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    url = _url(args)
    try:
        rev, head = revisions(url)
    except Exception as exc:
        print(f"cxr db current: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    state = "up to date" if rev == head else "behind: run `cxr db upgrade`"
    out.write(f"{_safe(url)}: schema at {rev or '(empty)'}, head {head} ({state})\n")
    return 0 if rev == head else 1
