"""The delivery lane: a worker process's own queue and threads for sending results.

On 2 cores the forward pass cannot overlap with I/O inside one task, so the classify task
does not wait for the PACS: once the instance is ``classified`` (its results built, in
the spool and recorded by :func:`db.lifecycle.record_classification`) it hands the result
*datasets* to this lane and takes the next message, while a lane thread sends them (the
first delivery attempt; the spool copies are for retries and are not re-read here).

* **Bounded.** At most ``depth`` deliveries wait; :meth:`DeliveryLane.submit` blocks
  beyond that, so a slow PACS slows classification down instead of piling datasets up in
  memory.
* **Nothing is lost.** The lane only holds work whose instance is ``classified`` in the
  audit DB. If the process dies with deliveries in the lane, the re-queue sweep re-sends
  ``cxr.deliver_instance`` for every instance left ``classified`` for
  ``CXR_REQUEUE_STALE_AFTER`` s (:func:`db.lifecycle.requeue_undelivered`), which reads
  the spool copies. A clean stop drains the lane first (:meth:`DeliveryLane.drain`).
* **Where the outcome goes.** The job runs :func:`worker.tasks.deliver_first_attempt`,
  which maps every outcome the way ``cxr.deliver_instance`` does (retry scheduled, failed,
  delivered) in one place.

One lane per process (:func:`get_lane`), started on first use and forgotten in a forked
child.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One first delivery attempt: the instance and the datasets just built for it
    (``app``: the Celery app that queues a retry)."""

    instance_id: int
    datasets: dict[str, Dataset] = field(default_factory=dict)
    app: Any = None


Runner = Callable[[Job], None]


class DeliveryLane:
    """``threads`` daemon threads running ``run`` on the jobs :meth:`submit` queues."""

    def __init__(self, run: Runner, threads: int = 1, depth: int | None = None) -> None:
        if threads < 1:
            raise ValueError("a delivery lane needs at least one thread")
        self._run = run
        self._threads = threads
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=depth or 2 * threads)
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._pending = 0  # queued or running
        self._idle = threading.Condition(self._lock)

    def _start(self) -> None:
        for i in range(self._threads - len(self._workers)):
            t = threading.Thread(target=self._loop, name=f"cxr-delivery-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def submit(self, job: Job, timeout: float | None = None) -> bool:
        """Queue ``job``; blocks while the lane is full, at most ``timeout`` seconds. False
        when it was not queued (the caller delivers another way)."""
        with self._lock:
            self._workers = [t for t in self._workers if t.is_alive()]
            if len(self._workers) < self._threads:
                self._start()
            self._pending += 1
        queued = False
        try:
            self._queue.put(job, timeout=timeout)
            queued = True
        except queue.Full:
            return False
        finally:
            if not queued:  # timed out, or interrupted (a soft time limit)
                with self._lock:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()
        return True

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            except BaseException:  # the runner maps outcomes; this is a last guard
                log.exception("instance %d: delivery lane job raised", job.instance_id)
            finally:
                job.datasets.clear()
                with self._lock:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()

    @property
    def pending(self) -> int:
        """Deliveries queued or running now."""
        with self._lock:
            return self._pending

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued delivery has run; False when ``timeout`` passed first."""
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, timeout: float = 60.0) -> bool:
        """Drain, then end the threads (a clean stop), all within ``timeout`` seconds.
        True when all work was done; what is left is the sweep's (the threads are
        daemons and end with the process)."""
        deadline = time.monotonic() + timeout
        drained = self.drain(timeout)
        with self._lock:
            workers, self._workers = self._workers, []
        for _ in workers:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break
        for t in workers:
            t.join(max(0.0, deadline - time.monotonic()))
        return drained


_lane: DeliveryLane | None = None
_lane_lock = threading.Lock()


def get_lane(run: Runner, threads: int) -> DeliveryLane:
    """This process's lane (made on first use; ``run`` should not close over per-call
    state: the first caller's is kept)."""
    global _lane
    with _lane_lock:
        if _lane is None:
            _lane = DeliveryLane(run, threads)
        return _lane


def current_lane() -> DeliveryLane | None:
    return _lane


def _forget() -> None:  # a forked child has none of the parent's threads
    global _lane, _lane_lock
    _lane, _lane_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget)
