"""
TURN REST API credentials (draft-uberti-behave-turn-rest), as coturn's ``use-auth-secret`` checks them:
``username = "<unix expiry>:<participant>"``, ``password = base64(HMAC-SHA1(secret, username))``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TurnCredential:
    username: str
    password: str
    expires_at: int


def check_secret(secret: str | None) -> str | None:
    """
    The one rule for a TURN shared secret, for the settings and for coturn's rendered config alike.

    :raises ValueError: the secret is empty or starts or ends with whitespace: coturn strips the value it reads,
        so credentials minted with the full secret would never match.
    """
    if secret is not None and (not secret or secret != secret.strip()):
        raise ValueError("turn_secret must be non-empty and have no leading or trailing whitespace")
    return secret


def mint(secret: str, identity: str, ttl: int, *, now: float | None = None) -> TurnCredential:
    """
    Mint a credential for ``identity`` valid for ``ttl`` seconds from ``now``.

    :raises ValueError: ``identity`` contains ``:`` (the separator) or the secret is empty.
    """
    if not secret:
        raise ValueError("TURN secret is empty")
    if ":" in identity:
        raise ValueError("identity must not contain ':'")
    expires_at = int(now if now is not None else time.time()) + ttl
    username = f"{expires_at}:{identity}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return TurnCredential(username, base64.b64encode(digest).decode(), expires_at)


def ice_servers(
    *, identity: str, turn_secret: str | None, turn_urls: list[str], stun_urls: list[str], ttl: int
) -> list[dict[str, Any]]:
    """The ``ice_servers`` list of a join response: STUN URLs, then TURN URLs with fresh credentials."""
    servers: list[dict[str, Any]] = []
    if stun_urls:
        servers.append({"urls": list(stun_urls)})
    if turn_secret and turn_urls:
        credential = mint(turn_secret, identity, ttl)
        servers.append({"urls": list(turn_urls), "username": credential.username, "credential": credential.password})
    return servers
