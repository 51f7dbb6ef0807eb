"""Soak benchmark: the production topology on one host, with scheduled faults.

Topology: a private redis-server (broker) on a free port, the audit DB (PostgreSQL on
127.0.0.1:5432 in a fresh database, or SQLite), one ``cxr node``, ``--workers`` ``cxr
worker`` processes and a real Orthanc as the PACS, all on loopback.

Two phases of ``--instances`` instances each, sent over ``--associations`` concurrent
associations:

1. **no faults** (the baseline of the same run);
2. **faults**, scheduled while the phase runs: a worker SIGKILLed (and restarted), the
   broker killed and restarted, the PACS down for ``--pacs-down`` seconds, and (with
   PostgreSQL) the PostgreSQL server restarted.

Reported per phase: sent, Success answers, audit rows per final state, result objects
(SC, SR, heat map) in the PACS, duplicates (results of ours in the PACS beyond one SC, one
SR and one heat map per source), lost (acknowledged with Success but not final, or
delivered without all three results in the PACS), wall time, images/min, and the time to recover from each fault (from the end of the
fault to the next instance that reaches a final state). The last line is
``ratios: faults/no-faults throughput X``. Exit status 1 when anything was lost or
duplicated.

    python benchmarks/soak.py [--instances 100] [--associations 8] [--workers 2]
                              [--db postgres|sqlite] [--model tiny|shipped|DIR]

RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402
from tests.worker.conftest import RedisServer, Stack, wait_for  # noqa: E402
from tests.worker.orthanc import Orthanc  # noqa: E402

SUCCESS = 0x0000  # PS3.4 B.2.3
RESULTS_PER_SOURCE = 3  # SC, SR and heat map (CXR_SEND_HEATMAP defaults to true)


@dataclass
class Phase:
    name: str
    sent: int = 0
    success: int = 0
    wall_s: float = 0.0
    states: dict[str, int] = field(default_factory=dict)
    pacs_sc_sr: int = 0
    duplicates: int = 0
    lost: int = 0
    recovery_s: dict[str, float | None] = field(default_factory=dict)

    @property
    def images_per_min(self) -> float:
        return 60.0 * self.success / self.wall_s if self.wall_s else 0.0


def _datasets(n: int, offset: int) -> list[Any]:
    from apps.demo import demo_dataset

    return [demo_dataset(offset + i, size=128) for i in range(n)]


def _send_all(port: int, datasets: list[Any], associations: int) -> list[int | None]:
    from pynetdicom import AE

    statuses: list[int | None] = [None] * len(datasets)

    def worker(k: int) -> None:
        ae = AE(ae_title=f"SOAK{k}")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ctx = {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}
        for sop, ts in sorted(ctx):
            ae.add_requested_context(sop, ts)
        mine = list(range(k, len(datasets), associations))
        while mine:
            assoc = ae.associate("127.0.0.1", port, ae_title="CXR_WORKER")
            if not assoc.is_established:
                time.sleep(0.5)
                continue
            try:
                while mine and assoc.is_established:
                    rsp = assoc.send_c_store(datasets[mine[0]])
                    st = rsp.get("Status") if rsp is not None else None
                    if st is None:
                        break  # lost association: resend on a new one
                    statuses[mine.pop(0)] = int(st)
            finally:
                if assoc.is_established:
                    assoc.release()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(associations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def _final_count(stack: Stack, uids: set[str]) -> int:
    from worker.pipeline import is_finished

    return sum(
        1
        for r in stack.instances()
        if r.sop_instance_uid in uids and is_finished(r.state, r.finished_at)
    )


@contextlib.contextmanager
def _postgres_db() -> Iterator[str]:
    from sqlalchemy import create_engine, text

    name = f"cxr_soak_{os.getpid()}"
    admin = create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        isolation_level="AUTOCOMMIT",
        pool_pre_ping=True,
    )
    with admin.connect() as c:
        c.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        c.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        from db.session import dispose_engines

        dispose_engines()
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def _restart_postgres() -> None:
    ver = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", ver, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _run_phase(
    stack: Stack,
    redis: RedisServer,
    name: str,
    n: int,
    offset: int,
    associations: int,
    faults: bool,
    pacs_down: float,
    pg: bool,
    workers: list[Any],
) -> Phase:
    from worker.uids import output_uids

    ph = Phase(name)
    datasets = _datasets(n, offset)
    uids = {str(d.SOPInstanceUID) for d in datasets}
    t0 = time.monotonic()
    fault_log: list[tuple[str, float]] = []  # (fault, monotonic time it ended)

    def inject() -> None:
        time.sleep(2)
        workers[0].kill(signal.SIGKILL)  # a worker dies mid-work
        fault_log.append(("worker SIGKILL", time.monotonic()))
        workers[0] = stack.start_worker(concurrency=1)
        time.sleep(2)
        redis.stop()  # the broker dies ...
        time.sleep(3)
        redis.start()  # ... and comes back (empty: the sweep re-queues)
        fault_log.append(("broker kill+restart", time.monotonic()))
        time.sleep(2)
        stack.orthanc.stop()  # the PACS is down
        time.sleep(pacs_down)
        stack.orthanc.start()
        fault_log.append((f"PACS down {pacs_down:.0f} s", time.monotonic()))
        if pg:
            time.sleep(2)
            _restart_postgres()
            fault_log.append(("PostgreSQL restart", time.monotonic()))

    samples: list[tuple[float, int]] = []  # (monotonic time, instances final)
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            with contextlib.suppress(Exception):  # the DB may be restarting
                samples.append((time.monotonic(), _final_count(stack, uids)))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    injector = threading.Thread(target=inject) if faults else None
    if injector:
        injector.start()
    statuses = _send_all(stack.node_port, datasets, associations)
    ph.sent = len(datasets)
    ph.success = sum(1 for s in statuses if s == SUCCESS)
    if injector:
        while injector.is_alive():
            injector.join(0.5)
    ok_uids = {
        str(d.SOPInstanceUID) for d, s in zip(datasets, statuses, strict=True) if s == SUCCESS
    }
    try:
        wait_for(
            lambda: _final_count(stack, ok_uids) == len(ok_uids),
            60 + 10 * n,
            interval=1.0,
            what=f"{name}: all instances final",
        )
    except AssertionError:
        pass  # counted as lost below
    ph.wall_s = time.monotonic() - t0
    sampling.set()
    sampler.join(5)
    # recovery: from the end of each fault, the time until one more instance was final
    # (0 when nothing was left to do at that moment; None when nothing moved again)
    for fault, ended in fault_log:
        before = [c for t, c in samples if t <= ended]
        base = before[-1] if before else 0
        if base >= len(ok_uids):
            ph.recovery_s[fault] = 0.0
            continue
        after = [t for t, c in samples if t > ended and c > base]
        ph.recovery_s[fault] = round(after[0] - ended, 1) if after else None
    rows = [r for r in stack.instances() if r.sop_instance_uid in uids]
    ph.states = dict(Counter(r.state for r in rows))
    version = _model_version(stack)
    expected = {}
    for u in ok_uids:
        o = output_uids(u, version)
        expected[u] = {o.sc_sop, o.sr_sop, o.hm_sop}
    pacs_tags = stack.orthanc.all_instance_tags()
    ours = [t for t in pacs_tags if str(t.get("Manufacturer", "")).strip() == "cxr-triage"]
    in_pacs = Counter(str(t.get("SOPInstanceUID")) for t in ours)
    want = set().union(*expected.values()) if expected else set()
    ph.pacs_sc_sr = sum(1 for u in in_pacs if u in want)
    # every source has its own study: more than its SC, SR and heat map of ours in a study
    # of this phase is a duplicate (a result sent twice under another UID)
    studies = {str(d.StudyInstanceUID) for d in datasets}
    per_study = Counter(
        str(t.get("StudyInstanceUID")) for t in ours if str(t.get("StudyInstanceUID")) in studies
    )
    ph.duplicates = sum(c - 1 for c in in_pacs.values() if c > 1) + sum(
        max(0, c - RESULTS_PER_SOURCE) for c in per_study.values()
    )
    by_uid = {r.sop_instance_uid: r for r in rows}
    for u in ok_uids:
        r = by_uid.get(u)
        if r is None or r.state not in ("delivered", "ignored", "failed", "delivery_failed"):
            ph.lost += 1
        elif r.state == "delivered" and not expected[u] <= set(in_pacs):
            ph.lost += 1
    return ph


def _model_version(stack: Stack) -> str:
    from ml.artifact import load_card

    return str(load_card(Path(stack.env["CXR_MODEL_DIR"])).get("version", ""))


def _model(kind: str, work: Path) -> Path:
    if kind == "tiny":
        from ml.artifact import make_tiny_artifact

        return make_tiny_artifact(work / "tiny-model", image_size=64)
    if kind == "shipped":
        from cxr.settings import default_model_dir

        return default_model_dir()
    return Path(kind)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=100, help="instances per phase")
    ap.add_argument("--associations", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    ap.add_argument("--model", default="tiny", help="tiny (fast, for CI), shipped, or a DIR")
    ap.add_argument("--pacs-down", type=float, default=15.0, help="seconds the PACS is down")
    ap.add_argument("--json", dest="json_out", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    a = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = Path(tempfile.mkdtemp(prefix="cxr-soak-"))
    model = _model(a.model, work)
    from ml.runtime import Classifier

    cache = work / "model-cache"
    Classifier.load(model, engine="auto", cache_dir=cache)  # warm the ONNX export once
    redis = RedisServer(work / "redis", free_port()).start()
    orthanc = Orthanc(work / "orthanc", free_port(), free_port()).start()
    phases: list[Phase] = []
    db_ctx = (
        _postgres_db()
        if a.db == "postgres"
        else contextlib.nullcontext(f"sqlite:///{work / 'audit.db'}")
    )
    try:
        with db_ctx as db_url:
            stack = Stack(
                work,
                orthanc,
                db_url,
                model,
                cache,
                redis.url,
                CXR_DELIVERY_MAX_ATTEMPTS=40,
                CXR_RETRY_BACKOFF_BASE=1,
                CXR_RETRY_BACKOFF_MAX=4,
                CXR_REQUEUE_INTERVAL=2,
                CXR_REQUEUE_STALE_AFTER=30,
                CXR_MAX_ASSOCIATIONS=max(10, a.associations + 2),
            )
            try:
                stack.start_node()
                workers = [stack.start_worker(concurrency=1) for _ in range(a.workers)]
                for name, faults, offset in (
                    ("no faults", False, 0),
                    ("faults", True, a.instances),
                ):
                    phases.append(
                        _run_phase(
                            stack,
                            redis,
                            name,
                            a.instances,
                            10_000 + offset,
                            a.associations,
                            faults,
                            a.pacs_down,
                            a.db == "postgres",
                            workers,
                        )
                    )
            finally:
                stack.close()
    finally:
        orthanc.stop()
        redis.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"soak: {a.instances} instances per phase over {a.associations} associations, "
        f"{a.workers} workers, broker redis (private), audit DB {a.db}, model {a.model}, "
        f"PACS Orthanc; {os.cpu_count()} CPUs"
    )
    print(
        "| phase | sent | Success | final states | SC+SR+HM in PACS | duplicates | lost | "
        "wall s | images/min | recovery s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ph in phases:
        print(
            f"| {ph.name} | {ph.sent} | {ph.success} | {json.dumps(ph.states)} | "
            f"{ph.pacs_sc_sr} | {ph.duplicates} | {ph.lost} | {ph.wall_s:.1f} | "
            f"{ph.images_per_min:.1f} | {json.dumps(ph.recovery_s) if ph.recovery_s else '-'} |"
        )
    if a.json_out:
        a.json_out.write_text(json.dumps([ph.__dict__ for ph in phases], indent=2) + "\n")
    bad = sum(ph.lost + ph.duplicates for ph in phases)
    base, fault = phases[0].images_per_min, phases[-1].images_per_min
    print(f"ratios: faults/no-faults throughput {fault / base if base else float('nan'):.2f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
