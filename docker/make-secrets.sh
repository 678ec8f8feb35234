#!/usr/bin/env bash
# Create the secret files docker-compose.yml mounts, once, on the Docker host.
#
# Compose (without Swarm) bind-mounts secret files with their owner and mode, and
# triage-node refuses a secret readable by group or others. So each file is mode 0600
# and owned by the user that reads it in its container: uid 10001 (triage) for the
# node, web, migrate and worker containers; uid 999 (postgres) for the database password.
# Run as root (or with sudo). Existing files are kept: rotate by deleting one first.
set -euo pipefail
cd "$(dirname "$0")/secrets"
umask 077

TRIAGE_UID=10001
POSTGRES_UID=999
random() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }

make() {  # make NAME OWNER VALUE
    if [ ! -s "$1" ]; then printf '%s\n' "$3" >"$1"; echo "created docker/secrets/$1"; fi
    chmod 600 "$1"
    chown "$2" "$1"
}

[ -s postgres-password ] || random >postgres-password
pw="$(cat postgres-password)"
make postgres-password "$POSTGRES_UID" "$pw"
make database-url "$TRIAGE_UID" "postgresql+psycopg://triage:${pw}@postgres:5432/triage"
make cluster-token "$TRIAGE_UID" "$(random)"
make web-secret-key "$TRIAGE_UID" "$(random)"
