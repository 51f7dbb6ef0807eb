"""README.md, run.sh, scripts/test.sh, .ci/run and docs/: the documented commands exist,
agree with each other, and the configuration table lists every setting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cxr.settings import settings_table
from tests.conftest import REPO

README = REPO / "README.md"


def _section(text: str, heading: str) -> str:
    m = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## )", text, re.M | re.S)
    assert m, f"README has no '## {heading}' section"
    return m.group(1)


def _quick_start_commands() -> list[str]:
    quick = _section(README.read_text(), "Quick start")
    quick = quick.split("### ")[0]  # up to the first sub-section ("Try it ...")
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    cmds = []
    for b in blocks:
        lines = [ln for ln in b.splitlines() if ln.strip() and not ln.startswith("#")]
        assert len(lines) == 1, f"a quick-start block must hold one command: {b!r}"
        cmds.append(lines[0].strip())
    return cmds


def test_readme_has_exactly_two_commands() -> None:
    cmds = _quick_start_commands()
    assert cmds == ["./run.sh", "./scripts/test.sh"]
    for c in cmds:
        path = REPO / c
        assert path.is_file() and os.access(path, os.X_OK), c
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_ci_runs_the_readme_test_command() -> None:
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    text = ci.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    assert lines[-1] == _quick_start_commands()[1]
    assert subprocess.run(["bash", "-n", str(ci)]).returncode == 0


def test_test_script_installs_and_starts_services() -> None:
    text = (REPO / "scripts" / "test.sh").read_text()
    assert "set -euo pipefail" in text
    assert "pip install --quiet -e '.[test]'" in text
    assert "apt-get update" in text
    for pkg in ("dcmtk", "orthanc", "dicom3tools"):
        assert f"missing+=({pkg})" in text
    assert "pg_ctlcluster --skip-systemctl-redirect" in text
    assert "redis-server --daemonize yes" in text
    assert text.rstrip().splitlines()[-1] == 'exec "$PY" -m pytest -q -ra "$@"'


def test_test_script_runs_the_static_checks() -> None:
    """Lint, format, import layers and strict types fail the run (README says which)."""
    import tomllib

    text = (REPO / "scripts" / "test.sh").read_text()
    for cmd in (
        '"$PY" -m ruff check .',
        '"$PY" -m ruff format --check .',
        '"$bin/lint-imports" --no-cache',
        '"$PY" -m mypy',
    ):
        assert cmd in text, cmd
    readme = README.read_text()
    for name in ("ruff check", "ruff format --check", "lint-imports", "mypy"):
        assert f"`{name}`" in readme, name
    mypy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert mypy["strict"] is True
    assert sorted(mypy["files"]) == ["apps", "cxr", "db", "dicom_node", "ml", "web", "worker"]


def test_run_script_installs_and_starts_cxr_run() -> None:
    text = (REPO / "run.sh").read_text()
    assert "pip install --quiet -e ." in text
    assert text.rstrip().splitlines()[-1] == 'exec "$PY" -m apps.cli run "$@"'


@pytest.mark.parametrize(("body", "rc"), [("assert 1 + 1 == 2", 0), ("assert 1 + 1 == 3", 1)])
def test_test_script_exit_status_follows_pytest(tmp_path: Path, body: str, rc: int) -> None:
    """scripts/test.sh (and so .ci/run) fails when a test fails."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(f"def test_probe():\n    {body}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(SKIP_INSTALL="1", PYTHON=sys.executable)
    res = subprocess.run(
        [str(REPO / "scripts" / "test.sh"), str(probe), "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == rc, res.stdout + res.stderr


def test_readme_lists_every_setting() -> None:
    text = README.read_text()
    for var, _default, _desc in settings_table():
        assert f"| `{var}` |" in text, f"{var} missing from the README configuration table"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "settings_table.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr


def test_readme_disclaimer_and_sections() -> None:
    text = README.read_text()
    head = "\n".join(text.splitlines()[:8])
    assert "RESEARCH USE ONLY" in head and "NOT FOR DIAGNOSTIC USE" in head
    for heading in (
        "Data flow",
        "Point a PACS at the node",
        "Configuration",
        "The audit trail",
        "Model card",
    ):
        _section(text, heading)
    flow = _section(text, "Data flow")
    for word in ("PACS", "node", "queue", "workers", "audit DB", "SC + SR", "Segmentation"):
        assert word in flow, word
    assert "cxr audit list" in text and "cxr send" in text


def test_docs_exist_and_link() -> None:
    for name in ("architecture.md", "operations.md", "benchmarks.md"):
        path = REPO / "docs" / name
        assert path.is_file(), name
        assert len(path.read_text()) > 500
    ops = (REPO / "docs" / "operations.md").read_text()
    for topic in (
        "pg_dump",
        "backup",
        "CXR_SPOOL_RETENTION_DAYS",
        "cxr db upgrade",
        "CXR_MODEL_DIR",
        "sha256",
    ):
        assert topic in ops, topic
    for link in re.findall(r"\]\(((?:docs|docker)/[^)#]+)\)", README.read_text()):
        if link != "docs/conformance.md":  # written with the node
            assert (REPO / link).exists(), link
