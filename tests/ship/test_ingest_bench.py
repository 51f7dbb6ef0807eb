"""Issue 10: the ingest benchmark (benchmarks/ingest.py) runs in CI at a tiny size, so that
the figures recorded in docs/benchmarks.md section 1 stay reproducible: every Success of the
node is an audit row and a spool file, the CPU per instance of receiver and sender is
measured, the node's per-instance steps are timed alone, and the last line is the ratios.
No figure is asserted (benchmarks, not timed tests)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_ingest_benchmark_small_run_reports_cpu_and_ratios(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "ingest.py"),
            "--count",
            "6",
            "--concurrency",
            "1",
            "--small",
            "--bookkeeping",
            "5",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=REPO,
    )
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert "node check: 6 acknowledged, 6 audit rows {'queued': 6}, 6 spool files" in out, out
    assert "WARNING: acknowledged / rows / files differ" not in out
    rows = {
        ln.split()[0]: ln.split() for ln in out.splitlines() if re.match(r"(storescp|node) ", ln)
    }
    assert set(rows) == {"storescp", "node"}, out
    for cells in rows.values():
        assert int(cells[2]) == 6 and int(cells[3]) == 0  # ok, fail
        assert float(cells[-2]) > 0 and float(cells[-1]) > 0  # receiver, sender CPU ms
    bound = re.search(r"CPU-bound node/baseline (\d+\.\d+)", out)
    assert bound and 0 < float(bound.group(1)) < 5, out
    steps = re.search(
        r"spool write (\S+), received txn (\S+), broker publish (\S+), queued txn (\S+); sum",
        out,
    )
    assert steps and all(float(v) > 0 for v in steps.groups()), out
    assert re.fullmatch(r"ratios: c1=\d+\.\d+", out.strip().splitlines()[-1]), out
