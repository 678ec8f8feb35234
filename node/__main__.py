"""``python -m node ...`` is ``triage-node ...`` (used to start worker processes)."""

from node.cli import main

main()
