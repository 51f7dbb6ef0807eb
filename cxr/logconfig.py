"""Logging set-up: plain or JSON lines, one logger per module, never PHI.

Code must log identifiers (SOP Instance UID, audit row id), never PatientName/PatientID.
As a second line of defence, :class:`PhiFilter` masks values registered as PHI for the
current process (the node registers the names/IDs it has just parsed) before any handler
writes them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime

# Never held while a value is converted to text: converting a DICOM value can log
# (pydicom's validation warnings), and the log filter below takes this lock too. It is
# re-entrant all the same, so that a log line from inside the critical section (none is
# expected) cannot deadlock the process.
_phi_lock = threading.RLock()
_phi_values: dict[str, None] = {}  # insertion-ordered, bounded set
_PHI_MAX = 4096
_PHI_TEXT_MAX = 256  # longer "names" are not names: keep the filter cheap

# PHI attributes whose raw bytes are registered even when they do not decode
PHI_TAGS = (
    0x00100010,  # PatientName
    0x00100020,  # PatientID
    0x00100030,  # PatientBirthDate
    0x00101000,  # OtherPatientIDs
    0x00101001,  # OtherPatientNames
    0x00101040,  # PatientAddress
    0x00102154,  # PatientTelephoneNumbers
)


def _phi_texts(value: object) -> list[str]:
    """The text forms of one PHI value (str, PersonName, bytes, multi-value)."""
    if value is None:
        return []
    if isinstance(value, bytes | bytearray):
        raw = bytes(value[:_PHI_TEXT_MAX])
        texts = [raw.decode("latin-1")]
        texts.append(repr(raw)[2:-1])  # as a traceback shows bytes: b'Doe^John'
        return [t.strip(" \x00") for t in texts]
    if isinstance(value, list | tuple):  # MultiValue, or a Sequence: its scalar items
        out: list[str] = []
        for v in list(value)[:16]:
            if isinstance(v, str | bytes | bytearray) or type(v).__name__ == "PersonName":
                out += _phi_texts(v)
        return out
    if isinstance(value, str) or type(value).__name__ == "PersonName":
        try:
            return [str(value)[:_PHI_TEXT_MAX].strip()]
        except Exception:  # a PersonName that cannot decode: its raw bytes are registered
            return []
    return []  # anything else (a Dataset...) is not a name or an ID


def register_phi(*values: object) -> None:
    """Remember values (patient name/ID) that must never reach a log line."""
    texts = [t for v in values for t in _phi_texts(v)]  # outside the lock: may log
    with _phi_lock:
        for s in texts:
            if len(s) >= 3:
                _phi_values[s] = None
                for part in s.replace("^", " ").split():
                    if len(part) >= 4:
                        _phi_values[part] = None
        while len(_phi_values) > _PHI_MAX:
            _phi_values.pop(next(iter(_phi_values)))


def register_dataset_phi(ds: object) -> None:
    """Register the PHI of a dataset from its raw element values, without decoding them
    (an undecodable PatientName is still masked in the traceback its decoding prints)."""
    values: list[object] = []
    get_item = getattr(ds, "get_item", None)
    if get_item is None:
        return
    for tag in PHI_TAGS:
        try:
            elem = get_item(tag)
        except Exception:
            continue
        if elem is None:
            continue
        values.append(getattr(elem, "value", None))
    register_phi(*values)


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


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _unquote(msg: str) -> str:
    """pynetdicom quotes the peer's values in its messages (an over-long "UID" can hold the
    bytes of the next elements: a patient name): keep the message, drop the values."""
    return _QUOTED.sub("'...'", msg)


class PeerNoiseFilter(logging.Filter):
    """A peer that sends garbage makes pynetdicom log ERROR lines with tracebacks, several
    per connection (60 garbage connections made 607 ERROR lines). Keep one WARNING line per
    connection thread, without the traceback (which can quote the peer's raw bytes), and
    drop the rest of that connection's pynetdicom errors."""

    _MAX_THREADS = 1024

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[int, None] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pynetdicom") or record.levelno < logging.WARNING:
            return True
        if record.levelno < logging.ERROR:  # a warning: keep it, without quoted peer values
            record.msg, record.args = _unquote(record.getMessage()), None
            return True
        key = record.thread or 0
        with self._lock:
            first = key not in self._seen
            self._seen[key] = None
            while len(self._seen) > self._MAX_THREADS:
                self._seen.pop(next(iter(self._seen)))
        if not first:
            return False
        try:
            msg = _unquote(record.getMessage().splitlines()[0])[:200]
        except Exception:
            msg = "unreadable message"
        record.msg, record.args = f"DICOM peer connection error: {msg}", None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True

    def connection_closed(self, thread_id: int) -> None:
        with self._lock:
            self._seen.pop(thread_id, None)


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


PEER_NOISE = PeerNoiseFilter()


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    handler = _StderrHandler(sys.stderr)
    handler.addFilter(PEER_NOISE)
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
