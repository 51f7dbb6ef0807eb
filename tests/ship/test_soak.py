"""Issue 9: the soak benchmark's small configuration runs in CI (the production topology
on one host: private redis-server, PostgreSQL, node, 2 workers, Orthanc; 100 instances,
every fault: worker SIGKILL, broker kill and restart, PACS down, PostgreSQL restart) and
must show nothing lost and nothing duplicated."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.orthanc,
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.timeout(900),
]


def test_soak_small_configuration_loses_nothing() -> None:
    if not os.path.isdir("/etc/postgresql"):
        pytest.skip("the soak restarts the local PostgreSQL server (pg_ctlcluster)")
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "soak.py"),
            "--instances",
            "50",
            "--associations",
            "8",
            "--workers",
            "2",
            "--db",
            "postgres",
            "--pacs-down",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=840,
        cwd=REPO,
    )
    out = r.stdout
    print(out)
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    rows = [
        ln for ln in out.splitlines() if ln.startswith("| no faults") or ln.startswith("| faults")
    ]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        sent, success, lost, dups = int(cells[1]), int(cells[2]), int(cells[6]), int(cells[5])
        assert sent == success == 50 and lost == 0 and dups == 0, row
        assert int(cells[4]) == 3 * success  # one SC, one SR, one heat map per image
    assert re.fullmatch(
        r"ratios: faults/no-faults throughput \d+\.\d\d", out.strip().splitlines()[-1]
    )
