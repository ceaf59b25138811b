"""
Room tokens: HS256 JWTs whose claims grant one identity access to one room.

Claims: ``room``, ``sub`` (identity), ``name`` (optional display name), ``metadata`` (optional JSON object: the
participant's metadata, shown to the room), ``can_publish``, ``can_subscribe``, ``admin``, ``exp``, ``nbf``,
``iat``. Only HS256 is accepted (``alg: none`` and every other algorithm are
rejected), ``exp`` is required, and the secret must be at least 32 bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt

from chorus.sfu.errors import ChorusError

MIN_SECRET_BYTES = 32
ALGORITHM = "HS256"


class AuthError(ChorusError):
    """A missing, malformed, expired or badly signed token (``unauthorized``) or one that does not grant
    what was asked (``forbidden``)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def unauthorized(reason: str) -> AuthError:
    return AuthError("unauthorized", reason)


def forbidden(reason: str) -> AuthError:
    return AuthError("forbidden", reason)


@dataclass(frozen=True)
class Grants:
    """What a verified token allows."""

    identity: str
    room: str | None
    name: str | None = None
    can_publish: bool = True
    can_subscribe: bool = True
    admin: bool = False
    metadata: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    def check_room(self, room: str) -> None:
        if self.room != room and self.room != "*":
            raise forbidden(f"the token grants room {self.room!r}, not {room!r}")


#: Verifies a token (or its absence) and returns its grants.
Verify = Callable[[object], "Grants"]

#: Grants of everyone when auth is off (dev mode).
DEV_GRANTS = Grants(identity="", room="*", admin=True)


def check_secret(secret: str) -> None:
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"the auth secret must be at least {MIN_SECRET_BYTES} bytes")


def create_token(
    secret: str,
    *,
    identity: str,
    room: str | None = None,
    name: str | None = None,
    ttl: int = 3600,
    can_publish: bool = True,
    can_subscribe: bool = True,
    admin: bool = False,
    not_before: float | None = None,
    now: float | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Sign a token. ``room=None`` with ``admin=True`` makes an admin-API-only token; ``room="*"`` any room."""
    check_secret(secret)
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "sub": identity,
        "room": room,
        "can_publish": can_publish,
        "can_subscribe": can_subscribe,
        "admin": admin,
        "iat": issued,
        "nbf": int(not_before) if not_before is not None else issued,
        "exp": issued + ttl,
    }
    if name is not None:
        claims["name"] = name
    if metadata is not None:
        claims["metadata"] = metadata
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: object) -> Grants:
    """
    Verify a token's signature, algorithm and validity period.

    :raises AuthError: ``unauthorized`` with the reason.
    """
    if not isinstance(token, str) or not token:
        raise unauthorized("a room token is required")
    if len(token) > 4096:
        raise unauthorized("the token is too long")
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError:
        raise unauthorized("the token has expired") from None
    except jwt.ImmatureSignatureError:
        raise unauthorized("the token is not valid yet (nbf)") from None
    except jwt.InvalidAlgorithmError:
        raise unauthorized(f"tokens must be signed with {ALGORITHM}") from None
    except jwt.InvalidSignatureError:
        raise unauthorized("the token's signature does not verify") from None
    except jwt.InvalidTokenError as exc:
        raise unauthorized(f"invalid token: {exc}") from None
    identity = claims.get("sub")
    room = claims.get("room")
    if not isinstance(identity, str) or not identity or (room is not None and not isinstance(room, str)):
        raise unauthorized("the token's claims are malformed")
    flags = {k: claims.get(k, default) for k, default in
             (("can_publish", True), ("can_subscribe", True), ("admin", False))}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise unauthorized("the token's grants must be booleans")
    name = claims.get("name")
    metadata = claims.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise unauthorized("the token's metadata must be a JSON object")
    return Grants(identity=identity, room=room, name=name if isinstance(name, str) else None, metadata=metadata,
                  **flags)
