"""Identifiers of media-plane objects: a short prefix naming the kind, then 48 random bits; and safe names."""

from __future__ import annotations

import re
import secrets

#: A name that is safe as one path segment (a room's HLS URL, its recordings folder): letters, digits, ``_``,
#: ``-`` and ``.``, 1-64 characters, not starting with ``.`` (so never ``.`` or ``..``), nothing that needs
#: URL encoding.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def new_id(prefix: str) -> str:
    """``p-1a2b3c4d5e6f`` for ``prefix="p"``."""
    return f"{prefix}-{secrets.token_hex(6)}"


def is_safe_name(name: str) -> bool:
    """Whether ``name`` matches :data:`SAFE_NAME` entirely."""
    return SAFE_NAME.fullmatch(name) is not None
