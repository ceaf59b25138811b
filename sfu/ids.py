"""Identifiers of media-plane objects: a short prefix naming the kind, then 48 random bits."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    """``p-1a2b3c4d5e6f`` for ``prefix="p"``."""
    return f"{prefix}-{secrets.token_hex(6)}"
