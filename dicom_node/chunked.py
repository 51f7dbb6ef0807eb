"""Chunked C-STORE receive: the data set goes to the spool's ``tmp/`` while it arrives.

With pynetdicom's ``_config.STORE_RECV_CHUNKED_DATASET`` the DIMSE layer writes a C-STORE
data set to a temporary file instead of a ``BytesIO``: the 128-byte preamble, ``DICM``, the
File Meta Information built from the request (Affected SOP Class/Instance UID) and the
presentation context (Transfer Syntax UID) with pynetdicom's implementation UID/version --
exactly ``encode_file_meta(event.file_meta)`` -- and then every P-DATA fragment of the data
set as received. The file is therefore byte for byte what the in-memory path stores
(``event.encoded_dataset()``), and it is complete when the handler runs: the network
receive of one instance overlaps the hashing and the page-cache write, and the handler is
left with one fsync and a rename instead of a copy of the whole data set.

As shipped, that setting does not fit a node that must not change anything else:

* it is process-global. Here the flag is :data:`_FLAG`, an object that is true only in the
  DUL (receiving) thread of an association of an AE registered with :func:`enable`; in the
  same process a pynetdicom SCU, a test PACS or any other AE sees ``False``, as before;
* the file goes to the system temporary directory, and pynetdicom has no setting for it.
  ``NamedTemporaryFile`` in :mod:`pynetdicom.dimse_messages` is replaced by
  :func:`_temporary_file`, which for a registered AE returns an :class:`RxFile` in the
  spool's ``tmp/`` (the same filesystem: the node adopts it into ``incoming/`` by a rename)
  and otherwise calls the real one.

An :class:`RxFile` also hashes (SHA-256, the spool name) and counts what it is given as it
arrives, and stops writing past ``CXR_MAX_INSTANCE_BYTES`` (the handler refuses such an
instance by its counted size; the disk holds at most the limit per message). Every 4 MiB it
asks the kernel to start writing the file to disk (``sync_file_range(SYNC_FILE_RANGE_WRITE)``,
asynchronous: only a hint), so that the handler's fsync finds little left to write: that is
what lets the network receive overlap the durable write. Durability itself still comes
from the fsync (file and directory) before Success, as before.

Clean-up: the C-STORE handler adopts or discards its file; pynetdicom also closes and
unlinks it after the handler (best effort, a missing file is fine). A data set cut off by
an abort or a closed connection (never handed to a handler) is discarded by
:func:`discard_unclaimed` at EVT_CONN_CLOSE; any file still left (a crash) is a ``*.part``
file that :meth:`cxr.storage.Spool.clean_tmp` removes at start-up.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import os
import threading
from dataclasses import dataclass
from tempfile import NamedTemporaryFile
from typing import TYPE_CHECKING, Any

from pynetdicom import _config, dimse_messages
from pynetdicom.dul import DULServiceProvider

if TYPE_CHECKING:  # pragma: no cover
    from cxr.storage import Spool

log = logging.getLogger(__name__)

_ATTR = "_cxr_rx"  # on an AE: its _Registration; on an Association: its RxFiles
_WRITE_CHUNK = 1 << 20  # bytes gathered per received data set before a write(2)
_WRITEBACK_EVERY = 4 << 20  # start the disk write-back of what was written, every 4 MiB
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: initiate write-out, do not wait
_install_lock = threading.Lock()


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None. Python's os module does not have it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


@dataclass(frozen=True)
class _Registration:
    spool: Spool
    limit: int  # CXR_MAX_INSTANCE_BYTES: nothing written past it


def _registration() -> tuple[Any, _Registration] | None:
    """``(association, registration)`` when the current thread is the DUL thread of an
    association of a registered AE, else None."""
    thread = threading.current_thread()
    if not isinstance(thread, DULServiceProvider):
        return None
    assoc = getattr(thread, "assoc", None)
    reg = getattr(getattr(assoc, "ae", None), _ATTR, None)
    return (assoc, reg) if isinstance(reg, _Registration) else None


class _ScopedFlag:
    """``STORE_RECV_CHUNKED_DATASET`` for registered AEs only (see the module docstring)."""

    def __bool__(self) -> bool:
        return _registration() is not None

    def __repr__(self) -> str:  # pragma: no cover - for whoever prints pynetdicom's config
        return "<STORE_RECV_CHUNKED_DATASET: True for the cxr node's associations only>"


_FLAG = _ScopedFlag()


class RxFile:
    """The file pynetdicom writes one received C-STORE data set to (Part 10 stream).

    Has what pynetdicom uses of a ``NamedTemporaryFile`` (``write``, ``file.flush``,
    ``name``, ``close``). Written by the DUL thread only; read by the C-STORE handler after
    the message is complete (the DIMSE queue orders the two)."""

    def __init__(self, spool: Spool, limit: int, owner: set[RxFile]) -> None:
        self._fd, self.name = spool.open_tmp("rx-")
        self._buf = bytearray()
        self._written = 0  # bytes in the file
        self._written_back = 0  # bytes whose write-back was started
        self.file = self  # pynetdicom flushes ``.file`` after every fragment: see flush()
        self.limit = limit
        self.size = 0  # bytes received, also those not written past the limit
        self.overflow = False
        self.error: OSError | None = None  # a failed write (disk full): raised by the handler
        self._sha = hashlib.sha256()
        self._owner = owner
        self._lock = threading.Lock()
        self.closed = False
        owner.add(self)

    # ------------------------------------------------------------ what pynetdicom calls
    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        self.size += n
        if self.size > self.limit:
            self.overflow = True  # refused by its size; nothing more goes to disk
            return n
        if self.error is not None:
            return n
        self._sha.update(data)  # releases the GIL for large fragments
        try:
            if self._buf or n < _WRITE_CHUNK:
                self._buf += data
                if len(self._buf) >= _WRITE_CHUNK:
                    self._drain()
            else:
                self._write_out(memoryview(data))
        except OSError as exc:  # not in the DUL thread: the handler answers A700 with it
            self.error = exc
        return n

    def _drain(self) -> None:
        if self._buf:
            self._write_out(memoryview(self._buf))
            self._buf = bytearray()

    def _write_out(self, view: memoryview) -> None:
        with view:
            while view:
                done = os.write(self._fd, view)
                self._written += done
                view = view[done:]
        if _sync_file_range is not None and (
            self._written - self._written_back >= _WRITEBACK_EVERY
        ):
            start, self._written_back = self._written_back, self._written
            _sync_file_range(self._fd, start, self._written - start, _SYNC_FILE_RANGE_WRITE)

    def flush(self) -> None:
        """A no-op: the data reach the file per MiB and by :meth:`finish`, not one
        write(2) per P-DATA fragment."""

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                self._buf = bytearray()
                os.close(self._fd)

    # ------------------------------------------------------------ what the node calls
    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def owned(self) -> bool:
        """Still this file's to delete (not adopted into the spool, not discarded)."""
        return self in self._owner

    def finish(self) -> None:
        """Everything received is in the file (in the page cache; the spool fsyncs it).
        Raises the write error met while receiving (e.g. ENOSPC), if any."""
        if self.error is None:
            try:
                self._drain()
            except OSError as exc:
                self.error = exc
        if self.error is not None:
            raise self.error

    def fileno(self) -> int:
        return self._fd

    def map(self) -> mmap.mmap:
        """The file read-only in memory (no copy: page cache). Call :meth:`finish` first."""
        return mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)

    def adopted(self) -> None:
        """The file was renamed into the spool: no longer ours to delete."""
        self._owner.discard(self)

    def discard(self) -> None:
        """Close and delete the file (idempotent)."""
        self.close()
        self._owner.discard(self)
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass


