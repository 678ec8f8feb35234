"""triage-node: workers."""
