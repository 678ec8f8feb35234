"""Ingest: the DICOM C-ECHO/C-STORE SCP and what it does with each received instance."""
