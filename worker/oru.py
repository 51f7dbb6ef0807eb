"""HL7 v2.5.1 ORU^R01 result messages to a RIS over MLLP (python-hl7).

One message per classified image (:func:`build_oru`), sent to every
``CXR_HL7_DESTINATIONS`` entry (:func:`send_oru`) and checked for its ACK:

``success``
    MSA-1 ``AA`` (or ``CA``) for our message control ID.
``failure``
    MSA-1 ``AE``/``AR`` (``CE``/``CR``), an ACK for another control ID, or a reply that is
    not an ACK: the RIS refused it (retried with backoff like a C-STORE refusal).
``unreachable``
    connection refused/reset, no ACK within ``CXR_HL7_ACK_TIMEOUT``, or a broken MLLP block.

The message (segments and fields)::

    MSH  CXR-TRIAGE | ORU^R01^ORU_R01 | control ID | P | 2.5.1
    PID  PID-3: the PatientID as the audit DB stores it (the salted hash by default,
         identifier type HASH; never a name)
    OBR  OBR-2/3 placer/filler order number = AccessionNumber, OBR-4 universal service
         CXR-AI, OBR-5 and OBR-27.6 priority S (STAT) when the verdict is COVID with a
         probability above CXR_URGENT_THRESHOLD ("COVID-19 suspected"), else R;
         OBR-25 result status F
    OBX  1 verdict (CWE: COVID-19 suspected / Normal / Other lung disease),
         2-4 the three probabilities (NM), 5 model name, 6 model version,
         7 Study Instance UID, 8 source SOP Instance UID
    NTE  Research use only, not for diagnostic use (+ the out-of-distribution warning)

The control ID is derived from the result (the SC's SOP Instance UID, itself derived from
the source image and the model version): a retry re-sends the *same* message with the same
control ID, so a RIS can drop a duplicate whose ACK was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import hl7
from hl7.mllp import open_hl7_connection

from cxr.logconfig import scrub
from ml.labels import VERDICT_TEXT
from worker.delivery import (
    FAILURE_OUTCOME,
    SUCCESS_OUTCOME,
    UNREACHABLE_OUTCOME,
    SendOutcome,
)

if TYPE_CHECKING:  # pragma: no cover
    from db.lifecycle import ReportFacts

log = logging.getLogger(__name__)

SENDING_APPLICATION = "CXR-TRIAGE"
HL7_VERSION = "2.5.1"
RESEARCH_NOTE = "Research use only, not for diagnostic use"
CODING_SYSTEM = "L"  # local codes (HL7 table 0396)
URGENT, ROUTINE = "S", "R"
_ACCEPTED = ("AA", "CA")
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


def escape(value: object) -> str:
    """An HL7 v2 field value with its delimiters escaped, one line (no CR/LF)."""
    text = "" if value is None else str(value)
    for raw, esc in _ESCAPES:
        text = text.replace(raw, esc)
    return " ".join(text.splitlines())


def _ts(when: datetime | None) -> str:
    when = when or datetime.now(UTC)
    return when.astimezone(UTC).strftime("%Y%m%d%H%M%S") + "+0000"


def control_id(result_uid: str) -> str:
    """MSH-10, 20 characters, the same for every attempt of one result's message."""
    return "CXR" + hashlib.sha256(result_uid.encode()).hexdigest()[:17].upper()


def is_urgent(verdict: str, probabilities: dict[str, float], threshold: float) -> bool:
    """COVID verdict with a probability above the threshold (CXR_URGENT_THRESHOLD)."""
    return verdict == "COVID" and float(probabilities.get("COVID", 0.0)) > threshold


