"""triage-node: DICOM networking, storage, routing, worklist, web and export."""

__version__ = "0.1.0"
