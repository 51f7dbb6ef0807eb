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
  audit DB, with the lane's :attr:`DeliveryLane.owner` in ``claimed_by``. While its
  process lives the lane renews a lease of that name (``heartbeat``, every
  ``heartbeat_every`` s). If the process dies with deliveries in the lane (the classify
  task was acked already, so the broker will not redeliver it), the lease lapses and the
  re-queue sweep re-sends ``cxr.deliver_instance`` for those instances at once
  (:func:`db.lifecycle.requeue_undelivered`), which reads the spool copies. A clean stop
  drains the lane first (:meth:`DeliveryLane.stop`) and gives the lease up.
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
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset

from cxr.contracts import LANE_OWNER_PREFIX

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One first delivery attempt: the instance and the datasets just built for it
    (``app``: the Celery app that queues a retry; ``owner``: the lane owner id recorded
    with the instance, released when the attempt is over)."""

    instance_id: int
    datasets: dict[str, Dataset] = field(default_factory=dict)
    app: Any = None
    owner: str | None = None


Runner = Callable[[Job], None]
#: renews (or, with ``False``, gives up) the lane's lease named by its owner id
Heartbeat = Callable[[str, bool], None]


def new_owner_id() -> str:
    """``lane:<host>:<pid>:<random>``, at most 64 characters: unique per process and
    start, so a reused pid or a restarted container never inherits a dead lane's work."""
    host = socket.gethostname()[:32] or "host"
    return f"{LANE_OWNER_PREFIX}{host}:{os.getpid()}:{secrets.token_hex(4)}"


class DeliveryLane:
    """``threads`` daemon threads running ``run`` on the jobs :meth:`submit` queues; with a
    ``heartbeat``, one more thread that renews the lane's lease every ``heartbeat_every``
    seconds while the lane is started."""

    def __init__(
        self,
        run: Runner,
        threads: int = 1,
        depth: int | None = None,
        heartbeat: Heartbeat | None = None,
        heartbeat_every: float = 30.0,
    ) -> None:
        if threads < 1:
            raise ValueError("a delivery lane needs at least one thread")
        self._run = run
        self._threads = threads
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=depth or 2 * threads)
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._pending = 0  # queued or running
        self._idle = threading.Condition(self._lock)
        self.owner = new_owner_id()
        self._heartbeat = heartbeat
        self._heartbeat_every = heartbeat_every
        self._beating: threading.Thread | None = None
        self._beat_lock = threading.Lock()
        self._stopped = threading.Event()
        self._leased = False  # the last heartbeat succeeded

    def start(self) -> str | None:
        """Start the threads (idempotent). Returns the owner id to record with the work
        handed to this lane, or None when the lane holds no live lease (no heartbeat, or
        the last renewal failed): then the sweep's age rule alone covers that work."""
        with self._lock:
            self._workers = [t for t in self._workers if t.is_alive()]
            if len(self._workers) < self._threads:
                self._start()
        if self._heartbeat is not None:
            with self._beat_lock:  # not the queue's lock: this may wait for the DB
                if self._beating is None or not self._beating.is_alive():
                    self._stopped.clear()
                    self._beat()  # the lease exists before any work names it
                    self._beating = threading.Thread(
                        target=self._beat_loop, name="cxr-delivery-heartbeat", daemon=True
                    )
                    self._beating.start()
        return self.owner if self._leased else None

    def _beat(self, renew: bool = True) -> None:
        assert self._heartbeat is not None
        try:
            self._heartbeat(self.owner, renew)
            self._leased = renew
        except Exception as exc:  # the DB is down: the lease may lapse, the work is safe
            self._leased = False
            log.warning("delivery lane: lease not renewed (%s)", type(exc).__name__)

    def _beat_loop(self) -> None:
        while not self._stopped.wait(self._heartbeat_every):
            self._beat()

    def _start(self) -> None:
        for i in range(self._threads - len(self._workers)):
            t = threading.Thread(target=self._loop, name=f"cxr-delivery-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def submit(self, job: Job, timeout: float | None = None) -> bool:
        """Queue ``job``; blocks while the lane is full, at most ``timeout`` seconds. False
        when it was not queued (the caller delivers another way)."""
        self.start()
        with self._lock:
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
        """Drain, then end the threads (a clean stop), all within ``timeout`` seconds, and
        give the lease up. True when all work was done; what is left is the sweep's at
        once (the lease is gone; the threads are daemons and end with the process)."""
        deadline = time.monotonic() + timeout
        drained = self.drain(timeout)
        with self._lock:
            workers, self._workers = self._workers, []
        with self._beat_lock:
            beating, self._beating = self._beating, None
        for _ in workers:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break
        for t in workers:
            t.join(max(0.0, deadline - time.monotonic()))
        if beating is not None:
            self._stopped.set()
            beating.join(max(0.0, deadline - time.monotonic()))
            self._beat(renew=False)
        return drained


_lane: DeliveryLane | None = None
_lane_lock = threading.Lock()


def get_lane(
    run: Runner,
    threads: int,
    heartbeat: Heartbeat | None = None,
    heartbeat_every: float = 30.0,
) -> DeliveryLane:
    """This process's lane (made on first use; ``run`` and ``heartbeat`` should not close
    over per-call state: the first caller's are kept)."""
    global _lane
    with _lane_lock:
        if _lane is None:
            _lane = DeliveryLane(run, threads, heartbeat=heartbeat, heartbeat_every=heartbeat_every)
        return _lane


def current_lane() -> DeliveryLane | None:
    return _lane


def close_lane(timeout: float = 60.0) -> bool:
    """Stop this process's lane (:meth:`DeliveryLane.stop`: drain, end the threads, give
    the lease up) and forget it; the next :func:`get_lane` makes a new one. True when
    nothing was left undone (also when there was no lane)."""
    global _lane
    with _lane_lock:
        lane, _lane = _lane, None
    return True if lane is None else lane.stop(timeout)


def _forget() -> None:  # a forked child has none of the parent's threads
    global _lane, _lane_lock
    _lane, _lane_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget)
