"""Errors raised by the media plane. Each carries a stable ``code`` that signaling sends to clients."""

from __future__ import annotations


class ChorusError(Exception):
    """Base class: an error a client caused or can act on, with a machine-readable ``code``."""

    code = "internal_error"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidStateError(ChorusError):
    """The operation does not fit the object's current state (closed, not joined, nothing pending)."""

    code = "invalid_state"


class InvalidSdpError(ChorusError):
    """An SDP could not be parsed or applied."""

    code = "invalid_sdp"


class UnsupportedCodecError(ChorusError):
    """No codec of the offer can be forwarded."""

    code = "unsupported_codec"


class NotFoundError(ChorusError):
    """The named object does not exist (or does not belong to the caller)."""

    code = "not_found"


class LimitError(ChorusError):
    """A configured limit would be exceeded (rooms, peers per room, tracks per peer, SDP size)."""

    code = "limit_exceeded"
