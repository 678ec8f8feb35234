"""Export: delivering result objects (and, optionally, originals) to DICOM destinations."""
