"""End to end: ``cxr run`` (node + worker, embedded defaults) receives the shared chest
samples from DCMTK's dcmsend, every instance reaches a final state in the audit DB, the
metrics move, a killed worker is restarted, logs are JSON without PHI, and SIGTERM gives
a clean exit (code 0, no child left)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import dcmtk, make_chest_dataset
from tests.ship.conftest import RunningPipeline, descendants, pid_alive

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

PHI_NAME = "Zyxquor^Phineas"
PHI_ID = "PHI-ZQ-773311"
# PHI inside the shared samples (see ../shared/dicom-samples/README.md)
SAMPLE_PHI = ["16d7f894-55d7-4d95-8957-d18987f0e981", "AVeryGood"]


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def audit_rows(db_url: str) -> list[tuple[int, str, str, str | None]]:
    from sqlalchemy import create_engine, text

    eng = create_engine(db_url)
    try:
        with eng.connect() as c:
            rows = c.execute(
                text(
                    "SELECT i.id, i.sop_instance_uid, i.state, "
                    "(SELECT verdict FROM inferences f WHERE f.instance_id = i.id "
                    " ORDER BY f.id DESC LIMIT 1) FROM instances i ORDER BY i.id"
                )
            ).all()
    finally:
        eng.dispose()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def wait_final(
    rp: RunningPipeline, n: int, timeout: float = 180.0, states: set[str] | None = None
) -> list[tuple]:
    from db.models import FINAL_STATES

    finals = states or {s.value for s in FINAL_STATES}
    deadline = time.monotonic() + timeout
    rows: list[tuple] = []
    while time.monotonic() < deadline:
        assert rp.proc.poll() is None, f"cxr run died:\n{rp.stderr[-4000:]}"
        try:
            rows = audit_rows(rp.db_url)
        except Exception:  # table being created / DB locked: try again
            rows = []
        if len(rows) >= n and all(r[2] in finals for r in rows):
            return rows
        time.sleep(0.5)
    raise AssertionError(f"not all final after {timeout}s: {rows}\n{rp.stderr[-4000:]}")


def dcmsend(port: int, files: list[Path]) -> None:
    res = subprocess.run(
        [
            dcmtk("dcmsend"),
            "127.0.0.1",
            str(port),
            "-aec",
            "CXR_WORKER",
            "-aet",
            "E2E_SCU",
            "+f",
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_cxr_run_end_to_end(run_pipeline, result_scp, dicom_samples: Path, tmp_path: Path) -> None:
    phi = tmp_path / "phi.dcm"
    make_chest_dataset(patient_name=PHI_NAME, patient_id=PHI_ID, seed=7).save_as(
        phi, enforce_file_format=True
    )
    files = sorted((dicom_samples / "chest").glob("*.dcm")) + [phi]
    assert len(files) >= 5

    rp: RunningPipeline = run_pipeline(CXR_LOG_JSON="true", CXR_DESTINATIONS=result_scp.destination)
    rp.wait_ready()
    assert f"--to CXR_WORKER@127.0.0.1:{rp.dicom_port}" in rp.stdout  # how to push a study
    code, body = rp.http_get("/healthz")
    assert code == 200, body
    assert json.loads(body)["status"] == "ok"
    _, before = rp.http_get("/metrics")
    assert metric_sum(before, "cxr_instances_received_total") == 0

    dcmsend(rp.dicom_port, files)
    rows = wait_final(rp, len(files))

    # every chest sample was classified (an inference row with a verdict) and its results
    # were delivered to the PACS
    assert len(rows) == len(files)
    unclassified = [r for r in rows if r[3] not in ("COVID", "Normal", "Other")]
    assert not unclassified, unclassified
    assert {r[2] for r in rows} == {"delivered"}, rows
    assert len(result_scp.received) >= len(files)
    assert {ae for _, ae in result_scp.received} == {"CXR_WORKER"}

    # one status line per processed instance: verdict, probabilities, latency
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(r[1] in rp.stdout for r in rows):
        time.sleep(0.3)
    for _id, sop, _state, verdict in rows:
        line = next((ln for ln in rp.stdout.splitlines() if sop in ln), "")
        assert f"verdict={verdict}" in line, rp.stdout[-3000:]
        assert re.search(r"p\(COVID\)=\d\.\d{3} p\(Normal\)=\d\.\d{3} p\(Other\)=\d\.\d{3}", line)
        assert re.search(r"latency=\d+\.\d\ds", line)

    # the counters of node and worker (child processes) moved, seen on one endpoint
    _, after = rp.http_get("/metrics")
    n = len(files)
    assert metric_sum(after, "cxr_instances_received_total") >= n
    assert metric_sum(after, "cxr_instances_accepted_total") >= n
    assert metric_sum(after, "cxr_inferences_total") >= n
    assert metric_sum(after, "cxr_stage_seconds_count") > 0
    assert metric_sum(after, "cxr_audit_instances") == n
    assert metric_sum(after, "cxr_deliveries_total") >= n
    # one queue-depth series (from the audit DB), empty now that all is done
    assert after.count("# TYPE cxr_queue_depth gauge") == 1
    assert re.search(r"^cxr_queue_depth 0\.0$", after, re.M), after

    # a crashed worker is restarted
    kids = rp.children()
    worker_pids = [
        p
        for p in kids
        if b" worker" in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
    ]
    assert len(worker_pids) == 1, kids
    os.kill(worker_pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, m = rp.http_get("/metrics")
        if (
            metric_sum(m, "cxr_child_restarts_total", child="worker-1") == 1
            and metric_sum(m, "cxr_child_up", child="worker-1") == 1
        ):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"worker not restarted:\n{rp.stderr[-3000:]}")
    assert "restarting in" in rp.stderr

    # clean shutdown on SIGTERM
    all_kids = descendants(rp.proc.pid)
    rp.proc.send_signal(signal.SIGTERM)
    assert rp.proc.wait(120) == 0, rp.stderr[-4000:]
    assert "cxr run: stopped" in rp.stdout
    deadline = time.monotonic() + 15  # reaped children can take a moment to vanish
    while [p for p in all_kids if pid_alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in all_kids if pid_alive(p)], "children left running"

    # logs: JSON lines, never the patient's name or ID
    logs = rp.stdout + rp.stderr
    for secret in [PHI_NAME, *PHI_NAME.split("^"), PHI_ID, *SAMPLE_PHI]:
        assert secret not in logs, f"PHI {secret!r} in the logs"
    json_lines = [ln for ln in rp.stderr.splitlines() if ln.startswith("{")]
    assert len(json_lines) > 5
    for ln in json_lines:
        assert {"ts", "level", "logger", "msg"} <= json.loads(ln).keys()
    plain = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING|ERROR)")
    assert not [ln for ln in rp.stderr.splitlines() if plain.match(ln)]


def test_sigterm_finishes_work_in_flight(run_pipeline, tmp_path: Path) -> None:
    """Two workers; demo images pushed with `cxr send`; SIGTERM right after the push:
    nothing is left half-done ('processing'), the exit is 0, and a restart on the same
    audit DB, spool and broker completes every instance."""
    from apps.demo import write_demo

    folder = tmp_path / "batch"
    write_demo(folder, count=4, size=256)
    rp: RunningPipeline = run_pipeline(["--workers", "2"])
    rp.wait_ready()
    assert "workers           : 2" in rp.stdout
    # the product's own SCU, as a user would try it with the demo images
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "apps.cli",
            "send",
            str(folder),
            "--no-progress",
            "--to",
            f"CXR_WORKER@127.0.0.1:{rp.dicom_port}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 file(s): 4 Success" in res.stdout
    # stop while the worker is (or is about to be) busy
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = [r[2] for r in audit_rows(rp.db_url)]
        if "processing" in states or any(s not in ("received", "queued") for s in states):
            break
        time.sleep(0.1)
    rp.proc.send_signal(signal.SIGTERM)
    assert rp.proc.wait(120) == 0, rp.stderr[-4000:]
    states = [r[2] for r in audit_rows(rp.db_url)]
    assert len(states) == 4
    assert "processing" not in states, states
    assert "cxr run: stopped" in rp.stdout

    # restart on the same audit DB, spool and broker: the rest is processed
    env = dict(rp.env)
    out2, err2 = rp.workdir / "stdout2.txt", rp.workdir / "stderr2.txt"
    with open(out2, "wb") as fo, open(err2, "wb") as fe:
        proc2 = subprocess.Popen(
            [*rp.proc.args],
            cwd=rp.workdir,
            env=env,
            stdout=fo,
            stderr=fe,
            start_new_session=True,
        )
    rp2 = RunningPipeline(
        proc2, rp.workdir, rp.dicom_port, rp.metrics_port, rp.db_url, out2, err2, env
    )
    try:
        # ready first: the first run may already have finished all four, and a SIGTERM sent
        # while the interpreter is still importing meets Python's default handler (-15)
        rp2.wait_ready()
        # no CXR_DESTINATIONS: 'classified' is where processing ends
        rows = wait_final(rp2, 4, states={"classified"})
        assert all(r[3] in ("COVID", "Normal", "Other") for r in rows)
    finally:
        proc2.send_signal(signal.SIGTERM)
        try:
            assert proc2.wait(120) == 0
        finally:
            if proc2.poll() is None:
                proc2.kill()
                proc2.wait()
