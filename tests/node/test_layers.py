"""The node writes the audit DB only through ``db.lifecycle`` (issue #10, point 1).

``lint-imports`` checks the same for sqlalchemy/alembic/db.models/db.session (contract in
pyproject.toml); this test also covers database drivers and runs with the test suite."""

from __future__ import annotations

import ast
from pathlib import Path

import dicom_node

FORBIDDEN = ("sqlalchemy", "alembic", "db.models", "db.session", "psycopg", "sqlite3")


def _imports(path: Path) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "db":
                out += [(node.lineno, f"db.{a.name}") for a in node.names]
    return out


def test_dicom_node_imports_no_sql_layer() -> None:
    files = sorted(Path(dicom_node.__file__).parent.glob("*.py"))
    assert files
    bad = [
        f"{f.name}:{line} imports {mod}"
        for f in files
        for line, mod in _imports(f)
        if any(mod == x or mod.startswith(x + ".") for x in FORBIDDEN)
    ]
    assert bad == []