def _temporary_file(*args: Any, **kwargs: Any) -> Any:
    """Stands in for ``NamedTemporaryFile`` in :mod:`pynetdicom.dimse_messages`."""
    found = _registration()
    if found is None:  # someone set the plain global flag: pynetdicom's own behaviour
        return NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 - pynetdicom closes it
    assoc, reg = found
    owner = getattr(assoc, _ATTR, None)
    if owner is None:
        owner = set()
        setattr(assoc, _ATTR, owner)
    return RxFile(reg.spool, reg.limit, owner)


def install() -> bool:
    """Put the scoped flag and the temporary-file factory into pynetdicom (idempotent).
    False (and nothing changed) when this pynetdicom does not have the expected hooks."""
    with _install_lock:
        if not hasattr(dimse_messages, "NamedTemporaryFile") or not hasattr(
            _config, "STORE_RECV_CHUNKED_DATASET"
        ):
            log.warning("this pynetdicom has no chunked C-STORE receive; data sets are buffered")
            return False
        dimse_messages.NamedTemporaryFile = _temporary_file
        if _config.STORE_RECV_CHUNKED_DATASET is not True:  # True: set globally by someone
            setattr(_config, "STORE_RECV_CHUNKED_DATASET", _FLAG)  # noqa: B010 - typed bool
        return True


def enable(ae: Any, spool: Spool, limit: int) -> bool:
    """Receive the C-STORE data sets of ``ae``'s associations into ``spool``'s ``tmp/``."""
    if not install():
        return False
    setattr(ae, _ATTR, _Registration(spool, limit))
    return True


def disable(ae: Any) -> None:
    if hasattr(ae, _ATTR):
        delattr(ae, _ATTR)


def rx_file(request: Any) -> RxFile | None:
    """The :class:`RxFile` a C-STORE request primitive's data set was received into."""
    f = getattr(request, "_dataset_file", None)
    return f if isinstance(f, RxFile) else None


def discard_unclaimed(assoc: Any) -> None:
    """At EVT_CONN_CLOSE (DUL thread): delete the data set files of ``assoc`` that no
    handler will take -- the one cut off mid-transfer at once; any fully received but not
    (yet) served ones once the association thread has ended (a handler may still run)."""
    dimse = getattr(assoc, "dimse", None)
    partial = getattr(getattr(dimse, "message", None), "_data_set_file", None)
    if isinstance(partial, RxFile):
        partial.discard()
    owner: set[RxFile] | None = getattr(assoc, _ATTR, None)
    if not owner:
        return

    def reap() -> None:
        try:
            assoc.join()  # its reactor thread: no handler runs after this
        except RuntimeError:  # not started, or this very thread
            pass
        for f in list(owner):
            f.discard()

    threading.Thread(target=reap, name="cxr-rx-reaper", daemon=True).start()
