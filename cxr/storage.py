"""All spool (file storage) access lives here, so another backend (e.g. an S3-compatible
object store) can replace it later without touching the node or the workers.

Layout under ``CXR_SPOOL_DIR``::

    incoming/<first 2 of sha>/<sha256>.dcm    received instances, named by content hash
    results/<output SOP Instance UID>.dcm      SC/SR results built by the workers
    tmp/                                       partial writes (same filesystem, then renamed),
                                               C-STORE data sets while they arrive

Writes are durable: data goes to a temporary file in ``tmp/``, is fsync'ed, renamed
atomically into place, and the directory is fsync'ed. A crash leaves either the whole
file or only a ``tmp/`` file, which :meth:`Spool.clean_tmp` removes at start-up.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

log = logging.getLogger(__name__)


def content_sha256(chunks: Iterable[bytes | memoryview]) -> str:
    """SHA-256 (hex) of the chunks as if joined, without joining them (the spool names a
    received instance by it)."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: str | Path) -> None:
        # absolute once, here: every path the spool hands out (incoming_path, result_path)
        # must resolve to the same file whatever the caller does with it (a relative root,
        # the default ``var/spool``, made result_path() relative paths that resolve()
        # prefixed with the root a second time)
        self.root = Path(root).absolute()
        self.incoming = self.root / "incoming"
        self.results = self.root / "results"
        self.tmp = self.root / "tmp"
        for d in (self.incoming, self.results, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ writing
    def write_atomic(
        self, relpath: str, chunks: bytes | memoryview | Iterable[bytes | memoryview]
    ) -> Path:
        """Durably write ``chunks`` to ``root/relpath`` (tmp + fsync + rename + dir fsync).

        On any error nothing is left behind and the exception propagates (e.g. ENOSPC).
        """
        final = self.root / relpath
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmpname = tempfile.mkstemp(dir=self.tmp, prefix="w-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                if isinstance(chunks, bytes | bytearray | memoryview):
                    fh.write(chunks)
                else:
                    for c in chunks:
                        fh.write(c)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmpname, final)
            _fsync_dir(final.parent)
        except BaseException:
            try:
                os.unlink(tmpname)
            except FileNotFoundError:
                pass
            raise
        return final

    def incoming_path(self, sha256: str) -> Path:
        """Where an incoming instance with this content hash is (or would be) stored."""
        return self.root / f"incoming/{sha256[:2]}/{sha256}.dcm"

    def store_incoming(
        self, data: bytes | memoryview | list[bytes | memoryview], sha256: str | None = None
    ) -> tuple[Path, str]:
        """Store an encoded instance by its content hash; returns (path, sha256).

        ``data`` may be a list of chunks (e.g. preamble + file meta + data set as received),
        written in order without being joined (no copy of a large data set)."""
        chunks = data if isinstance(data, list) else [data]
        if sha256 is None:
            sha256 = content_sha256(chunks)
        size = sum(len(c) for c in chunks)
        path = self.incoming_path(sha256)
        if path.exists() and path.stat().st_size == size:
            return path, sha256  # identical content already durable
        return self.write_atomic(self.relative(path), chunks), sha256

    def open_tmp(self, prefix: str = "w-") -> tuple[int, str]:
        """A new file in ``tmp/`` (same filesystem as ``incoming/``): ``(fd, path)``, opened
        read-write. It is removed by :meth:`clean_tmp` if left behind."""
        return tempfile.mkstemp(dir=self.tmp, prefix=prefix, suffix=".part")

    def adopt_incoming(
        self, tmp_path: str | Path, sha256: str, size: int, fd: int | None = None
    ) -> tuple[Path, bool]:
        """Make a complete file in ``tmp/`` (e.g. a C-STORE data set written there while it
        arrived) the incoming instance with content hash ``sha256``: fsync it (``fd`` if
        given, else the path), rename it atomically into place, fsync the directory.

        Returns ``(path, adopted)``. When identical content is durable already the file is
        not moved (``adopted`` False) and stays the caller's to delete. On an error the file
        stays where it was (the caller deletes it) and the exception propagates."""
        tmp = Path(tmp_path)
        if tmp.parent.resolve() != self.tmp.resolve():
            raise ValueError("adopt_incoming takes files in the spool's tmp/ only")
        path = self.incoming_path(sha256)
        if path.exists() and path.stat().st_size == size:
            return path, False  # identical content already durable
        path.parent.mkdir(parents=True, exist_ok=True)
        if fd is not None:
            os.fsync(fd)
        else:
            sync_fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(sync_fd)
            finally:
                os.close(sync_fd)
        os.replace(tmp, path)  # same filesystem: a rename, never a copy
        _fsync_dir(path.parent)
        return path, True

    def store_result(self, sop_instance_uid: str, ds: Dataset) -> Path:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return self.write_atomic(f"results/{sop_instance_uid}.dcm", buf.getvalue())

    # ------------------------------------------------------------------ reading
    def resolve(self, path: str | Path) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.root / p

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def read_bytes(self, path: str | Path) -> bytes:
        return self.resolve(path).read_bytes()

    def read_dataset(self, path: str | Path, stop_before_pixels: bool = False) -> Dataset:
        import pydicom

        return pydicom.dcmread(
            self.resolve(path), force=True, stop_before_pixels=stop_before_pixels
        )

    def result_path(self, sop_instance_uid: str) -> Path:
        return self.results / f"{sop_instance_uid}.dcm"

    # ------------------------------------------------------------------ housekeeping
    def delete(self, path: str | Path) -> None:
        try:
            self.resolve(path).unlink()
        except FileNotFoundError:
            pass

    def clean_tmp(self, older_than_s: float = 0.0) -> int:
        """Remove partial writes left by a crash. Returns how many were removed."""
        n, now = 0, time.time()
        for p in self.tmp.glob("*.part"):
            try:
                if now - p.stat().st_mtime >= older_than_s:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        if n:
            log.info("removed %d partial spool file(s)", n)
        return n

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize


# ---------------------------------------------------------------------------------------
# Retention (added for `cxr run --cleanup-spool` and the hourly clean-up in `cxr run`)
# ---------------------------------------------------------------------------------------
