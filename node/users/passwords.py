"""Password hashing: Argon2id through pwdlib, parameters and format kept by the library.

Hashes are PHC strings (``$argon2id$v=19$m=...``), so stronger parameters in a later
pwdlib version apply to new hashes while old ones still verify (and are re-hashed on
the next login, see :func:`verify`).
"""

from __future__ import annotations

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

_HASHER = PasswordHash((Argon2Hasher(),))
#: Verified against when the user does not exist, so that a login takes as long
#: for an unknown name as for a wrong password (no user enumeration by timing).
_DUMMY_HASH = _HASHER.hash("no such user")

MIN_LENGTH = 8


class WeakPassword(ValueError):
    """A new password the node refuses (too short)."""


def hash_password(password: str) -> str:
    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"a password needs at least {MIN_LENGTH} characters")
    return _HASHER.hash(password)


def verify(password: str, password_hash: str | None) -> tuple[bool, str | None]:
    """Whether ``password`` matches; and a new hash when the stored one is outdated."""
    if password_hash is None:
        _HASHER.verify(password, _DUMMY_HASH)
        return False, None
    return _HASHER.verify_and_update(password, password_hash)
