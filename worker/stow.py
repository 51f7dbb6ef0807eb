"""Delivery of the results to a DICOMweb server: STOW-RS (PS3.18 10.5) via dicomweb-client.

:func:`stow_datasets` POSTs every result of one instance in one multipart request to
``<root>/studies`` of one destination (``dicomweb+http(s)://host:port/root``) and reads
the answer per dataset, in the vocabulary of the C-STORE SCU (:mod:`worker.delivery`):

``success``
    the SOP instance is in the response's ReferencedSOPSequence without a WarningReason
    (or the server answered 200 listing no instance at all: PS3.18 200 = every instance
    stored).
``warning``
    in ReferencedSOPSequence with a WarningReason (0008,1196) (e.g. B000 coercion): the
    server *kept* it, so it counts as delivered, recorded with the warning.
``failure``
    in FailedSOPSequence (its FailureReason (0008,1197) is the audit status), missing from
    the response of a 202 (partial) answer, or an HTTP error status (400, 401/403, 404, 409,
    415, 5xx...): not delivered. A failure in the response body is a failure even when the
    HTTP status is 200/202.
``unreachable``
    no HTTP response: connection refused, DNS, TLS, or the timeout
    (``CXR_DICOMWEB_TIMEOUT``).

Authentication (optional): HTTP basic with ``CXR_DICOMWEB_USERNAME``/``PASSWORD``, or a
bearer token ``CXR_DICOMWEB_TOKEN``. Neither is ever logged or written to the audit DB.
dicomweb-client's own HTTP retries are off: the deliver task retries with its backoff.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import requests
from pydicom import Dataset

from cxr.dimse import status_hex
from worker.delivery import (
    FAILURE_OUTCOME,
    SUCCESS_OUTCOME,
    UNREACHABLE_OUTCOME,
    WARNING_OUTCOME,
    SendOutcome,
)

if TYPE_CHECKING:  # pragma: no cover
    from cxr.settings import DicomWebDestination, Settings

log = logging.getLogger(__name__)

_NO_CHUNKING = 1 << 31  # one request body, no chunked transfer encoding


def _session(settings: Settings) -> requests.Session:
    session = requests.Session()
    session.headers["Accept"] = "application/dicom+json"
    token = settings.dicomweb_token.get_secret_value()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif settings.dicomweb_username:
        session.auth = (
            settings.dicomweb_username,
            settings.dicomweb_password.get_secret_value(),
        )
    if settings.dicomweb_ca is not None:
        session.verify = str(settings.dicomweb_ca)
    return session


def _parse_body(response: requests.Response | None) -> Dataset | None:
    """The STOW-RS response body as a dataset (JSON or XML), None when absent/unreadable."""
    if response is None or not response.content:
        return None
    ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    try:
        if ctype in ("application/dicom+json", "application/json"):
            return Dataset.from_json(json.loads(response.content))
        if ctype in ("application/dicom+xml", "application/xml"):
            from xml.etree.ElementTree import fromstring

            from dicomweb_client.web import _load_xml_dataset

            return _load_xml_dataset(fromstring(response.content))
    except Exception as exc:
        log.warning("unreadable STOW-RS response body (%s)", type(exc).__name__)
    return None


def _items(body: Dataset | None, keyword: str) -> dict[str, Dataset]:
    if body is None:
        return {}
    return {str(item.get("ReferencedSOPInstanceUID", "")): item for item in body.get(keyword, [])}


def _reason_text(code: Any) -> str | None:
    try:
        return status_hex(int(code))
    except (TypeError, ValueError):
        return None


def classify_response(
    dest: str,
    datasets: Sequence[Dataset],
    http_status: int | None,
    body: Dataset | None,
    elapsed_ms: float = 0.0,
) -> list[SendOutcome]:
    """One outcome per dataset from the HTTP status and the STOW-RS response body."""
    referenced = _items(body, "ReferencedSOPSequence")
    failed = _items(body, "FailedSOPSequence")
    http_text = f"HTTP {http_status}" if http_status is not None else None
    ok = http_status is not None and 200 <= http_status < 300
    out: list[SendOutcome] = []
    for ds in datasets:
        uid = str(ds.SOPInstanceUID)
        status, error = http_text, None
        if uid in failed:
            code = failed[uid].get("FailureReason")
            status = _reason_text(code) or http_text
            error = f"in FailedSOPSequence ({http_text}, FailureReason {status})"
            category = FAILURE_OUTCOME
        elif not ok:
            category = FAILURE_OUTCOME
            error = f"{http_text} from the STOW-RS server"
        elif uid in referenced:
            warn = referenced[uid].get("WarningReason")
            if warn is not None:
                category = WARNING_OUTCOME
                status = _reason_text(warn) or http_text
                error = f"stored with WarningReason {status}"
            else:
                category = SUCCESS_OUTCOME
        elif http_status == 200 and not referenced and not failed:
            category = SUCCESS_OUTCOME  # 200 = all stored; the server listed no details
        else:
            category = FAILURE_OUTCOME
            error = f"not acknowledged in the STOW-RS response ({http_text})"
        if category == FAILURE_OUTCOME:
            log.warning("STOW-RS to %s: %s refused (%s)", dest, ds.SOPClassUID, status)
        elif category == WARNING_OUTCOME:
            log.info("STOW-RS to %s: stored with warning %s", dest, status)
        out.append(
            SendOutcome(
                destination=dest,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=uid,
                category=category,
                status=status,
                error=error,
                elapsed_ms=elapsed_ms,
            )
        )
    return out


def stow_datasets(
    destination: DicomWebDestination, datasets: Sequence[Dataset], settings: Settings
) -> list[SendOutcome]:
    """STOW-RS every dataset to one destination in one request; one outcome per dataset,
    in order. Never raises for network or server problems (they are outcomes)."""
    from dicomweb_client.api import DICOMwebClient

    dest = str(destination)
    datasets = list(datasets)
    if not datasets:
        return []
    statuses: list[int] = []

    def _seen(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        statuses.append(response.status_code)

    t0 = time.perf_counter()
    response: requests.Response | None = None
    try:
        client = DICOMwebClient(
            url=destination.url,
            session=_session(settings),
            callback=_seen,
            chunk_size=_NO_CHUNKING,
            timeout=settings.dicomweb_timeout,
        )
        client.set_http_retry_params(retry=False)
        body: Dataset | None = client.store_instances(datasets)
        if body is not None and len(body) == 0:
            body = None
    except requests.HTTPError as exc:
        response = exc.response
        body = _parse_body(response)
        if response is not None:
            statuses.append(response.status_code)
    except requests.RequestException as exc:  # refused, DNS, TLS, timeout
        elapsed = (time.perf_counter() - t0) * 1000
        log.warning("STOW-RS to %s: unreachable (%s)", dest, type(exc).__name__)
        return [
            SendOutcome(
                destination=dest,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                category=UNREACHABLE_OUTCOME,
                error=f"{type(exc).__name__}: no response from the STOW-RS server",
                elapsed_ms=elapsed,
            )
            for ds in datasets
        ]
    elapsed = (time.perf_counter() - t0) * 1000
    http_status = statuses[-1] if statuses else None
    log.debug("STOW-RS to %s: HTTP %s in %.0f ms", dest, http_status, elapsed)
    return classify_response(dest, datasets, http_status, body, elapsed)
