"""DIMSE status codes by name: the contract between the node (which answers with them)
and delivery (which reads them in a destination's C-STORE responses).

Never bare hex in logic. PS3.7 Annex C (general status codes) and PS3.4 Annex B.2.3
(Storage SOP Class statuses); PS3.4 C.4.2.1.5 lists the same Storage statuses for C-STORE.
Verification (C-ECHO) uses the general codes, PS3.4 Annex A.
"""

from __future__ import annotations

# --- PS3.7 Annex C.1 / PS3.4 B.2.3: Success ---------------------------------------------
SUCCESS = 0x0000
# --- PS3.4 Annex B.2.3, Table B.2-1: Storage failures --------------------------------------
OUT_OF_RESOURCES = 0xA700  # "Refused: Out of Resources" (A7xx)
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # "Error: Data Set Does Not Match SOP Class" (A9xx)
CANNOT_UNDERSTAND = 0xC000  # "Error: Cannot Understand" (Cxxx)
# --- PS3.4 Annex B.2.3, Table B.2-1: Storage warnings (not emitted by this node) ------
COERCION_OF_DATA_ELEMENTS = 0xB000
ELEMENTS_DISCARDED = 0xB006
DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
# --- PS3.7 Annex C.4: general failures --------------------------------------------------
PROCESSING_FAILURE = 0x0110  # C.4.2 "Processing failure": an unexpected internal error
SOP_CLASS_NOT_SUPPORTED = 0x0122  # C.4.6 "Refused: SOP Class not supported"

STATUS_NAMES: dict[int, str] = {
    SUCCESS: "Success",
    OUT_OF_RESOURCES: "Refused: Out of Resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data Set Does Not Match SOP Class",
    CANNOT_UNDERSTAND: "Error: Cannot Understand",
    COERCION_OF_DATA_ELEMENTS: "Warning: Coercion of Data Elements",
    ELEMENTS_DISCARDED: "Warning: Elements Discarded",
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: "Warning: Data Set Does Not Match SOP Class",
    PROCESSING_FAILURE: "Failure: Processing Failure",
    SOP_CLASS_NOT_SUPPORTED: "Refused: SOP Class Not Supported",
}


def status_name(code: int) -> str:
    return STATUS_NAMES.get(code, f"0x{code:04X}")


def status_hex(code: int) -> str:
    return f"0x{code:04X}"


# --- typed refusals -------------------------------------------------------------------------
