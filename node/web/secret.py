"""The key that signs session cookies: from settings, or generated once per data directory."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from node.config import Settings
from node.errors import ConfigError

KEY_FILE = "web-secret"
#: Shorter keys are refused: an empty or truncated key lets anyone sign a session.
MIN_KEY_CHARS = 32


def session_secret(settings: Settings) -> str:
    """``web.secret_key`` if set; otherwise ``<data_dir>/web-secret``, created 0600 if missing.

    Either must hold at least ``MIN_KEY_CHARS`` characters, or the web application
    does not start (ConfigError) rather than sign cookies with a guessable key.
    """
    if settings.web.secret_key:
        return _checked(settings.web.secret_key, "web.secret_key")
    path: Path = settings.storage.data_dir / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        key = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        key = _create(path)
    return _checked(key, str(path))


def _checked(key: str, where: str) -> str:
    if len(key) < MIN_KEY_CHARS:
        raise ConfigError(
            where,
            [
                f"the session key has {len(key)} characters, at least {MIN_KEY_CHARS} are needed"
                " (delete an empty or truncated web-secret file to generate a new key)"
            ],
        )
    return key


def _create(path: Path) -> str:
    """Write a new key to a temporary file, fsync it, then link it into place.

    A reader sees no file or a whole key, never an empty one (a crash, or another
    process starting at the same time); when two processes race, the first link
    wins and both use its key.
    """
    key = secrets.token_urlsafe(48)
    fd, tmp = tempfile.mkstemp(prefix=f".{KEY_FILE}-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_text(encoding="ascii").strip()
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        os.unlink(tmp)
    return key
