"""triage-node: models."""
