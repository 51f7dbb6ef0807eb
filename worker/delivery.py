"""Delivery of the results to the PACS: a C-STORE SCU (pynetdicom, via :mod:`cxr.scu`).

:func:`store_datasets` opens one association to one destination, proposes a
presentation context for the SOP class of every dataset (Secondary Capture Image Storage,
Comprehensive SR Storage, Segmentation Storage for the heat map) with Explicit and Implicit
VR Little Endian, sends every dataset and classifies what came back:

``success``
    status 0x0000 (PS3.4 B.2.3).
``warning``
    a Warning status (PS3.4 B.2.3: B000 Coercion of Data Elements, B007 Data Set Does Not
    Match SOP Class, B006 Elements Discarded; PS3.7 C: 0001, 0107, 0116): the PACS *kept*
    the object, so it counts as delivered, recorded "with warning".
``failure``
    a Failure status (A7xx Refused: Out of Resources, A9xx Data Set Does Not Match SOP
    Class, Cxxx Cannot Understand, PS3.7 01xx/02xx...) or no presentation context for the
    SOP class (the PACS refuses it). Not delivered.
``unreachable``
    no association: connection refused or timed out, association rejected or aborted,
    no response to the C-STORE (DIMSE timeout, link lost). Not delivered.

The caller (the deliver task) decides on retries: ``failure`` and ``unreachable`` are both
retried with backoff, then the instance ends ``delivery_failed``.

The calling AE title is ``CXR_AE_TITLE``. With ``CXR_DELIVERY_TLS`` the association uses
DICOM TLS: the client certificate ``CXR_TLS_CERT``/``CXR_TLS_KEY`` when set, and the
server certificate is verified against ``CXR_TLS_CA`` when set.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.status import code_to_category

from cxr.dimse import (
    COERCION_OF_DATA_ELEMENTS,
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
    ELEMENTS_DISCARDED,
    SUCCESS,
    status_hex,
    status_name,
)
from cxr.scu import AssociationPool, StoreResult, store_each

if TYPE_CHECKING:  # pragma: no cover
    from cxr.settings import Destination, Settings

log = logging.getLogger(__name__)

# outcome categories (the caller counts them in cxr_deliveries_total{status=...})
SUCCESS_OUTCOME = "success"
WARNING_OUTCOME = "warning"
FAILURE_OUTCOME = "failure"
UNREACHABLE_OUTCOME = "unreachable"
# an optional result (the heat-map Segmentation) whose SOP class the PACS does not take:
# not delivered, not retried, and it does not fail the instance (its SC and SR arrived)
NOT_SUPPORTED_OUTCOME = "not_supported"
OPTIONAL_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4"})  # Segmentation Storage

# the PS3.4 B.2.3 storage warnings, named in logs/audit (other warnings are still warnings)
STORAGE_WARNINGS = frozenset(
    {COERCION_OF_DATA_ELEMENTS, DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING, ELEMENTS_DISCARDED}
)
_TRANSFER_SYNTAXES: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
#: proposed on every delivery association, so that one association (kept open for the
#: next instance) carries whatever results an instance has: SC, Comprehensive SR and the
#: heat-map Segmentation
RESULT_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.66.4",
)


@dataclass
class StoreOutcome:
    """What happened to one dataset sent to one destination."""

    destination: str
    sop_class_uid: str
    sop_instance_uid: str
    category: str  # success / warning / failure / unreachable
    status: int | None = None  # the DIMSE status, None when there was no response
    error: str | None = None  # a short reason (no PHI)
    elapsed_ms: float = 0.0

    @property
    def delivered(self) -> bool:
        """The PACS holds the object (Success or Warning)."""
        return self.category in (SUCCESS_OUTCOME, WARNING_OUTCOME)

    @property
    def status_text(self) -> str | None:
        """``0xB000``-style text for the audit row (``Delivery.last_status``)."""
        return None if self.status is None else status_hex(self.status)


@dataclass
class SendOutcome:
    """What happened to one result sent to a STOW-RS or HL7 destination (same categories
    as :class:`StoreOutcome`; ``status`` is already text: ``HTTP 200``, ``0xA700``,
    ``AA``...)."""

    destination: str
    sop_class_uid: str
    sop_instance_uid: str
    category: str  # success / warning / failure / unreachable
    status: str | None = None
    error: str | None = None  # a short reason (no PHI, no credentials)
    elapsed_ms: float = 0.0

    @property
    def delivered(self) -> bool:
        return self.category in (SUCCESS_OUTCOME, WARNING_OUTCOME)


def classify_status(status: int) -> str:
    """success / warning / failure for a C-STORE response status (PS3.4 B.2.3, PS3.7 C)."""
    if status == SUCCESS:
        return SUCCESS_OUTCOME
    category = code_to_category(status)
    if category == "Warning":
        return WARNING_OUTCOME
    if category == "Success":  # pragma: no cover - only 0x0000 is Success
        return SUCCESS_OUTCOME
    return FAILURE_OUTCOME  # Failure, Cancel, Pending (not valid for C-STORE), Unknown


def tls_context(settings: Settings) -> ssl.SSLContext:
    """Client-side TLS context for result delivery."""
    if settings.tls_ca:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.tls_ca))
        ctx.check_hostname = False  # PACS are usually addressed by IP; the CA is ours
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        log.warning("delivery over TLS without CXR_TLS_CA: the PACS certificate is not verified")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_cert and settings.tls_key:
        ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return ctx


def _make_ae(settings: Settings, sop_classes: Iterable[str]) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.connection_timeout = min(settings.acse_timeout, 30.0)
    ae.requested_contexts = [build_context(uid, _TRANSFER_SYNTAXES) for uid in sop_classes]
    return ae


def _outcome(dest: str, ds: Dataset, res: StoreResult) -> StoreOutcome:
    """A :class:`StoreOutcome` (audit/retry vocabulary) for one shared-loop result."""
    status, error = res.status, res.comment or None
    if res.kind == "status" and status is not None:
        category = classify_status(status)
        if category == SUCCESS_OUTCOME:
            error = None
        else:
            error = status_name(status) + (f": {res.comment}" if res.comment else "")
        if category == WARNING_OUTCOME:
            log.info("delivery to %s: stored with warning %s", dest, status_hex(status))
        elif category == FAILURE_OUTCOME:
            log.warning("delivery to %s: refused with %s", dest, status_hex(status))
    elif res.kind == "not_accepted" and str(ds.SOPClassUID) in OPTIONAL_SOP_CLASSES:
        # a PACS without Segmentation Storage: the SC still shows the heat map
        category = NOT_SUPPORTED_OUTCOME
        error = "the PACS does not take Segmentation Storage: heat map not sent"
        log.warning("delivery to %s: %s (CXR_SEND_HEATMAP=false stops trying)", dest, error)
    elif res.kind == "not_accepted":
        # the PACS accepted no presentation context for this SOP class: it refuses it
        category = FAILURE_OUTCOME
        log.warning("delivery to %s: %s refused: %s", dest, ds.SOPClassUID, res.comment)
    else:  # unreachable, or a local encoding problem (retried like a network failure)
        category = UNREACHABLE_OUTCOME
    return StoreOutcome(
        destination=dest,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        category=category,
        status=status,
        error=error,
        elapsed_ms=res.elapsed_ms,
    )


_pool: AssociationPool | None = None
_pool_lock = threading.Lock()


def delivery_pool(settings: Settings) -> AssociationPool | None:
    """This process's pool of open delivery associations (``CXR_DELIVERY_ASSOCIATION_IDLE``
    seconds each; None when 0). The idle time is kept below half the network timeout, after
    which pynetdicom would abort an idle association itself."""
    global _pool
    idle = min(settings.delivery_association_idle, settings.network_timeout / 2)
    if idle <= 0:
        return None
    with _pool_lock:
        if _pool is None or _pool.idle_seconds != idle:
            if _pool is not None:
                _pool.close_all()
            _pool = AssociationPool(idle)
        return _pool


def close_delivery_pool() -> None:
    """Release the pooled associations (a clean stop)."""
    if _pool is not None:
        _pool.close_all()


def store_datasets(
    destination: Destination, datasets: Sequence[Dataset], settings: Settings
) -> list[StoreOutcome]:
    """C-STORE every dataset to one destination; one :class:`StoreOutcome` per dataset, in
    order. Never raises for network or peer problems (they are outcomes). The association
    comes from :func:`delivery_pool` (kept open for the next instance) unless reuse is off."""
    dest = str(destination)
    datasets = list(datasets)
    if not datasets:
        return []
    sop_classes = list(
        dict.fromkeys([*RESULT_SOP_CLASSES, *(str(ds.SOPClassUID) for ds in datasets)])
    )
    ae = _make_ae(settings, sop_classes)
    tls_args = (tls_context(settings), destination.host) if settings.delivery_tls else None
    t0 = time.perf_counter()
    pool = delivery_pool(settings)
    peer = (ae, destination.host, destination.port, destination.ae_title, datasets)
    if pool is None:
        results = store_each(*peer, load=lambda ds: ds, tls_args=tls_args)
    else:
        # everything the association was negotiated with: reused only for the same key
        key = (
            destination.host,
            destination.port,
            destination.ae_title,
            settings.ae_title,
            tuple(sop_classes),
            settings.delivery_tls,
        )
        results = pool.store_each(key, *peer, load=lambda ds: ds, tls_args=tls_args)
    log.debug(
        "delivery to %s: %d dataset(s) in %.0f ms",
        dest,
        len(datasets),
        (time.perf_counter() - t0) * 1000,
    )
    return [_outcome(dest, ds, res) for ds, res in results]