def build_oru(
    report: ReportFacts,
    model_name: str,
    *,
    urgent_threshold: float,
    patient_id_storage: str = "hash",
    sending_facility: str = "",
    receiving_application: str = "",
    receiving_facility: str = "",
    now: datetime | None = None,
) -> hl7.Message:
    """The ORU^R01 of one classification (``report``: :class:`db.lifecycle.ReportFacts`)."""
    r = report
    verdict = str(r.verdict)
    probs: dict[str, float] = dict(r.probabilities)
    observed = _ts(r.classified_at)
    acc = escape(r.accession_number or "")
    priority = URGENT if is_urgent(verdict, probs, urgent_threshold) else ROUTINE
    pid_type = "HASH" if patient_id_storage == "hash" else "PI"
    pid = r.patient_id
    pid3 = f"{escape(pid)}^^^{SENDING_APPLICATION}^{pid_type}" if pid else ""
    verdict_text = VERDICT_TEXT.get(verdict, verdict)
    status = "F"

    obr = {
        1: "1",
        2: acc,  # placer order number
        3: acc,  # filler order number
        4: f"CXR-AI^AI chest X-ray triage^{CODING_SYSTEM}",  # universal service ID
        5: priority,  # (retained for backward compatibility in 2.5.1)
        7: observed,  # observation date/time
        22: observed,  # results report/status change
        25: status,  # result status
        27: f"^^^^^{priority}",  # quantity/timing, component 6: priority
    }

    def obx(n: int, vtype: str, code: str, text: str, value: str, units: str = "") -> str:
        return (
            f"OBX|{n}|{vtype}|{code}^{escape(text)}^{CODING_SYSTEM}||{value}|{units}|||||"
            f"{status}|||{observed}"
        )

    segments = [
        "MSH|^~\\&|"
        f"{SENDING_APPLICATION}|{escape(sending_facility)}|{escape(receiving_application)}|"
        f"{escape(receiving_facility)}|{_ts(now)}||ORU^R01^ORU_R01|"
        f"{control_id(r.sc_sop_instance_uid)}|P|{HL7_VERSION}",
        f"PID|1||{pid3}",
        _segment("OBR", obr),
        obx(
            1,
            "CWE",
            "CXR-VERDICT",
            "AI triage verdict",
            f"{escape(verdict)}^{escape(verdict_text)}^{CODING_SYSTEM}",
        ),
        obx(2, "NM", "CXR-P-COVID", "Probability COVID-19", f"{probs.get('COVID', 0.0):.4f}"),
        obx(3, "NM", "CXR-P-NORMAL", "Probability normal", f"{probs.get('Normal', 0.0):.4f}"),
        obx(
            4,
            "NM",
            "CXR-P-OTHER",
            "Probability other lung disease",
            f"{probs.get('Other', 0.0):.4f}",
        ),
        obx(5, "ST", "CXR-MODEL", "Model name", escape(model_name)),
        obx(6, "ST", "CXR-MODEL-VERSION", "Model version", escape(r.model_version)),
        obx(7, "ST", "CXR-STUDY-UID", "Study Instance UID", escape(r.study_instance_uid or "")),
        obx(8, "ST", "CXR-SOP-UID", "SOP Instance UID", escape(r.sop_instance_uid)),
        f"NTE|1|L|{RESEARCH_NOTE}. The verdict says 'suspected': it is not a diagnosis.",
    ]
    if r.ood:
        segments.append(
            "NTE|2|L|The image looks unlike the training data: the verdict may be unreliable."
        )
    return hl7.parse("\r".join(segments))


def _segment(name: str, fields: dict[int, str]) -> str:
    """``NAME|f1|f2|...`` from {field number: value} (numbers missing are empty)."""
    return "|".join([name] + [fields.get(i, "") for i in range(1, max(fields) + 1)])


async def _exchange(host: str, port: int, message: hl7.Message, timeout: float) -> hl7.Message:
    reader, writer = await asyncio.wait_for(
        open_hl7_connection(host, port, encoding="utf-8"), timeout
    )
    try:
        writer.writemessage(message)
        await writer.drain()
        return await asyncio.wait_for(reader.readmessage(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _field(message: hl7.Message, segment: str, index: int) -> str:
    try:
        return str(message.segment(segment)[index])
    except (KeyError, IndexError):
        return ""


def send_oru(
    dest: str,
    host: str,
    port: int,
    message: hl7.Message,
    result_uid: str,
    timeout: float,
) -> SendOutcome:
    """Send one message over MLLP and classify its ACK. Never raises for network or
    receiver problems (they are outcomes)."""
    cid = str(message.segment("MSH")[10])
    t0 = time.perf_counter()

    def outcome(category: str, status: str | None, error: str | None) -> SendOutcome:
        return SendOutcome(
            destination=dest,
            sop_class_uid="ORU^R01",
            sop_instance_uid=result_uid,
            category=category,
            status=status,
            error=error,
            elapsed_ms=(time.perf_counter() - t0) * 1000,
        )

    try:
        ack = asyncio.run(_exchange(host, port, message, timeout))
    except TimeoutError:
        log.warning("HL7 to %s: no ACK within %.0f s", dest, timeout)
        return outcome(UNREACHABLE_OUTCOME, None, f"no ACK within {timeout:.0f} s")
    except Exception as exc:  # refused, reset, broken MLLP block, unparsable reply
        log.warning("HL7 to %s: unreachable (%s)", dest, type(exc).__name__)
        return outcome(UNREACHABLE_OUTCOME, None, f"{type(exc).__name__}: no ACK")
    code = _field(ack, "MSA", 1).upper()
    acked_id = _field(ack, "MSA", 2)
    text = scrub(_field(ack, "MSA", 3) or _field(ack, "ERR", 8))[:200] or None
    if not code:
        return outcome(FAILURE_OUTCOME, None, "reply without MSA segment")
    if acked_id != cid:
        return outcome(FAILURE_OUTCOME, code, "ACK for another message control ID")
    if code in _ACCEPTED:
        return outcome(SUCCESS_OUTCOME, code, None)
    log.warning("HL7 to %s: %s", dest, code)
    return outcome(FAILURE_OUTCOME, code, f"{code}: {text}" if text else code)
