"""API tokens and roles: random tokens, shown once, stored only as a SHA-256 hex digest; three ordered roles.

A token is ``secrets.token_urlsafe(32)`` (256 bits), so an unsalted SHA-256 is enough (nothing to
brute-force); lookups go by digest and the final comparison is constant-time.  Never log a token.
Roles are ordered ``submitter`` < ``physicist`` < ``admin`` (:data:`ROLES`, the one definition).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

ROLES = ("submitter", "physicist", "admin")
_RANK = {r: n for n, r in enumerate(ROLES)}


def generate_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(plain: str) -> str:
    return hashlib.sha256(plain.encode("utf-8")).hexdigest()


def digest_matches(plain: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_token(plain), stored_hash)


def check_role(role: str) -> str:
    if role not in _RANK:
        raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    return role


def role_at_least(role: str, needed: str) -> bool:
    """``submitter`` < ``physicist`` < ``admin``: does ``role`` include the rights of ``needed``?"""
    return _RANK.get(role, -1) >= _RANK[check_role(needed)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's name and role, and how the token came (``via``)."""

    name: str
    role: str
    via: Literal["header", "cookie", "disabled"]

    def at_least(self, role: str) -> bool:
        return role_at_least(self.role, role)
