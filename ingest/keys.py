"""
Stream keys that every listener can check, from any thread.

SRT checks its key inside libsrt's handshake thread, synchronously, while the event loop may be running
anything; RTMP checks at ``publish`` on the event loop. :class:`StreamKeys` serves both: writers (the event
loop, when an ingress is created or revoked) build a new dictionary under a lock and swap the reference in one
assignment; readers take the reference once and look up, without a lock and without waiting for the loop.
Keys are kept as SHA-256 digests, so the map holds no usable secret and a lookup's timing says nothing about
how much of a wrong key was right.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from typing import Any


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_digest(key: str) -> str:
    """The hex SHA-256 digest of a stream key: what is stored on disk and in Redis instead of the key."""
    return _digest(key).hex()


class StreamKeys:
    """
    A thread-safe map from stream key to grant (whatever the caller wants back: an ingress record, an id).

    ``check`` may be called from any thread at any time; ``add``, ``revoke`` and ``replace`` may be called from
    any thread too (they serialize among themselves).
    """

    __slots__ = ("_lock", "_grants")

    def __init__(self, keys: Mapping[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        self._grants: dict[bytes, Any] = {_digest(k): v for k, v in (keys or {}).items()}

    def __len__(self) -> int:
        return len(self._grants)

    def check(self, key: str) -> Any:
        """The grant of ``key``, or ``None`` if it is unknown or revoked."""
        if not key:
            return None
        return self._grants.get(_digest(key))

    def add(self, key: str, grant: Any) -> None:
        if not key or grant is None:
            raise ValueError("a stream key needs a non-empty key and a grant")
        with self._lock:
            self._grants = {**self._grants, _digest(key): grant}

    def revoke(self, key: str) -> bool:
        """Forget ``key``; whether it was known. Publishers already connected are not affected."""
        with self._lock:
            digest = _digest(key)
            if digest not in self._grants:
                return False
            self._grants = {k: v for k, v in self._grants.items() if k != digest}
            return True

    def replace(self, keys: Mapping[str, Any]) -> None:
        """Swap in a whole new set (after loading from disk or Redis)."""
        fresh = {_digest(k): v for k, v in keys.items()}
        with self._lock:
            self._grants = fresh

    def replace_digests(self, digests: Mapping[str, Any]) -> None:
        """Swap in a whole new set given as :func:`key_digest` values (what the ingress store keeps).

        :raises ValueError: a digest is not 64 hex digits."""
        fresh = {}
        for digest, grant in digests.items():
            raw = bytes.fromhex(digest)
            if len(raw) != 32 or grant is None:
                raise ValueError("a stream key digest is 32 bytes in hex, with a grant")
            fresh[raw] = grant
        with self._lock:
            self._grants = fresh

    async def authorize_rtmp(self, app: str, stream_name: str, remote: tuple[str, int]) -> Any:
        """An :data:`.rtmp.Authorize` callback: the stream name is the key, whatever the application."""
        return self.check(stream_name.split("?", 1)[0])
