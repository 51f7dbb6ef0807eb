"""The DICOM Storage SCP: association policy, C-ECHO, C-STORE, audit and hand-off to the queue.

Public API::

    node = StorageNode(settings)        # settings: cxr.settings.Settings
    node.start(block=False)             # bind, serve in background threads
    node.address                        # (host, port) actually bound
    node.flush(timeout)                 # wait until queued hand-offs are done (tests/benchmarks)
    node.sweep(received_older_than=5)   # one re-queue sweep now (under the sweep lease)
    node.stop(timeout=None)             # stop accepting, let associations finish, stop threads

A C-STORE answers Success only after the encoded data set is durable in the spool
(tmp + fsync + atomic rename) and its audit row is committed. With CXR_RECEIVE_CHUNKED (the
default) the data set is written to the spool's tmp/ while it arrives
(:mod:`dicom_node.chunked`) and the handler fsyncs and renames that file. The instance is handed to the
broker afterwards by a dispatcher thread; if the broker is down it stays ``received`` and the
periodic re-queue sweep sends it later. No inference runs in the node.

The node owns the re-queue sweep (stranded/stale instances, due delivery retries,
undelivered results): :func:`db.lifecycle.sweep` says why, and how its lease keeps a
second sweeper (another node, ``cxr worker --sweep``) from re-sending the same instances.
Every audit row is written by :mod:`db.lifecycle`; the node holds no SQL.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import re
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta

from cxr import metrics
from cxr.contracts import hash_patient_id, send_classify, send_deliver
from cxr.logconfig import PEER_NOISE, register_dataset_phi, scrub
from cxr.settings import DEFAULT_PATIENT_ID_SALT, Settings
from cxr.storage import Spool, content_sha256
from db import lifecycle
from dicom_node import chunked, filters
from dicom_node.status import (
    SUCCESS,
    CannotUnderstand,
    DoesNotMatchSOPClass,
    OutOfResources,
    StoreRefused,
    dimse_status,
    reading_data_set,
    status_hex,
    status_name,
)
from dicom_node.syntaxes import supported_contexts

if TYPE_CHECKING:  # pragma: no cover
    from celery import Celery

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ parameters, PS3.8 Section 9.3.4 (result, source, diagnostic)
RJ_PERMANENT, RJ_TRANSIENT = 0x01, 0x02
RJ_SOURCE_USER, RJ_SOURCE_PRESENTATION = 0x01, 0x03
RJ_CALLING_AE_NOT_RECOGNISED = 0x03
RJ_CALLED_AE_NOT_RECOGNISED = 0x07
RJ_LOCAL_LIMIT_EXCEEDED = 0x02

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PRINTABLE_UID = re.compile(r"[\x21-\x7e]+")  # lenient: real UIDs with e.g. leading zeros pass
JUNK_CONNECTION_HEADROOM = 500
#: the largest P-DATA PDU we accept with the chunked receive: a PDU is read whole into
#: memory before its fragment is written, so an unlimited one would leave nothing to stream
CHUNKED_MAX_PDU = 1 << 20
DISPATCH_BATCH = 64
_STOP = object()


def encoded_parts(event: Any) -> tuple[bytes, memoryview]:
    """``event.encoded_dataset()`` as two chunks, without joining (copying) them: the
    preamble + 'DICM' + file meta, and a zero-copy view of the data set exactly as received.
    ``b"".join(encoded_parts(e)) == e.encoded_dataset()``. Release the view when done."""
    stream = event.request.DataSet
    if stream is None:
        raise CannotUnderstand("C-STORE request without a data set", "no_dataset")
    if not isinstance(stream, io.BytesIO):  # pragma: no cover - chunked-to-file mode
        data = event.encoded_dataset()
        return b"", memoryview(data)
    head = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(event.file_meta)))
    return head, stream.getbuffer()


@dataclass
class Received:
    """One C-STORE data set as received. ``head + body`` is the Part 10 stream the spool
    stores: preamble, 'DICM', file meta, the data set exactly as received. In memory (the
    data set was buffered by pynetdicom): ``head`` is the preamble + file meta and ``body`` a
    view of the data set. Chunked: ``rx`` is the file it arrived in, ``head`` is empty and
    ``body`` a read-only map of the whole file (empty when over CXR_MAX_INSTANCE_BYTES)."""

    head: bytes
    body: memoryview
    size: int
    rx: chunked.RxFile | None = None

    def sha256(self) -> str:
        if self.rx is not None:
            return self.rx.sha256  # hashed while it arrived
        return content_sha256((self.head, self.body))


@contextlib.contextmanager
def received(event: Any) -> Iterator[Received]:
    """The data set of a C-STORE event, for the time of the handler. A chunked file that
    was not adopted into the spool is deleted at the end, whatever happened."""
    rx = chunked.rx_file(event.request)
    if rx is None:
        head, body = encoded_parts(event)
        try:
            yield Received(head, body, len(head) + len(body))
        finally:
            body.release()
        return
    mm = None
    try:
        rx.finish()
        if rx.overflow:
            body = memoryview(b"")
        else:
            mm = rx.map()
            body = memoryview(mm)
        try:
            yield Received(b"", body, rx.size, rx)
        finally:
            body.release()
    finally:
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still held (a traceback): the GC unmaps it
                pass
        rx.close()
        if rx.owned:  # not adopted into the spool
            rx.discard()


@dataclass
class _AssocState:
    """Per-association bookkeeping (an association serves one DIMSE message at a time)."""

    db_id: int | None
    calling_ae: str
    called_ae: str
    host: str | None
    port: int | None
    counts: Counter[str] = field(default_factory=Counter)
    current: dict[str, Any] = field(default_factory=dict)  # the C-STORE being handled
    rejected: bool = False


class StorageNode:
    """A pynetdicom Storage SCP wired to the spool, the audit DB and the queue."""

    def __init__(
        self,
        settings: Settings,
        celery_app: Celery | None = None,
        *,
        init_database: bool = True,
        sweep: bool = True,
        metrics_server: bool = True,
    ) -> None:
        self.settings = settings
        self.rules = filters.FilterRules.from_settings(settings)
        self.spool = Spool(settings.spool_dir)
        self._celery_app = celery_app
        self._init_database = init_database
        self._sweep_enabled = sweep
        self._metrics_enabled = metrics_server
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.supported_contexts = supported_contexts()
        # pynetdicom's own limit also counts connections that have not (yet) sent an
        # A-ASSOCIATE-RQ (garbage, port scans: they hold a thread until the ACSE timeout), so
        # it is only a backstop with headroom; CXR_MAX_ASSOCIATIONS is enforced on requested
        # associations in handle_requested, where the rejection is also recorded.
        self.ae.maximum_associations = settings.max_associations + JUNK_CONNECTION_HEADROOM
        self.ae.acse_timeout = settings.acse_timeout
        self.ae.dimse_timeout = settings.dimse_timeout
        self.ae.network_timeout = settings.network_timeout
        self.ae.maximum_pdu_size = 0  # no limit on what we receive per P-DATA PDU
        self.server: Any = None
        self._dispatch_q: queue.Queue[object] = queue.Queue()
        self._dispatch_thread: threading.Thread | None = None
        self._sweep_thread: threading.Thread | None = None
        # who holds the sweep lease (leases.holder): this node object in this process
        self._swept = False
        self.sweep_holder = f"node@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # C-STORE handlers running now: thread id -> start (monotonic), for /healthz
        self._handlers: dict[int, float] = {}
        self._handlers_lock = threading.Lock()
        self._stopping = threading.Event()
        self._metrics_http: Any = None
        self._pending = 0
        self._pending_cv = threading.Condition()
        self._assoc_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    @property
    def celery_app(self) -> Celery:
        if self._celery_app is None:
            from cxr.celery_app import make_celery  # a broker connection only when needed

            self._celery_app = make_celery(self.settings)
        return self._celery_app

    @celery_app.setter
    def celery_app(self, app: Celery) -> None:
        self._celery_app = app

    @property
    def address(self) -> tuple[str, int]:
        if self.server is None:
            raise RuntimeError("node not started")
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not s.tls_enabled:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(s.tls_cert), str(s.tls_key))
        if s.tls_ca is not None:
            ctx.load_verify_locations(cafile=str(s.tls_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def start(self, block: bool = False) -> None:
        """Bind and serve. ``block=True`` serves until :meth:`stop` (from another thread or a
        signal handler) and then returns after the shutdown completed."""
        import pydicom.config

        # value-validation warnings would quote raw element values (possibly PHI) in logs
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        s = self.settings
        if self._init_database:
            lifecycle.prepare_database(s.database_url)
        self.spool.clean_tmp()
        if s.receive_chunked and chunked.enable(self.ae, self.spool, s.max_instance_bytes):
            self.ae.maximum_pdu_size = CHUNKED_MAX_PDU
        else:
            chunked.disable(self.ae)
            self.ae.maximum_pdu_size = 0
        if not s.allowed_calling_aets:
            log.warning(
                "CXR_ALLOWED_CALLING_AETS is empty: associations from ANY calling AE are accepted"
            )
        if s.patient_id_storage == "hash" and s.patient_id_salt == DEFAULT_PATIENT_ID_SALT:
            log.warning(
                "CXR_PATIENT_ID_SALT is the public default: set a secret per site, or stored "
                "PatientID hashes can be reversed by trying candidate IDs"
            )
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self.handle_connection),
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_ESTABLISHED, self.handle_established),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_CONN_CLOSE, self.handle_closed),
        ]
        self._stopping.clear()
        self._dispatch_thread = threading.Thread(
            target=self._dispatch_loop, name="cxr-dispatch", daemon=True
        )
        self._dispatch_thread.start()
        try:
            self.server = self.ae.start_server(
                (s.dicom_host, s.dicom_port),
                block=False,
                evt_handlers=handlers,
                ssl_context=self.ssl_context(),
            )
        except BaseException:
            self._dispatch_q.put(_STOP)
            raise
        if self.server.ssl_context is not None:
            self.server.get_request = self._tls_get_request
        if self._sweep_enabled:
            self._sweep_thread = threading.Thread(
                target=self._sweep_loop, name="cxr-requeue-sweep", daemon=True
            )
            self._sweep_thread.start()
        if self._metrics_enabled and s.metrics_port:
            try:
                self._metrics_http = metrics.start_metrics_server(s.metrics_host, s.metrics_port)
            except OSError as exc:  # the SCP matters more than its metrics
                log.error(
                    "metrics endpoint %s:%d unavailable (%s); the node runs without it",
                    s.metrics_host,
                    s.metrics_port,
                    exc,
                )
            from cxr.health import register_health_check

            register_health_check("scp", self.scp_healthy)
        host, port = self.address
        log.info(
            "listening on %s@%s:%d%s", s.ae_title, host, port, " (TLS)" if s.tls_enabled else ""
        )
        if block:
            self._stopping.wait()
            self._shutdown_rest()

    def request_stop(self) -> None:
        """Ask a blocking :meth:`start` to shut down (safe from a signal handler)."""
        self._stopping.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, wait (up to ``timeout``, default DIMSE timeout) for associations in
        flight to finish, drain the hand-off queue, stop the sweep."""
        self._stopping.set()
        self._shutdown_rest(timeout)

    def _shutdown_rest(self, timeout: float | None = None) -> None:
        if self.server is None:
            return
        server, self.server = self.server, None
        server.shutdown()  # stops accepting; running associations keep their sockets
        wait = timeout if timeout is not None else self.settings.dimse_timeout
        deadline = time.monotonic() + wait

        def in_flight() -> list[Any]:  # requested, not rejected (junk connections hold nothing)
            return [
                a
                for a in server.active_associations
                if a.is_alive()
                and getattr(a, "_cxr_state", None) is not None
                and not a._cxr_state.rejected
            ]

        while in_flight():
            if time.monotonic() > deadline:
                log.warning("aborting associations still open at shutdown")
                for a in in_flight():
                    a.abort()
                break
            time.sleep(0.05)
        self._dispatch_q.put(_STOP)
        if self._dispatch_thread is not None:
            self._dispatch_thread.join(timeout=30)
        if self._sweep_thread is not None:
            self._sweep_thread.join(timeout=30)
            self._sweep_thread = None
        if self._swept:
            self._swept = False
            try:  # a clean stop: the next sweeper need not wait for the lease to expire
                lifecycle.release_lease(
                    self.settings.database_url, lifecycle.SWEEP_LEASE, self.sweep_holder
                )
            except Exception as exc:
                log.warning("could not release the sweep lease (%s)", type(exc).__name__)
        if self._metrics_enabled and self.settings.metrics_port:
            from cxr.health import unregister_health_check

            unregister_health_check("scp")
        if self._metrics_http is not None:
            try:
                self._metrics_http.shutdown()
                self._metrics_http.server_close()
            except Exception:  # pragma: no cover
                pass
            self._metrics_http = None
        log.info("node stopped")

    # ------------------------------------------------------------------ queue hand-off
    def _dispatch(self, instance_id: int) -> None:
        with self._pending_cv:
            self._pending += 1
        self._dispatch_q.put(instance_id)

    def _dispatch_loop(self) -> None:
        """Hand stored instances to the broker, in batches of whatever is waiting: one
        publish per instance, one audit transaction per batch (received -> queued)."""
        while True:
            item = self._dispatch_q.get()
            batch: list[int] = []
            stop = item is _STOP
            if not stop:
                batch.append(int(item))  # type: ignore[call-overload]
            while len(batch) < DISPATCH_BATCH:
                try:
                    more = self._dispatch_q.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                batch.append(int(more))  # type: ignore[call-overload]
            try:
                if batch:
                    self._hand_off(batch)
            except Exception as exc:  # the sweep will retry
                log.warning("hand-off of %d instance(s) failed: %s", len(batch), type(exc).__name__)
            finally:
                with self._pending_cv:
                    self._pending -= len(batch)
                    self._pending_cv.notify_all()
            if stop:
                return

    def _send(self, instance_id: int) -> None:
        send_classify(self.celery_app, instance_id)

    def _hand_off(self, ids: list[int]) -> None:
        lifecycle.hand_off(self.settings.database_url, ids, self._send)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every hand-off so far was attempted. True when done in time."""
        with self._pending_cv:
            return self._pending_cv.wait_for(lambda: self._pending == 0, timeout)

    def _send_deliver(self, instance_id: int, attempt: int | None) -> None:
        send_deliver(self.celery_app, instance_id, attempt)

    def sweep(self, received_older_than: float = 5.0) -> int:
        """One re-queue sweep now (:func:`db.lifecycle.sweep`, under its lease; it also
        sets the ``cxr_queue_depth`` gauge). Returns how many tasks it sent (0 also when
        another process holds the lease)."""
        self._swept = True  # released at stop
        return lifecycle.sweep(
            self.settings,
            self._send,
            self._send_deliver,
            holder=self.sweep_holder,
            received_older_than=received_older_than,
        ).sent

    def _sweep_loop(self) -> None:
        first = True
        while first or not self._stopping.wait(self.settings.requeue_interval):
            first = False
            try:
                self.sweep()
            except Exception as exc:
                log.warning("re-queue sweep failed: %s", type(exc).__name__)

    # ------------------------------------------------------------------ association policy
    def _state(self, assoc: Any) -> _AssocState:
        st = getattr(assoc, "_cxr_state", None)
        if st is None:  # an event before EVT_REQUESTED: should not happen
            st = _AssocState(None, "", "", None, None)
            assoc._cxr_state = st
        return st

    def _rejection(self, assoc: Any, st: _AssocState) -> tuple[str, tuple[int, int, int]] | None:
        s = self.settings
        if st.called_ae != s.ae_title:
            return (
                f"called AE {st.called_ae!r} is not {s.ae_title!r}",
                (RJ_PERMANENT, RJ_SOURCE_USER, RJ_CALLED_AE_NOT_RECOGNISED),
            )
        if s.allowed_calling_aets and not any(
            p.matches(st.calling_ae, st.host) for p in s.allowed_calling_aets
        ):
            return (
                f"calling AE {st.calling_ae!r} from {st.host} is not allowed",
                (RJ_PERMANENT, RJ_SOURCE_USER, RJ_CALLING_AE_NOT_RECOGNISED),
            )
        active = [
            a
            for a in assoc.ae.active_associations
            if a is not assoc
            and a.is_acceptor
            and getattr(a, "_cxr_state", None) is not None
            and not a._cxr_state.rejected
            and not a.is_released
            and not a.is_aborted
        ]
        if len(active) >= s.max_associations:
            return (
                f"too many associations ({len(active)} open, limit {s.max_associations})",
                (RJ_TRANSIENT, RJ_SOURCE_PRESENTATION, RJ_LOCAL_LIMIT_EXCEEDED),
            )
        return None

    def handle_connection(self, event: Any) -> None:
        """A TCP connection: it has CXR_REQUEST_TIMEOUT (not the ACSE timeout) to send its
        A-ASSOCIATE-RQ, so idle or half-open connections (port scans, stuck peers) free
        their slot quickly and cannot lock real peers out."""
        dul = getattr(event.assoc, "dul", None)
        if dul is not None:
            dul.artim_timer.timeout = self.settings.request_timeout

    def handle_requested(self, event: Any) -> None:
        assoc = event.assoc
        # the request arrived: ARTIM (used again after a rejection) is the ACSE timeout
        assoc.dul.artim_timer.timeout = self.settings.acse_timeout
        rq = assoc.requestor
        called = str(rq.primitive.called_ae_title or "").strip()
        st = _AssocState(
            None,
            str(rq.primitive.calling_ae_title or "").replace("\x00", "").strip(),
            called.replace("\x00", ""),
            rq.address,
            rq.port,
        )
        with self._assoc_lock:
            rejection = self._rejection(assoc, st)
            st.rejected = rejection is not None
            assoc._cxr_state = st
        try:
            st.db_id = lifecycle.open_association(
                self.settings.database_url,
                calling_ae=st.calling_ae,
                called_ae=st.called_ae,
                peer_host=st.host,
                peer_port=st.port,
                tls=self.settings.tls_enabled,
                rejected=rejection[0] if rejection else None,
            )
        except Exception as exc:
            log.warning("could not record association (%s)", type(exc).__name__)
        if rejection:
            metrics.ASSOCIATIONS.labels(outcome="rejected").inc()
            log.warning("association rejected: %s", rejection[0])
            assoc.acse.send_reject(*rejection[1])
            # as pynetdicom's own rejection path does: wait until the DUL has sent the
            # A-ASSOCIATE-RJ and the peer closed (or ARTIM expired) before the acceptor
            # shuts the socket; closing at once reached the peer as an A-ABORT
            assoc.kill()

    def handle_established(self, event: Any) -> None:
        metrics.ASSOCIATIONS.labels(outcome="accepted").inc()
        metrics.ACTIVE_ASSOCIATIONS.inc()
        st = self._state(event.assoc)
        st.counts["_established"] = 1
        log.info("association %s accepted from %s (%s)", st.db_id, st.calling_ae, st.host)

    def handle_closed(self, event: Any) -> None:
        PEER_NOISE.connection_closed(threading.get_ident())
        assoc = event.assoc
        try:  # data set files no handler will take (cut off by an abort, never served)
            chunked.discard_unclaimed(assoc)
        except Exception as exc:  # pragma: no cover - clean_tmp at start-up is the backstop
            log.warning("could not remove a partial data set file (%s)", type(exc).__name__)
        st = getattr(assoc, "_cxr_state", None)
        if st is None or st.rejected:
            return
        if st.counts.get("_established"):
            metrics.ACTIVE_ASSOCIATIONS.dec()
        if assoc.is_released:
            outcome = "released"
        elif assoc.is_aborted:
            outcome = "aborted"
        elif st.counts.get("_established"):
            outcome = "closed"
        else:
            outcome = "failed"
        reason = None
        try:
            rejected_cx = sorted(
                {str(cx.abstract_syntax) for cx in assoc.rejected_contexts if cx.abstract_syntax}
            )
        except Exception:  # pragma: no cover - negotiation never happened
            rejected_cx = []
        if rejected_cx:
            reason = "rejected presentation contexts (SOP class or transfer syntax not supported): "
            reason += ", ".join(rejected_cx)
            log.info("association %s: %s", st.db_id, reason)
        if st.db_id is None:
            return
        try:
            lifecycle.close_association(
                self.settings.database_url,
                st.db_id,
                outcome=outcome,
                reason=reason,
                counts={k: v for k, v in st.counts.items() if not k.startswith("_")},
            )
        except Exception as exc:
            log.warning("could not close association %s record (%s)", st.db_id, type(exc).__name__)
        log.info(
            "association %s %s: stored=%d ignored=%d duplicate=%d refused=%d",
            st.db_id,
            outcome,
            st.counts["stored"],
            st.counts["ignored"],
            st.counts["duplicate"],
            st.counts["refused"],
        )

    # ------------------------------------------------------------------ TLS
    def _tls_get_request(self) -> tuple[Any, tuple[str, int]]:
        """pynetdicom's ``AssociationServer.get_request`` with a bounded handshake and a
        record of its failure: socketserver drops an ``OSError`` from here silently, so a
        peer whose TLS handshake failed used to leave no audit row and no log line."""
        server = self.server
        assert server is not None and server.socket is not None
        sock, address = server.socket.accept()
        try:
            sock.settimeout(self.settings.request_timeout)
            tls = server.ssl_context.wrap_socket(sock, server_side=True)
            tls.settimeout(None)
            return tls, address
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            why = f"TLS handshake failed: {getattr(exc, 'reason', None) or type(exc).__name__}"
            log.warning("connection from %s refused: %s", address[0], why)
            metrics.ASSOCIATIONS.labels(outcome="rejected").inc()
            try:
                lifecycle.record_rejected_connection(
                    self.settings.database_url,
                    peer_host=address[0],
                    peer_port=address[1],
                    tls=True,
                    reason=why,
                )
            except Exception as db_exc:
                log.warning("could not record the TLS failure (%s)", type(db_exc).__name__)
            raise

    # ------------------------------------------------------------------ health
    def scp_healthy(self) -> bool:
        """Listening, and no C-STORE handler stuck for CXR_HANDLER_STUCK_SECONDS (a handler
        that never returns holds its association and, with enough of them, every slot)."""
        if self.server is None:
            return False
        oldest = self.oldest_handler_age()
        return oldest is None or oldest < self.settings.handler_stuck_seconds

    def oldest_handler_age(self) -> float | None:
        with self._handlers_lock:
            starts = list(self._handlers.values())
        return time.monotonic() - min(starts) if starts else None

    # ------------------------------------------------------------------ DIMSE services
    def handle_echo(self, event: Any) -> int:
        self._state(event.assoc).counts["echo"] += 1
        return SUCCESS

    @dimse_status
    def handle_store(self, event: Any) -> int:
        """C-STORE: refuse, ignore, detect duplicates, or store durably + record + hand off.
        Failures are raised; :func:`dimse_status` turns them into the status."""
        t0 = time.monotonic()
        st = self._state(event.assoc)
        req = event.request
        cur: dict[str, Any] = {
            "sop_instance_uid": str(req.AffectedSOPInstanceUID or ""),
            "sop_class_uid": str(req.AffectedSOPClassUID or ""),
            "transfer_syntax_uid": str(event.context.transfer_syntax),
        }
        st.current = cur
        metrics.INSTANCES_RECEIVED.inc()

        key = threading.get_ident()
        with self._handlers_lock:
            self._handlers[key] = t0
        try:
            with received(event) as data:
                return self._store(event, st, cur, data, t0)
        finally:
            with self._handlers_lock:
                self._handlers.pop(key, None)

    def _store(
        self,
        event: Any,
        st: _AssocState,
        cur: dict[str, Any],
        data: Received,
        t0: float,
    ) -> int:
        head, body, size = data.head, data.body, data.size
        cur["size_bytes"] = size
        if size > self.settings.max_instance_bytes:
            raise OutOfResources(
                f"{size} bytes exceeds CXR_MAX_INSTANCE_BYTES={self.settings.max_instance_bytes}",
                "size_limit",
            )
        cur["sha256"] = data.sha256()
        with reading_data_set():
            header = filters.parse_header(head, body)
            ds = header.ds
            register_dataset_phi(ds)
            sop_uid = header.text("SOPInstanceUID")
            if not sop_uid:
                raise DoesNotMatchSOPClass("no SOP Instance UID in the data set", "missing_uid")
            if len(sop_uid) > 64 or not _PRINTABLE_UID.fullmatch(sop_uid):
                raise DoesNotMatchSOPClass(
                    "SOP Instance UID is not a valid UI value", "invalid_uid"
                )
            if cur["sop_instance_uid"] and sop_uid != cur["sop_instance_uid"]:
                raise DoesNotMatchSOPClass(
                    "SOP Instance UID differs from the C-STORE request", "uid_mismatch"
                )
            if cur["sop_class_uid"] and header.text("SOPClassUID") != cur["sop_class_uid"]:
                raise DoesNotMatchSOPClass(
                    "SOP Class UID differs from the C-STORE request", "class_mismatch"
                )
            cur |= self._header_fields(header)
            filters.check_image_structure(header, self.rules)

            reason = filters.ignore_reason(header, self.rules)
            if reason is not None:
                kind = lifecycle.record_ignored(
                    self.settings.database_url, self._receipt(st, cur), reason
                )
                st.counts[kind] += 1
                if kind == "duplicate":
                    metrics.INSTANCES_DUPLICATE.inc()
                else:
                    metrics.INSTANCES_IGNORED.labels(reason=reason.split(":")[0]).inc()
                    log.info("ignored %s: %s", sop_uid, reason)
                return SUCCESS

        # durable first: the encoded bytes as received (event.encoded_dataset()), no
        # decode/re-encode: the chunked file fsync'ed and renamed, or the buffered data set
        # written as chunks without joining them
        target = self.spool.incoming_path(cur["sha256"])
        existed = target.exists()
        if data.rx is not None:
            path, moved = self.spool.adopt_incoming(
                data.rx.name, cur["sha256"], size, fd=data.rx.fileno()
            )
            if moved:
                data.rx.adopted()
        else:
            path, _ = self.spool.store_incoming([head, body], cur["sha256"])
        cur["spool_path"] = self.spool.relative(path)
        try:
            done = lifecycle.record_receipt(self.settings.database_url, self._receipt(st, cur))
        except Exception:
            # the same content may have been committed concurrently by another association:
            # never delete a file that an audit row points to
            if not existed and not lifecycle.spool_path_referenced(
                self.settings.database_url, cur["spool_path"]
            ):
                self.spool.delete(path)
            raise
        kind, instance_id = done.kind, done.instance_id
        st.counts[kind] += 1
        metrics.STAGE_SECONDS.labels(stage="store").observe(time.monotonic() - t0)
        if kind == "duplicate":
            metrics.INSTANCES_DUPLICATE.inc()
            log.info("duplicate %s (instance %d) acknowledged", sop_uid, instance_id)
            return SUCCESS
        metrics.INSTANCES_ACCEPTED.inc()
        log.info("stored %s as instance %d (version %s)", sop_uid, instance_id, done.version)
        self._dispatch(instance_id)  # after the commit; the answer does not wait for the broker
        return SUCCESS

    def on_refused(self, event: Any, refusal: StoreRefused) -> None:
        """Count and record a refused C-STORE (called by :func:`dimse_status`)."""
        st = self._state(event.assoc)
        st.counts["refused"] += 1
        metrics.INSTANCES_REFUSED.labels(reason=refusal.reason).inc()
        if refusal.reason in ("database",):
            return  # cannot record in an unreachable database; the log line says why
        cur = st.current
        if not cur.get("sop_instance_uid"):
            return
        detail = f"refused {status_hex(refusal.status)} ({status_name(refusal.status)}): {refusal.detail}"
        try:
            lifecycle.record_refusal(self.settings.database_url, self._receipt(st, cur), detail)
        except Exception as exc:
            log.warning("could not record refusal (%s)", type(exc).__name__)

    # ------------------------------------------------------------------ audit rows
    def _header_fields(self, h: filters.Header) -> dict[str, Any]:
        """The audit columns read from the header. A value that breaks its VR (too long,
        control characters: a damaged header whose lengths are off reads the next
        elements, PatientName/PatientID bytes included, as its value) is not stored; a
        value holding registered PHI never is."""

        def cut(v: str, n: int, vr_max: int | None = None) -> str | None:
            v = v.replace("\x00", "").strip()  # PostgreSQL text cannot hold NUL
            if not v:
                return None
            if (vr_max is not None and len(v) > vr_max) or _CONTROL.search(v):
                return None
            if scrub(v) != v:
                return None
            return v[:n]

        return {
            "sop_class_uid": h.text("SOPClassUID") or None,
            "study_instance_uid": cut(h.text("StudyInstanceUID"), 64, 64),
            "series_instance_uid": cut(h.text("SeriesInstanceUID"), 64, 64),
            "accession_number": cut(h.text("AccessionNumber"), 64, 16),  # SH
            "patient_id_hash": hash_patient_id(self.settings, h.text("PatientID")),
            "modality": cut(h.text("Modality"), 16, 16),  # CS
            "body_part": cut(h.text("BodyPartExamined"), 64, 16),  # CS
            "view_position": cut(h.text("ViewPosition"), 16, 16),  # CS
            "rows": h.integer("Rows") or None,
            "columns": h.integer("Columns") or None,
        }

    def _receipt(self, st: _AssocState, cur: dict[str, Any]) -> lifecycle.Receipt:
        """The C-STORE being handled, as the audit module records it."""
        return lifecycle.Receipt.from_fields(cur, calling_ae=st.calling_ae, association_id=st.db_id)
