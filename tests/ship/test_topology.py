"""The docker-compose topology without Docker: `cxr node` and `cxr worker` as separate
processes on the real Redis broker and PostgreSQL audit DB, configured like the compose
services (shared spool, PROMETHEUS_MULTIPROC_DIR for the worker). Each serves its own
/metrics and /healthz; the counters of the worker's forked pool processes are visible."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, make_chest_dataset
from tests.ship.conftest import clean_env, descendants, pid_alive
from tests.ship.test_run_e2e import metric_sum

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def test_node_and_worker_processes_on_redis_and_postgres(
    tmp_path: Path, redis_db: str, pg_url: str, tiny_model: Path, result_scp
) -> None:
    node_metrics, worker_metrics, dicom_port = free_port(), free_port(), free_port()
    common = dict(
        CXR_BROKER_URL=redis_db,
        CXR_DATABASE_URL=pg_url,
        CXR_SPOOL_DIR=str(tmp_path / "spool"),
        CXR_MODEL_DIR=str(tiny_model),
        CXR_MODEL_CACHE_DIR=str(tmp_path / "cache"),
        CXR_DICOM_HOST="127.0.0.1",
        CXR_DICOM_PORT=str(dicom_port),
        CXR_METRICS_HOST="127.0.0.1",
        CXR_DESTINATIONS=result_scp.destination,
        CXR_LOG_JSON="true",
    )
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    subprocess.run(
        [sys.executable, "-m", "apps.cli", "db", "upgrade"],
        cwd=tmp_path,
        env=clean_env(**common),
        check=True,
        capture_output=True,
        timeout=120,
    )
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for name, extra in (
            ("node", {"CXR_METRICS_PORT": str(node_metrics)}),
            (
                "worker",
                {"CXR_METRICS_PORT": str(worker_metrics), "PROMETHEUS_MULTIPROC_DIR": str(mp_dir)},
            ),
        ):
            log = open(tmp_path / f"{name}.log", "wb")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "apps.cli", name],
                    cwd=tmp_path,
                    env=clean_env(**common, **extra),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (
                _get(node_metrics, "/healthz")[0] == 200
                and _get(worker_metrics, "/healthz")[0] == 200
            ):
                break
            assert all(p.poll() is None for p in procs), (tmp_path / "worker.log").read_text()[
                -3000:
            ]
            time.sleep(0.5)
        else:
            raise AssertionError("node/worker not healthy")
        assert json.loads(_get(worker_metrics, "/healthz")[1])["status"] == "ok"

        folder = tmp_path / "in"
        folder.mkdir()
        for i in range(3):
            make_chest_dataset(seed=i, patient_id=f"P{i}").save_as(
                folder / f"{i}.dcm", enforce_file_format=True
            )
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "apps.cli",
                "send",
                str(folder),
                "--no-progress",
                "--to",
                f"CXR_WORKER@127.0.0.1:{dicom_port}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert res.returncode == 0, res.stdout + res.stderr

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            _, wm = _get(worker_metrics, "/metrics")
            if (
                metric_sum(wm, "cxr_inferences_total") >= 3
                and metric_sum(wm, "cxr_deliveries_total") >= 3
            ):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(
                f"worker metrics did not move:\n{(tmp_path / 'worker.log').read_text()[-3000:]}"
            )
        assert metric_sum(wm, "cxr_stage_seconds_count") > 0
        _, nm = _get(node_metrics, "/metrics")
        assert metric_sum(nm, "cxr_instances_received_total") == 3
        assert metric_sum(nm, "cxr_instances_accepted_total") == 3
        assert len(result_scp.received) >= 3
    finally:
        kids = [k for p in procs for k in descendants(p.pid)]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        rcs = []
        for p in procs:
            try:
                rcs.append(p.wait(120))
            except subprocess.TimeoutExpired:
                p.kill()
                rcs.append(p.wait())
        for log in logs:
            log.close()
    assert rcs == [0, 0], rcs  # clean SIGTERM shutdown of both
    time.sleep(0.5)
    assert not [k for k in kids if pid_alive(k)]
