"""The one C-STORE SCU loop, shared by ``cxr send`` (users) and result delivery (worker).

:func:`store_each` opens one association, sends every item over it and returns a neutral
:class:`StoreResult` per item, in order; it never raises for network or peer problems.
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
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from pydicom import Dataset
from pynetdicom import AE, evt

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
    """C-STORE every item over one association from ``ae`` (requested contexts set by the
    caller); ``load`` turns an item into the dataset to send (called just before sending,
    so large files are read one at a time)."""
    results: list[tuple[T, StoreResult]] = []

    def done(item: T, res: StoreResult) -> None:
        results.append((item, res))
        if on_done is not None:
            on_done(item, res)

    if not items:
        return results
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
        for it in items:
            done(it, StoreResult("unreachable", comment=why))
        return results
    if not assoc.is_established:
        why = _association_failure(assoc, connected.is_set())
        log.warning("C-STORE to %s@%s:%d: %s", called_ae, host, port, why)
        for it in items:
            done(it, StoreResult("unreachable", comment=why))
        return results
    try:
        for it in items:
            if not assoc.is_established:
                done(it, StoreResult("unreachable", comment="association lost"))
                continue
            try:
                ds = load(it)
            except Exception as exc:  # unreadable file, bad pixel data, ...
                done(it, StoreResult("local_error", comment=f"cannot read: {type(exc).__name__}"))
                continue
            t1 = time.perf_counter()
            try:
                rsp = assoc.send_c_store(ds)
            except ValueError:
                # pynetdicom: no accepted presentation context for this SOP class / syntax
                done(it, StoreResult("not_accepted", comment="SOP class not accepted by peer"))
                continue
            except Exception as exc:  # encoding or socket errors while sending
                done(it, StoreResult("unreachable", comment=f"send error: {type(exc).__name__}"))
                continue
            ms = (time.perf_counter() - t1) * 1000.0
            status = rsp.get("Status") if rsp is not None else None
            if status is None:
                done(it, StoreResult("unreachable", comment="no C-STORE response", elapsed_ms=ms))
                continue
            comment = str(rsp.get("ErrorComment", "") or "")[:200]
            done(it, StoreResult("status", int(status), comment, ms))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
