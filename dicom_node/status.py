"""DIMSE status codes used by the node, and the ONE place where exceptions become statuses.

Status values (never bare hex in logic):

* PS3.7 Annex C (general status codes) and PS3.4 Annex B.2.3 (Storage SOP Class statuses),
  PS3.4 C.4.2.1.5 lists the same Storage statuses for C-STORE.
* Verification (C-ECHO) uses the general codes, PS3.4 Annex A.

The C-STORE handler never returns a failure code itself: it raises a :class:`StoreRefused`
subclass (or lets an unexpected exception escape) and :func:`status_for_exception`, applied
by the :func:`dimse_status` decorator, answers. This mirrors pynetdicom's
``ServiceClass.attempt`` pattern.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from cxr.dimse import (
    CANNOT_UNDERSTAND as CANNOT_UNDERSTAND,
)
from cxr.dimse import (
    COERCION_OF_DATA_ELEMENTS as COERCION_OF_DATA_ELEMENTS,
)
from cxr.dimse import (
    DATASET_DOES_NOT_MATCH_SOP_CLASS as DATASET_DOES_NOT_MATCH_SOP_CLASS,
)
from cxr.dimse import (
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING as DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
)
from cxr.dimse import (
    ELEMENTS_DISCARDED as ELEMENTS_DISCARDED,
)
from cxr.dimse import (
    OUT_OF_RESOURCES as OUT_OF_RESOURCES,
)
from cxr.dimse import (
    PROCESSING_FAILURE as PROCESSING_FAILURE,
)
from cxr.dimse import (
    SOP_CLASS_NOT_SUPPORTED as SOP_CLASS_NOT_SUPPORTED,
)
from cxr.dimse import (
    STATUS_NAMES as STATUS_NAMES,
)
from cxr.dimse import (  # the codes are the foundation's contract (cxr/dimse.py)
    SUCCESS as SUCCESS,
)
from cxr.dimse import (
    status_hex as status_hex,
)
from cxr.dimse import (
    status_name as status_name,
)

log = logging.getLogger(__name__)


class StoreRefused(Exception):  # noqa: N818 - it is a refusal, not an error of ours
    """Base of every deliberate C-STORE refusal. ``reason`` is a short fixed vocabulary
    label (used as a metrics label); ``detail`` is free text for the audit trail (no PHI)."""

    status: int = PROCESSING_FAILURE
    reason: str = "processing_failure"

    def __init__(self, detail: str, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason


class OutOfResources(StoreRefused):
    """PS3.4 B.2.3 A700: disk full, database unreachable, instance or pixel count over limit."""

    status = OUT_OF_RESOURCES
    reason = "out_of_resources"


class DoesNotMatchSOPClass(StoreRefused):
    """PS3.4 B.2.3 A900: e.g. an image SOP class without (or with empty/short) pixel data."""

    status = DATASET_DOES_NOT_MATCH_SOP_CLASS
    reason = "does_not_match_sop_class"


class CannotUnderstand(StoreRefused):
    """PS3.4 B.2.3 C000: the data set cannot be parsed."""

    status = CANNOT_UNDERSTAND
    reason = "cannot_understand"


def _is_database_error(exc: BaseException) -> bool:
    from db.lifecycle import is_database_error  # the audit DB's own errors, known in db/

    return is_database_error(exc)


def classify_exception(exc: BaseException) -> StoreRefused:
    """Turn any exception into the refusal it means for the sender (the single mapping)."""
    if isinstance(exc, StoreRefused):
        return exc
    if _is_database_error(exc):
        return OutOfResources(f"audit database unavailable ({type(exc).__name__})", "database")
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return OutOfResources("spool disk full", "disk_full")
        return OutOfResources(f"spool I/O error ({exc.errno})", "io_error")
    if isinstance(exc, MemoryError):
        return OutOfResources("out of memory", "memory")
    return StoreRefused(f"internal error ({type(exc).__name__})", "processing_failure")


@contextlib.contextmanager
def reading_data_set() -> Iterator[None]:
    """Around code that only *reads* the received data set (header parse, element values,
    filters): an unexpected error there means the data set cannot be understood (C000,
    PS3.4 B.2.3), not that the node failed (0110). Refusals and resource errors (database,
    disk, memory) keep their own meaning."""
    try:
        yield
    except (StoreRefused, OSError, MemoryError):
        raise
    except Exception as exc:
        if _is_database_error(exc):
            raise
        raise CannotUnderstand(
            f"unparseable data set: an element cannot be read ({type(exc).__name__})"
        ) from None


def status_for_exception(exc: BaseException) -> int:
    return classify_exception(exc).status


F = TypeVar("F", bound=Callable[..., Any])


_UID_CHARS = frozenset("0123456789.")
_AE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.")


def _request_context(event: Any) -> str:
    """``; from AE@host:port, SOP Instance UID ...`` for a refusal's log line, so that an
    admin can find the sender and the instance; only what is well-formed is written (a
    crafted request must not put arbitrary text in the log), never a patient attribute."""
    parts: list[str] = []
    try:
        req = event.assoc.requestor
        ae = str(req.ae_title).strip()
        where = f"{req.address}:{req.port}"
        if ae and len(ae) <= 16 and set(ae) <= _AE_CHARS:
            where = f"{ae}@{where}"
        parts.append(f"from {where}")
    except Exception:
        pass
    try:
        uid = str(event.request.AffectedSOPInstanceUID or "")
        if uid and len(uid) <= 64 and set(uid) <= _UID_CHARS:
            parts.append(f"SOP Instance UID {uid}")
    except Exception:
        pass
    return f"; {', '.join(parts)}" if parts else ""


def dimse_status(fn: F) -> F:
    """Decorate a DIMSE handler method ``(self, event) -> int``: exceptions become a status
    here and nowhere else. If ``self`` has ``on_refused(event, refusal)`` it is called to
    record/count the refusal; a failure there never changes the status returned."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return int(fn(*args, **kwargs))
        except Exception as exc:
            refusal = classify_exception(exc)
            unexpected = refusal is not exc
            log.log(
                logging.WARNING if unexpected else logging.INFO,
                "C-STORE refused: %s (%s)%s",
                refusal.detail,
                status_hex(refusal.status),
                _request_context(args[-1] if args else None),
                exc_info=unexpected and refusal.reason == "processing_failure",
            )
            recorder = getattr(args[0], "on_refused", None) if args else None
            if recorder is not None:
                try:
                    recorder(args[-1], refusal)
                except Exception as rec_exc:
                    log.warning("could not record the refusal (%s)", type(rec_exc).__name__)
            return refusal.status

    return wrapper  # type: ignore[return-value]
