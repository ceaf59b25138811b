"""A Room pairs the signaling sessions of its participants with one media-plane Router."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sfu import Peer, Producer, Router
from sfu.logs import PeerLogger

if TYPE_CHECKING:
    from .session import Session

logger = logging.getLogger("chorus.room")


class Room:
    """
    One room: a Router plus the session of each of its peers.

    It implements :class:`sfu.RouterObserver`: media-plane events become notifications to the other
    participants. When the last peer leaves, the room closes and ``on_empty`` removes it from the registry.
    """

    def __init__(self, room_id: str, on_empty: Callable[[Room], None]) -> None:
        self.id = room_id
        self.log = PeerLogger(logger, room=room_id)
        self.router = Router(room_id, self, log=PeerLogger("chorus.sfu", room=room_id))
        self.sessions: dict[str, Session] = {}
        self._on_empty = on_empty
        self._tasks: set[asyncio.Task[Any]] = set()

    def broadcast(self, method: str, data: dict[str, Any], *, exclude: str | None = None) -> None:
        for peer_id, session in list(self.sessions.items()):
            if peer_id != exclude:
                session.notify(method, data)

    # --- membership ------------------------------------------------------------------------------------

    def join(self, session: Session, peer_id: str, name: str) -> Peer:
        """Add a participant for ``session``; the others get ``peer_joined``."""
        peer = self.router.create_peer(peer_id, name, send_offer=self._send_offer)
        self.sessions[peer_id] = session
        self.broadcast("peer_joined", {"peer": peer.describe()}, exclude=peer_id)
        self.log.info("peer joined", peer=peer_id, name=name, peers=len(self.sessions))
        return peer

    async def leave(self, peer_id: str, reason: str) -> None:
        """Remove a participant: its tracks end for everyone, then ``peer_left``. Idempotent."""
        if self.sessions.pop(peer_id, None) is None:
            return
        await self.router.remove_peer(peer_id)
        self.broadcast("peer_left", {"peer_id": peer_id, "reason": reason})
        self.log.info("peer left", peer=peer_id, reason=reason, peers=len(self.sessions))
        if not self.sessions:
            await self.close()

    async def close(self) -> None:
        await self.router.close()
        for task in self._tasks:
            task.cancel()
        self._on_empty(self)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "peers": [p.describe() for p in self.router.peers.values()]}

    # --- RouterObserver --------------------------------------------------------------------------------

    def producer_added(self, peer: Peer, producer: Producer) -> None:
        self.broadcast(
            "track_published",
            {"peer_id": peer.id, "track": {"id": producer.id, "kind": producer.kind, "muted": producer.paused}},
            exclude=peer.id,
        )

    def producer_closed(self, peer: Peer, producer: Producer) -> None:
        self.broadcast("track_unpublished", {"peer_id": peer.id, "track_id": producer.id}, exclude=peer.id)

    def peer_failed(self, peer: Peer, reason: str) -> None:
        session = self.sessions.get(peer.id)
        if session is not None:
            session.notify("left", {"reason": reason})
        task = asyncio.ensure_future(self.leave(peer.id, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_offer(self, peer: Peer, sdp: str, consumers: list[dict[str, Any]]) -> None:
        session = self.sessions.get(peer.id)
        if session is not None:
            session.notify("offer", {"type": "offer", "sdp": sdp, "consumers": consumers})


class RoomRegistry:
    """The rooms of this process (the embedded, single-node registry)."""

    def __init__(self) -> None:
        self.rooms: dict[str, Room] = {}

    def get_or_create(self, room_id: str) -> Room:
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = Room(room_id, on_empty=self._remove)
            room.log.info("room created")
        return room

    def _remove(self, room: Room) -> None:
        if self.rooms.get(room.id) is room:
            del self.rooms[room.id]
            room.log.info("room closed")

    async def close(self) -> None:
        for room in list(self.rooms.values()):
            await room.close()
