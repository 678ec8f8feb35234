#!/usr/bin/env bash
# Quick start 1: install into .venv (when missing) and run the node on its embedded
# defaults: SQLite and data under ./var, no broker server. Extra arguments go to
# "triage-node serve" (e.g. --config config.toml).
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
cd "$ROOT"
exec "$VENV/bin/triage-node" serve "$@"
