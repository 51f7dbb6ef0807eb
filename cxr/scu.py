"""The one C-STORE SCU loop, shared by ``cxr send`` (users) and result delivery (worker).

:func:`store_each` opens one association, sends every item over it and returns a neutral
:class:`StoreResult` per item, in order; it never raises for network or peer problems.
:class:`AssociationPool` does the same over associations kept open and reused for a
bounded idle time (result delivery).
What a result *means* is the caller's business: ``cxr send`` prints PS3.4 categories,
:mod:`worker.delivery` turns them into audit outcomes and retries.

A result is one of:

* ``kind="status"``: the peer answered; ``status`` is the DIMSE status (PS3.4 B.2.3,
  PS3.7 C), ``comment`` its Error Comment (0000,0902) when there was one;
* ``kind="unreachable"``: no association (connection refused or timed out, rejected,
  aborted, TLS set-up failed), the association was lost before this item, or no response
  came (DIMSE timeout, link lost);
* ``kind="not_accepted"``: the peer accepted no presentation context for the item's
  SOP class / transfer syntax (it refuses that kind of object);
* ``kind="local_error"``: the item could not be read or encoded here.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association

log = logging.getLogger(__name__)

T = TypeVar("T")
ResultKind = Literal["status", "unreachable", "not_accepted", "local_error"]


@dataclass(frozen=True)
class StoreResult:
    """What happened to one item sent over one association."""

    kind: ResultKind
    status: int | None = None  # the DIMSE status; only for kind="status"
    comment: str = ""  # the peer's Error Comment, or why there is no status (no PHI)
    elapsed_ms: float = 0.0


def _association_failure(assoc: object, connected: bool) -> str:
    """Why an association is not established, in a few words. pynetdicom marks a
    connection that never opened as aborted too: ``connected`` tells the two apart."""
    if not connected:
        return "no connection (refused or unreachable)"
    if getattr(assoc, "is_rejected", False):
        return "association rejected"
    if getattr(assoc, "is_aborted", False):
        return "association aborted"
    return "no association"


def _open(
    ae: AE, host: str, port: int, called_ae: str, tls_args: tuple[ssl.SSLContext, str] | None
) -> tuple[Association | None, str]:
    """An established association from ``ae``, or ``(None, why)``."""
    connected = threading.Event()
    try:
        assoc = ae.associate(
            host,
            port,
            ae_title=called_ae,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda _e: connected.set())],
        )
    except Exception as exc:  # TLS set-up errors, bad host names, ...
        why = f"association error: {type(exc).__name__}"
        log.warning("C-STORE to %s@%s:%d: %s", called_ae, host, port, why)
        return None, why
    if not assoc.is_established:
        why = _association_failure(assoc, connected.is_set())
        log.warning("C-STORE to %s@%s:%d: %s", called_ae, host, port, why)
        return None, why
    return assoc, ""


def _send_over(
    assoc: Association, items: Sequence[T], load: Callable[[T], Dataset]
) -> list[tuple[T, StoreResult]]:
    """C-STORE every item over an established association; one result per item."""
    results: list[tuple[T, StoreResult]] = []
    for it in items:
        if not assoc.is_established:
            results.append((it, StoreResult("unreachable", comment="association lost")))
            continue
        try:
            ds = load(it)
        except Exception as exc:  # unreadable file, bad pixel data, ...
            results.append(
                (it, StoreResult("local_error", comment=f"cannot read: {type(exc).__name__}"))
            )
            continue
        t1 = time.perf_counter()
        try:
            rsp = assoc.send_c_store(ds)
        except ValueError:
            # pynetdicom: no accepted presentation context for this SOP class / syntax
            results.append(
                (it, StoreResult("not_accepted", comment="SOP class not accepted by peer"))
            )
            continue
        except Exception as exc:  # encoding or socket errors while sending
            results.append(
                (it, StoreResult("unreachable", comment=f"send error: {type(exc).__name__}"))
            )
            continue
        ms = (time.perf_counter() - t1) * 1000.0
        status = rsp.get("Status") if rsp is not None else None
        if status is None:
            results.append(
                (it, StoreResult("unreachable", comment="no C-STORE response", elapsed_ms=ms))
            )
            continue
        comment = str(rsp.get("ErrorComment", "") or "")[:200]
        results.append((it, StoreResult("status", int(status), comment, ms)))
    return results


def store_each(
    ae: AE,
    host: str,
    port: int,
    called_ae: str,
    items: Sequence[T],
    load: Callable[[T], Dataset],
    tls_args: tuple[ssl.SSLContext, str] | None = None,
    on_done: Callable[[T, StoreResult], None] | None = None,
) -> list[tuple[T, StoreResult]]:
    """C-STORE every item over one new association from ``ae`` (requested contexts set by
    the caller), released at the end; ``load`` turns an item into the dataset to send
    (called just before sending, so large files are read one at a time)."""
    results: list[tuple[T, StoreResult]] = []

    def done(item: T, res: StoreResult) -> None:
        results.append((item, res))
        if on_done is not None:
            on_done(item, res)

    if not items:
        return results
    assoc, why = _open(ae, host, port, called_ae, tls_args)
    if assoc is None:
        for it in items:
            done(it, StoreResult("unreachable", comment=why))
        return results
    try:
        for it in items:
            ((_, res),) = _send_over(assoc, [it], load)
            done(it, res)
    finally:
        if assoc.is_established:
            assoc.release()
    return results


@dataclass
class _Idle:
    assoc: Association
    since: float  # time.monotonic() when it was given back


class AssociationPool:
    """Associations kept open per peer and reused across calls (result delivery: one per
    destination instead of one per instance), each released after ``idle_seconds``
    without a call.

    * A call borrows an idle association for its ``key`` (or opens one) and gives it back
      when the call ends with the association still established; calls in parallel
      borrow different associations, and at most ``max_idle`` per key are kept.
    * An association that expired, or that the peer closed while it was idle, is never
      used: an expired one is released by the reaper thread; a closed one is found when
      a call on it fails before any item was answered, and that call is repeated once on
      a new association (so reuse adds no failures the peer did not cause).
    * ``key`` must name everything the association was negotiated with (peer address,
      AE titles, the requested contexts, TLS): associations are only reused for the same
      key.
    * After ``os.fork`` the child starts with an empty pool (the parent's associations
      and their threads are not the child's)."""

    def __init__(self, idle_seconds: float, max_idle: int = 2) -> None:
        if idle_seconds <= 0:
            raise ValueError("idle_seconds must be > 0 (no pool: use store_each)")
        self.idle_seconds = float(idle_seconds)
        self.max_idle = max(1, int(max_idle))
        self._lock = threading.Lock()
        self._idle: dict[Hashable, list[_Idle]] = {}
        self._reaper: threading.Thread | None = None
        self._stop = threading.Event()
        self.opened = 0  # associations opened (for tests and the benchmark)
        self.reused = 0  # calls served by an association that was already open
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._idle = {}
        self._reaper = None
        self._stop = threading.Event()

    def _borrow(self, key: Hashable) -> Association | None:
        now = time.monotonic()
        stale: list[Association] = []
        found = None
        with self._lock:
            stack = self._idle.get(key, [])
            while stack:
                entry = stack.pop()
                if entry.assoc.is_established and now - entry.since < self.idle_seconds:
                    found = entry.assoc
                    break
                stale.append(entry.assoc)
        for assoc in stale:  # outside the lock: a release may wait for the peer
            _close_quietly(assoc)
        return found

    def _give_back(self, key: Hashable, assoc: Association) -> None:
        if not assoc.is_established:
            return
        with self._lock:
            stack = self._idle.setdefault(key, [])
            if len(stack) >= self.max_idle:
                extra = assoc
            else:
                stack.append(_Idle(assoc, time.monotonic()))
                extra = None
            if self._reaper is None or not self._reaper.is_alive():
                self._reaper = threading.Thread(
                    target=self._reap, name="cxr-assoc-reaper", daemon=True
                )
                self._reaper.start()
        if extra is not None:
            _close_quietly(extra)

    def _reap(self) -> None:
        period = max(0.05, min(self.idle_seconds / 4, 5.0))
        while not self._stop.wait(period):
            now = time.monotonic()
            expired: list[Association] = []
            with self._lock:
                for stack in self._idle.values():
                    keep = [e for e in stack if now - e.since < self.idle_seconds]
                    expired += [e.assoc for e in stack if now - e.since >= self.idle_seconds]
                    stack[:] = keep
                done = not any(self._idle.values())
                if done:
                    self._reaper = None
            for assoc in expired:
                _close_quietly(assoc)
            if done:
                return

    def idle_count(self, key: Hashable | None = None) -> int:
        """Associations open and idle now (for ``key``, or in all)."""
        with self._lock:
            if key is not None:
                return len(self._idle.get(key, []))
            return sum(len(v) for v in self._idle.values())

    def close_all(self) -> None:
        """Release every idle association now (a clean stop)."""
        with self._lock:
            entries = [e for stack in self._idle.values() for e in stack]
            self._idle = {}
        for e in entries:
            _close_quietly(e.assoc)

    def store_each(
        self,
        key: Hashable,
        ae: AE,
        host: str,
        port: int,
        called_ae: str,
        items: Sequence[T],
        load: Callable[[T], Dataset],
        tls_args: tuple[ssl.SSLContext, str] | None = None,
    ) -> list[tuple[T, StoreResult]]:
        """Like :func:`store_each`, over a pooled association for ``key`` (``ae`` opens a
        new one when none is idle)."""
        if not items:
            return []
        assoc = self._borrow(key)
        if assoc is not None:
            results = _send_over(assoc, items, load)
            if not _lost_before_sending(results[0][1]):
                with self._lock:
                    self.reused += 1
                self._settle(key, assoc, results)
                return results
            # the peer closed it while it was idle, before our side noticed: the first
            # item never went out, so the call is repeated once on a new association
            log.info(
                "C-STORE to %s@%s:%d: pooled association unusable, reopening", called_ae, host, port
            )
            _close_quietly(assoc)
        assoc, why = _open(ae, host, port, called_ae, tls_args)
        if assoc is None:
            return [(it, StoreResult("unreachable", comment=why)) for it in items]
        with self._lock:
            self.opened += 1
        results = _send_over(assoc, items, load)
        self._settle(key, assoc, results)
        return results

    def _settle(
        self, key: Hashable, assoc: Association, results: Sequence[tuple[Any, StoreResult]]
    ) -> None:
        """Back to the pool, unless an item went unanswered: a late response could
        otherwise be read as the next instance's status."""
        if any(r.kind == "unreachable" for _, r in results):
            _close_quietly(assoc)
        else:
            self._give_back(key, assoc)


_NOT_SENT = ("association lost", "send error:")


def _lost_before_sending(res: StoreResult) -> bool:
    """The item never reached the peer: the association was gone, or the socket failed
    as the request was written. Not a DIMSE timeout (the peer may hold the object)."""
    return res.kind == "unreachable" and res.comment.startswith(_NOT_SENT)


def _close_quietly(assoc: Association) -> None:
    try:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    except Exception as exc:  # pragma: no cover - a socket already gone
        log.debug("closing an association: %s", type(exc).__name__)
