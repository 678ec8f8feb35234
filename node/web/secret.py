"""The key that signs session cookies: from settings, or generated once per data directory."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from node.config import Settings

KEY_FILE = "web-secret"


def session_secret(settings: Settings) -> str:
    """``web.secret_key`` if set; otherwise ``<data_dir>/web-secret``, created 0600 if missing."""
    if settings.web.secret_key:
        return settings.web.secret_key
    path: Path = settings.storage.data_dir / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secrets.token_urlsafe(48))
    return path.read_text(encoding="ascii").strip()
