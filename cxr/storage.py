"""All spool (file storage) access lives here, so another backend (e.g. an S3-compatible
object store) can replace it later without touching the node or the workers.

Layout under ``CXR_SPOOL_DIR``::

    incoming/<first 2 of sha>/<sha256>.dcm    received instances, named by content hash
    results/<output SOP Instance UID>.dcm      SC/SR results built by the workers
    tmp/                                       partial writes (same filesystem, then renamed)

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.results = self.root / "results"
        self.tmp = self.root / "tmp"
        for d in (self.incoming, self.results, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ writing
    def write_atomic(self, relpath: str, chunks: bytes | Iterable[bytes]) -> Path:
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
            h = hashlib.sha256()
            for c in chunks:
                h.update(c)
            sha256 = h.hexdigest()
        size = sum(len(c) for c in chunks)
        path = self.incoming_path(sha256)
        if path.exists() and path.stat().st_size == size:
            return path, sha256  # identical content already durable
        return self.write_atomic(self.relative(path), chunks), sha256

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
class CleanupResult:
    """What :func:`cleanup_spool` removed (or would remove, with ``dry_run``)."""

    def __init__(self) -> None:
        self.files = 0
        self.bytes = 0
        self.instances = 0

    def __repr__(self) -> str:
        return f"CleanupResult(files={self.files}, bytes={self.bytes}, instances={self.instances})"


def cleanup_spool(
    settings: object,
    retention_days: float | None = None,
    now: object | None = None,
    dry_run: bool = False,
) -> CleanupResult:
    """Delete spool files of instances that reached a final state more than
    ``retention_days`` (default ``CXR_SPOOL_RETENTION_DAYS``; 0 = keep forever) ago.

    Removes the received file (``instances.spool_path``, unless a newer, still-retained row
    points at the same content) and the SC/SR results built for it; sets ``spool_path`` to
    NULL and appends a ``spool_purged`` event, so the audit trail records the deletion.
    Audit rows themselves are never deleted.
    """
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import and_, or_, select, update

    from db.models import FINAL_STATES, Event, Inference, Instance, State
    from db.session import session_scope

    res = CleanupResult()
    days = settings.spool_retention_days if retention_days is None else retention_days  # type: ignore[attr-defined]
    if not days or days <= 0:
        return res
    current = now if isinstance(now, datetime) else datetime.now(UTC)
    cutoff = current - timedelta(days=float(days))
    finals = [s.value for s in FINAL_STATES]
    spool = Spool(settings.spool_dir)  # type: ignore[attr-defined]
    url = settings.database_url  # type: ignore[attr-defined]
    with session_scope(url) as s:
        done_at = Instance.finished_at
        old = s.execute(
            select(Instance.id, Instance.spool_path).where(
                or_(
                    Instance.state.in_(finals),
                    # classified with finished_at set: final when there are no destinations
                    and_(Instance.state == State.CLASSIFIED.value, done_at.is_not(None)),
                ),
                Instance.spool_path.is_not(None),
                ((done_at.is_not(None)) & (done_at < cutoff))
                | ((done_at.is_(None)) & (Instance.updated_at < cutoff)),
            )
        ).all()
        if not old:
            return res
        old_ids = {i for i, _ in old}
        kept_paths = {
            p
            for i, p in s.execute(
                select(Instance.id, Instance.spool_path).where(Instance.spool_path.is_not(None))
            ).all()
            if i not in old_ids
        }
        old_list = sorted(old_ids)
        for k in range(0, len(old_list), 500):  # bounded IN lists (SQLite variable limit)
            chunk = old_list[k : k + 500]
            result_uids = [
                uid
                for row in s.execute(
                    select(Inference.sc_sop_instance_uid, Inference.sr_sop_instance_uid).where(
                        Inference.instance_id.in_(chunk)
                    )
                ).all()
                for uid in row
                if uid
            ]
            chunk_set = set(chunk)
            paths: list[Path] = [
                spool.resolve(p) for i, p in old if i in chunk_set and p not in kept_paths
            ]
            paths += [spool.result_path(uid) for uid in result_uids]
            for path in dict.fromkeys(paths):
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                if not dry_run:
                    spool.delete(path)
                res.files += 1
                res.bytes += size
            if not dry_run:
                s.execute(update(Instance).where(Instance.id.in_(chunk)).values(spool_path=None))
                s.add_all(
                    Event(instance_id=i, kind="spool_purged", detail=f"retention {days} d")
                    for i in chunk
                )
        res.instances = len(old_ids)
    log.info(
        "spool clean-up: %s %d file(s), %d bytes, %d instance(s)",
        "would delete" if dry_run else "deleted",
        res.files,
        res.bytes,
        res.instances,
    )
    return res
