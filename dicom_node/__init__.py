"""DICOM Storage SCP of the chest X-ray triage worker (``cxr node``).

Research use only, not for diagnostic use. See docs/conformance.md.
"""

from cxr.contracts import hash_patient_id
from dicom_node.node import StorageNode

__all__ = ["StorageNode", "hash_patient_id"]
