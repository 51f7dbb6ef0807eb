"""DICOM Storage SCP of the chest X-ray triage worker (``cxr node``).

Research use only, not for diagnostic use. See docs/conformance.md.
"""

from dicom_node.node import StorageNode, hash_patient_id

__all__ = ["StorageNode", "hash_patient_id"]
