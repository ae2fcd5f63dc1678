"""The tokens table: API tokens stored as SHA-256 digests (:mod:`service.auth`), never in plain text."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TypedDict

from sqlalchemy import select, update

from ..auth import check_role, digest_matches, generate_token, hash_token
from ..models import Token, utcnow
from .db import Database, affected

log = logging.getLogger("service.store")

_TOKEN_TOUCH_EVERY = timedelta(seconds=60)


class TokenInfo(TypedDict):
    """A token as ``voxeldose token list`` shows it (never its digest)."""

    name: str
    role: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    active: bool


class TokenTable:
    """Create, verify, list and revoke tokens."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create_token(self, name: str, role: str) -> str:
        """A new token; the plain text is returned once and only its SHA-256 is stored."""
        check_role(role)
        name = name.strip()
        if not name:
            raise ValueError("a token needs a name")
        plain = generate_token()
        with self.db.write() as s:
            if s.scalars(select(Token).where(Token.name == name, Token.revoked_at.is_(None))).first() is not None:
                raise ValueError(f"an active token named {name!r} exists: revoke it first")
            s.add(Token(name=name, role=role, token_hash=hash_token(plain), created_at=utcnow()))
        log.info("token %r created (role %s)", name, role)
        return plain

    def verify_token(self, plain: str) -> tuple[str, str] | None:
        """``(name, role)`` of an active token, else None."""
        if not plain:
            return None
        digest = hash_token(plain)
        with self.db.read() as s:
            t = s.scalars(select(Token).where(Token.token_hash == digest, Token.revoked_at.is_(None))).first()
            if t is None or not digest_matches(plain, t.token_hash):
                return None
            name, role, last, tid = t.name, t.role, t.last_used_at, t.id
        now = utcnow()
        if last is None or now - last > _TOKEN_TOUCH_EVERY:  # a write at most once a minute per token
            try:
                with self.db.write() as s:
                    s.execute(update(Token).where(Token.id == tid).values(last_used_at=now))
            except Exception:
                log.debug("could not update last_used_at", exc_info=True)
        return name, role

    def list_tokens(self) -> list[TokenInfo]:
        """Every token (never its hash): name, role, created_at, last_used_at, revoked_at, active."""
        with self.db.read() as s:
            rows = s.scalars(select(Token).order_by(Token.created_at, Token.id)).all()
            return [
                {
                    "name": t.name,
                    "role": t.role,
                    "created_at": t.created_at,
                    "last_used_at": t.last_used_at,
                    "revoked_at": t.revoked_at,
                    "active": t.revoked_at is None,
                }
                for t in rows
            ]

    def revoke_token(self, name: str) -> bool:
        """Revoke the active token(s) with this name; False when there was none."""
        with self.db.write() as s:
            n = affected(
                s.execute(
                    update(Token).where(Token.name == name, Token.revoked_at.is_(None)).values(revoked_at=utcnow())
                )
            )
        if n:
            log.info("token %r revoked", name)
        return bool(n)
