"""Is the node's memory bounded under a long stream of bad input? (issue 9)

Starts a real ``cxr node`` (its own process, SQLite audit DB, embedded broker, no worker)
and sends it the seeded mutation corpus of ``tests/node/test_fuzz.py`` (flipped, deleted
and inserted bytes, truncation, wrong VRs, huge lengths, pixel bombs, UID mismatches),
with half-open, idle and garbage connections between batches, until ``--inputs`` inputs
have been answered. The node's RSS (``/proc/PID/status``) is read after every batch.

    python benchmarks/node_memory.py [--inputs 10000] [--batch 500]

The baseline is the node's RSS after the first ``--warmup`` answered inputs (caches,
imports and allocator arenas filled): bounded memory means the later batches stay near it.
The last line: ``ratios: rss end/warm-up X, rss peak/warm-up Y, second half growth/first
half growth Z``. RESEARCH USE ONLY.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _wait_port(port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("node did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--samples", type=Path, default=REPO.parent / "shared" / "dicom-samples")
    args = ap.parse_args()

    from tests.node.test_fuzz import SEED, _bases, _connection_faults, _mutate, _Sender

    work = Path(tempfile.mkdtemp(prefix="cxr-node-memory-"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        {
            "CXR_DICOM_HOST": "127.0.0.1",
            "CXR_DICOM_PORT": str(port),
            "CXR_DATABASE_URL": f"sqlite:///{work / 'audit.db'}",
            "CXR_SPOOL_DIR": str(work / "spool"),
            "CXR_EMBEDDED_BROKER_PATH": str(work / "broker.sqlite"),
            "CXR_METRICS_PORT": "0",
            "CXR_MAX_PIXELS": "10000000",
            "CXR_REQUEST_TIMEOUT": "2",
            "CXR_REQUEUE_INTERVAL": "3600",
            "CXR_LOG_LEVEL": "WARNING",
        }
    )
    log = open(work / "node.log", "wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "apps.cli", "node"],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_port(port, 120)
        rng = random.Random(SEED)
        bases = _bases(args.samples)
        contexts = {(str(b.SOPClassUID), str(b.file_meta.TransferSyntaxUID)) for b in bases}
        sender = _Sender(("127.0.0.1", port), contexts)
        path = work / "input.dcm"
        held: list[socket.socket] = []
        samples: list[tuple[int, float]] = [(0, _rss_mb(node.pid))]
        answered = tried = 0
        t0 = time.monotonic()
        print(f"node pid {node.pid}: rss {samples[0][1]:.0f} MB at start", flush=True)
        while answered < args.inputs and tried < 3 * args.inputs:
            tried += 1
            _, data = _mutate(rng, rng.choice(bases))
            path.write_bytes(data)
            if sender.send(path) is None:
                continue
            answered += 1
            if answered % args.batch == 0:
                for s in held:
                    s.close()
                held = _connection_faults(("127.0.0.1", port), rng)
                rss = _rss_mb(node.pid)
                samples.append((answered, rss))
                print(
                    f"{answered:6d} answered  rss {rss:6.1f} MB  "
                    f"({answered / (time.monotonic() - t0):.1f} inputs/s)",
                    flush=True,
                )
        sender.close()
        for s in held:
            s.close()
        if node.poll() is not None:
            raise RuntimeError(f"node exited with {node.returncode}")
    finally:
        node.terminate()
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
        log.close()
    warm = next(r for n, r in samples if n >= args.warmup)
    end = samples[-1][1]
    peak = max(r for _, r in samples)
    mid = samples[len(samples) // 2][1]
    first, second = mid - warm, end - mid
    print(
        f"rss: start {samples[0][1]:.0f} MB, after warm-up ({args.warmup}) {warm:.0f}, "
        f"middle {mid:.0f}, end {end:.0f}, peak {peak:.0f} MB over {answered} answered inputs"
    )
    print(
        f"ratios: rss end/warm-up {end / warm:.2f}, rss peak/warm-up {peak / warm:.2f}, "
        f"second half growth/first half growth {second / first if abs(first) > 0.5 else 0.0:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
