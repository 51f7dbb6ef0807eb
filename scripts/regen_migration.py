"""Regenerate db/migrations/versions/0001 from db/models.py.

Only while the schema is unreleased (no deployed databases): after the first release,
add a new Alembic revision instead (docs/operations.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from alembic import command

from db.session import alembic_config

VERSIONS = Path(__file__).resolve().parent.parent / "db" / "migrations" / "versions"

for f in VERSIONS.glob("0001_*.py"):
    f.unlink()
with tempfile.TemporaryDirectory() as d:
    cfg = alembic_config(f"sqlite:///{d}/gen.db")
    command.revision(cfg, message="initial audit schema", autogenerate=True, rev_id="0001")
print("regenerated", *VERSIONS.glob("0001_*.py"))
