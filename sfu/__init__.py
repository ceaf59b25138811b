"""
Chorus media plane: a selective forwarding unit on top of aiortc.

``Router`` (one per room) → ``Peer`` (one per participant) → ``Producer`` (a published track) →
``Consumer`` (that track forwarded to one subscriber). This package never imports ``signaling``.
"""

from .consumer import Consumer
from .errors import (
    ChorusError,
    InvalidSdpError,
    InvalidStateError,
    LimitError,
    NotFoundError,
    UnsupportedCodecError,
)
from .peer import Peer
from .producer import Producer
from .router import Router, RouterObserver

__all__ = [
    "ChorusError",
    "Consumer",
    "InvalidSdpError",
    "InvalidStateError",
    "LimitError",
    "NotFoundError",
    "Peer",
    "Producer",
    "Router",
    "RouterObserver",
    "UnsupportedCodecError",
]
