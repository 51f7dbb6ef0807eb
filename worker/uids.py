"""Deterministic UIDs of the results (Secondary Capture, Structured Report, heat map).

Every output UID is derived from the *input* SOP Instance UID and the model version (and,
for a second or later content received under one SOP Instance UID, that content's version),
so a re-run of the same instance with the same model (a redelivered task, a worker killed
mid-task, an admin retry) builds objects with the *same* UIDs: the PACS replaces them
instead of holding a second result series. A new model version gives new UIDs, i.e. a new
result series next to the old one, which is the wanted behaviour for a new algorithm.

The UIDs are ``2.25.<decimal of a UUID>`` (PS3.5 B.2, UUID-derived form, at most 44
characters) with a *name-based* UUID (RFC 4122 version 5, :func:`uuid.uuid5`) of the
inputs. (Note: ``pydicom.uid.generate_uid(prefix=None, ...)`` ignores its entropy sources
and is random, so it is not used here.)
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# change only to deliberately re-key every output
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-triage:results:v1")


def uid_from(*parts: str) -> str:
    """A deterministic ``2.25.`` UID from the given strings (name-based UUID)."""
    name = "\x1f".join(str(p) for p in parts)  # unit separator: ("a b", "c") != ("a", "b c")
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


@dataclass(frozen=True)
class OutputUIDs:
    """The UIDs of one instance's results for one model version."""

    sc_series: str
    sc_sop: str
    sr_series: str
    sr_sop: str
    hm_series: str = ""
    hm_sop: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "sc_series": self.sc_series,
            "sc_sop": self.sc_sop,
            "sr_series": self.sr_series,
            "sr_sop": self.sr_sop,
            "hm_series": self.hm_series,
            "hm_sop": self.hm_sop,
        }


def derive_uid(source_uid: str, model_version: str, role: str, *extra: str) -> str:
    """One deterministic ``2.25.`` UID for (source UID, model version, role[, extra])."""
    if not source_uid:
        raise ValueError("source SOP Instance UID is empty")
    return uid_from(source_uid, model_version, role, *extra)


def output_uids(
    source_sop_instance_uid: str, model_version: str, source_version: int = 1
) -> OutputUIDs:
    """The result UIDs of one input instance for one model version (deterministic).

    ``source_version``: which content received under that SOP Instance UID this is (the
    audit row's ``version``). A sender that re-uses a UID for other pixels (a re-processed
    image, a modality that re-sends with the same UID) gets results under new UIDs, so the
    PACS never holds two different objects under one UID and never keeps the first
    verdict where the new content got another; version 1 keys as before."""
    src = str(source_sop_instance_uid).strip()
    if source_version < 1:
        raise ValueError(f"source version must be >= 1, not {source_version}")
    extra = () if source_version == 1 else (f"source-version-{source_version}",)

    def uid(role: str) -> str:
        return derive_uid(src, model_version, role, *extra)

    return OutputUIDs(
        sc_series=uid("SC-series"),
        sc_sop=uid("SC-instance"),
        sr_series=uid("SR-series"),
        sr_sop=uid("SR-instance"),
        hm_series=uid("HM-series"),
        hm_sop=uid("HM-instance"),
    )


def is_valid_uid(uid: str) -> bool:
    """PS3.5 9.1: digits and dots, no leading zero in a component, at most 64 chars."""
    return 0 < len(uid) <= 64 and bool(_UID_RE.match(uid))
