"""
Chat: text messages over signaling, to the whole room or to one participant, kept for late joiners.

Why signaling rather than data channels: the server must enforce the size and rate limits and keep the history
anyway, every participant already has the websocket, and aiortc's SCTP would add a data channel per participant to
each connection for a few bytes a minute. A message is plain text: clients must never render it as HTML.

:class:`ChatLog` holds a room's last messages (:data:`HISTORY` by default) and decides who may see each of them:
everyone for a room message; for a private one, its sender and its recipient — by identity, so the same person
rejoining after a reconnection (a new peer id) still sees their private messages.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

#: Messages kept per room for late joiners.
HISTORY = 100
#: The longest message text, in UTF-8 bytes.
MAX_TEXT_BYTES = 4096


@dataclass(frozen=True)
class ChatMessage:
    """One message. ``sender`` is ``None`` for a message from the server (the admin API)."""

    id: str
    sender: str | None
    name: str | None
    to: str | None
    text: str
    ts: float
    #: Identities of sender and recipient (who may see a private message after rejoining); not sent to clients.
    sender_identity: str | None = None
    to_identity: str | None = None

    def public(self) -> dict[str, Any]:
        """The ``chat`` notification's data: ``{id, from, name, to, text, ts}``."""
        return {"id": self.id, "from": self.sender, "name": self.name, "to": self.to, "text": self.text,
                "ts": self.ts}

    def visible_to(self, peer_id: str, identity: str | None) -> bool:
        if self.to is None or peer_id in (self.sender, self.to):
            return True
        return identity is not None and identity in (self.sender_identity, self.to_identity)


class ChatLog:
    """The last ``size`` messages of a room."""

    def __init__(self, size: int = HISTORY) -> None:
        self._messages: deque[ChatMessage] = deque(maxlen=size)
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._messages)

    def add(self, *, sender: str | None, name: str | None, to: str | None, text: str,
            sender_identity: str | None = None, to_identity: str | None = None) -> ChatMessage:
        message = ChatMessage(f"m{next(self._ids)}", sender, name, to, text, round(time.time(), 3),
                              sender_identity, to_identity)
        self._messages.append(message)
        return message

    def history(self, peer_id: str, identity: str | None) -> list[dict[str, Any]]:
        """What a joining participant is given: the kept messages it may see, oldest first."""
        return [m.public() for m in self._messages if m.visible_to(peer_id, identity)]


def check_text(value: object, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """
    The text of a chat message.

    :raises TypeError: not a non-empty string (``bad_request``).
    :raises OverflowError: longer than ``max_bytes`` in UTF-8 (``limit_exceeded``).
    """
    if not isinstance(value, str) or not value.strip():
        raise TypeError("'text' must be a non-empty string")
    # Cheap first: a string of n characters has at least n and at most 4n UTF-8 bytes.
    if len(value) > max_bytes or (len(value) * 4 > max_bytes and len(value.encode("utf-8", "replace")) > max_bytes):
        raise OverflowError(f"'text' is longer than {max_bytes} bytes")
    return value
