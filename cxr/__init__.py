"""cxr-triage: chest X-ray COVID-19 triage beside the PACS.

Research use only, not for diagnostic use.
"""

__version__ = "0.1.0"
DISCLAIMER = "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE"
