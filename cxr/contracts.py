"""Contracts between the stages, kept in the foundation so that no stage imports another.

* **Queue**: the task names, the queue, and the enqueue call the node and the sweeps use
  (:func:`send_classify`). Tasks carry audit row IDs, never pixel data.
* **Own output markers**: what the results carry (``worker.results``) and what the node's
  filter recognises so that our own SC/SR coming back from the PACS are not classified
  again (``dicom_node.filters``).
* **PatientID hashing**: how the node stores a PatientID and how ``cxr audit`` finds one.

DIMSE status codes are the same kind of contract: :mod:`cxr.dimse`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from celery import Celery

    from cxr.settings import Settings

TASK_CLASSIFY = "cxr.classify_instance"
TASK_DELIVER = "cxr.deliver_instance"
QUEUE = "cxr"

OWN_MANUFACTURER = "cxr-triage"
OWN_SERIES_PREFIX = "AI TRIAGE"
#: ``instances.claimed_by`` of a classified instance whose first delivery sits in a worker
#: process's delivery lane (``worker.lane``); the whole value is that lane's lease name
LANE_OWNER_PREFIX = "lane:"

# do not wait for a dead broker: fail fast, the sweep retries
_SEND_RETRY = {"max_retries": 0, "interval_start": 0, "interval_step": 0, "interval_max": 0}


def send_classify(app: Celery, instance_id: int) -> None:
    """Publish the classify task for one audit row (raises when the broker is down)."""
    app.send_task(
        TASK_CLASSIFY,
        args=[instance_id],
        queue=QUEUE,
        retry=True,
        retry_policy=_SEND_RETRY,
    )


def send_deliver(app: Celery, instance_id: int, attempt: int | None = None) -> None:
    """Publish a delivery task (``attempt`` given: the delivery attempt it will be)."""
    kwargs = {} if attempt is None else {"attempt": attempt}
    app.send_task(TASK_DELIVER, args=[instance_id], kwargs=kwargs, queue=QUEUE)


def hash_patient_id(settings: Settings, patient_id: str) -> str | None:
    """PatientID as stored in the audit DB: HMAC-SHA256 keyed by CXR_PATIENT_ID_SALT
    (default) or plain. Set a secret salt per site: with the default key an ID could be
    recovered by trying candidate IDs (the node warns at start)."""
    if not patient_id:
        return None
    if settings.patient_id_storage == "plain":
        return patient_id
    return hmac.new(
        settings.patient_id_salt.encode(), patient_id.encode(), hashlib.sha256
    ).hexdigest()
