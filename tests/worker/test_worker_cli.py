"""`cxr worker` as a process: a SIGTERM during the model warm-up (before Celery has its
own signal handlers) is a clean stop: exit 0, the warm-up process gone, a log line."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.ship.conftest import child_pids, pid_alive
from tests.worker.conftest import Proc, wait_for


def test_sigterm_during_model_warm_up_is_a_clean_stop(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = dict(os.environ)
    env.update(
        {
            "CXR_DATABASE_URL": f"sqlite:///{tmp_path / 'audit.db'}",
            "CXR_SPOOL_DIR": str(tmp_path / "spool"),
            "CXR_MODEL_DIR": str(tiny_model_dir),
            # an empty export cache: the warm-up has to import TensorFlow and export the
            # model, which leaves seconds to catch it in the act
            "CXR_MODEL_CACHE_DIR": str(tmp_path / "empty-cache"),
            "CXR_METRICS_PORT": "0",
            "CXR_BROKER_URL": "",
            "CXR_LOG_LEVEL": "INFO",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    w = Proc("worker", ["worker", "--no-sweep"], env, tmp_path / "worker.log")
    try:
        warm: list[int] = []

        def warm_up_running() -> bool:
            assert w.alive(), w.log()[-3000:]
            for pid in child_pids(w.p.pid):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:  # gone meanwhile
                    continue
                if b"-c" in cmd and any(b"get_classifier" in part for part in cmd):
                    warm.append(pid)
                    return True
            return False

        wait_for(warm_up_running, 120, interval=0.05, what="the model warm-up subprocess")
        assert " ready." not in w.log()  # still warming up: Celery has not started
        os.kill(w.p.pid, signal.SIGTERM)  # the main process only, as a service manager does
        assert w.p.wait(60) == 0, w.log()[-3000:]
        deadline = time.monotonic() + 10
        while pid_alive(warm[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(warm[0]), "the warm-up process was left running"
        assert "received SIGTERM during model warm-up: stopped" in w.log()
    finally:
        w.stop()
