"""Logging set-up: plain or JSON lines, one logger per module, never PHI.

Code must log identifiers (SOP Instance UID, audit row id), never PatientName/PatientID.
As a second line of defence, :class:`PhiFilter` masks values registered as PHI for the
current process (the node registers the names/IDs it has just parsed) before any handler
writes them.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime

_phi_lock = threading.Lock()
_phi_values: dict[str, None] = {}  # insertion-ordered, bounded set
_PHI_MAX = 4096


def register_phi(*values: object) -> None:
    """Remember values (patient name/ID) that must never reach a log line."""
    with _phi_lock:
        for v in values:
            s = str(v).strip() if v is not None else ""
            if len(s) >= 3:
                _phi_values[s] = None
                for part in s.replace("^", " ").split():
                    if len(part) >= 4:
                        _phi_values[part] = None
        while len(_phi_values) > _PHI_MAX:
            _phi_values.pop(next(iter(_phi_values)))


def scrub(text: str) -> str:
    with _phi_lock:
        values = list(_phi_values)
    for v in values:
        if v in text:
            text = text.replace(v, "[PHI]")
    return text


_exc_formatter = logging.Formatter()


class PhiFilter(logging.Filter):
    """Masks registered PHI in the message, the traceback and the stack of a record.

    The exception is formatted here once, scrubbed and kept in ``record.exc_text`` with
    ``record.exc_info`` cleared, so that every formatter uses the scrubbed text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _phi_values:
            msg = scrub(record.getMessage())
            record.msg, record.args = msg, None
            if record.exc_info:
                if not record.exc_text:
                    record.exc_text = _exc_formatter.formatException(record.exc_info)
                record.exc_info = None
            if record.exc_text:
                record.exc_text = scrub(record.exc_text)
            if record.stack_info:
                record.stack_info = scrub(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key in ("sop_instance_uid", "instance_id", "association_id", "status"):
            if hasattr(record, key):
                payload[key] = getattr(record, key)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # already formatted (and scrubbed) by PhiFilter
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = record.stack_info
        return json.dumps(payload, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that stays silent when its stream was closed under it (e.g. a
    pynetdicom thread logging after a test's captured stderr was torn down)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        if getattr(self.stream, "closed", False):
            return
        super().handleError(record)


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    handler = _StderrHandler(sys.stderr)
    handler.addFilter(PhiFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s")
        )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom is chatty at INFO and its DEBUG dumps datasets (PHI): cap it
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))
