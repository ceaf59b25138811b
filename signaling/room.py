"""A Room pairs the signaling sessions of its participants with one media-plane Router."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from chorus.sfu import (
    ExternalPeer,
    InvalidStateError,
    LimitError,
    McuOptions,
    McuRouter,
    NotFoundError,
    Peer,
    Router,
    SubscribeOffer,
    TrackInfo,
    Viewer,
)
from chorus.sfu.logs import PeerLogger
from chorus.sfu.tasks import Tasks

logger = logging.getLogger("chorus.room")

#: ``emit(event, data)``: room-level events for webhooks (room_started, room_finished, participant_joined,
#: participant_left, track_published).
Emit = Callable[[str, dict[str, Any]], None]


class Member(Protocol):
    """What a room needs of a participant's signaling session."""

    def notify(self, method: str, data: dict[str, Any]) -> None:
        """Queue a notification for the client (never blocks)."""

    def removed(self, reason: str) -> None:
        """The server took the participant out of the room (kicked, failed, room closed)."""


class Room:
    """
    One room: a Router plus the signaling session (:class:`Member`) of each of its peers.

    It is the router's :class:`~chorus.sfu.RouterObserver`: media-plane events become notifications to the
    participants. When the last peer leaves, the room closes and ``on_empty`` removes it from the registry.
    """

    def __init__(self, room_id: str, on_empty: Callable[[Room], None], emit: Emit, *, max_peers: int = 100,
                 mode: str = "sfu", mcu: McuOptions | None = None) -> None:
        self.id = room_id
        #: ``sfu`` (forward every track) or ``mcu`` (mix on the server); fixed for the room's lifetime.
        self.mode = mode
        self.max_peers = max_peers
        #: identity → peer id, for identities that were stated (token or join)
        self.identities: dict[str, str] = {}
        self.log = PeerLogger(logger, room=room_id)
        router_log = PeerLogger("chorus.sfu", room=room_id)
        self.router: Router = (
            McuRouter(room_id, self, log=router_log, options=mcu)
            if mode == "mcu"
            else Router(room_id, self, log=router_log)
        )
        self.sessions: dict[str, Member] = {}
        #: viewer id → its session (WHEP players: not participants, not announced, do not keep the room open)
        self.viewers: dict[str, Member] = {}
        #: peer id → display name
        self.names: dict[str, str] = {}
        self.closed = False
        self._on_empty = on_empty
        self._emit = emit
        self._tasks = Tasks(f"room {room_id}")

    def broadcast(self, method: str, data: dict[str, Any], *, exclude: str | None = None) -> None:
        for peer_id, session in list(self.sessions.items()):
            if peer_id != exclude:
                session.notify(method, data)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "mode": self.mode, **self.router.describe()}

    # --- membership ------------------------------------------------------------------------------------

    async def join(self, session: Member, peer_id: str, name: str, *, identity: str | None = None,
                   subscribe: bool = True) -> Peer:
        """
        Add a participant for ``session``; the others get ``peer_joined``. A participant already here with
        the same ``identity`` is removed first (reason ``replaced``): it is the same person reconnecting.

        :raises LimitError: the room is full.
        """
        stale = self.identities.get(identity) if identity else None
        if stale is not None and stale in self.sessions:
            await self.remove(stale, "replaced")
        if len(self.sessions) >= self.max_peers:
            raise LimitError(f"room {self.id!r} is full ({self.max_peers} participants)")
        peer = self.router.create_peer(peer_id, name, subscribe=subscribe)
        self.sessions[peer_id] = session
        self.names[peer_id] = name
        if identity:
            self.identities[identity] = peer_id
        self.broadcast("peer_joined", {"peer": peer.describe()}, exclude=peer_id)
        self.log.info("peer joined", peer=peer_id, name=name, peers=len(self.sessions))
        self._emit("participant_joined", {"room": self.id, "participant": {"id": peer_id, "name": name}})
        return peer

    def join_external(self, member: Member, peer_id: str, name: str) -> ExternalPeer:
        """
        Add a participant without a WebRTC connection (an ingested stream, see ``chorus.ingest``): its owner
        publishes its tracks; the others get ``peer_joined`` as for anyone.

        :raises LimitError: the room is full.
        :raises InvalidStateError: the room mixes on the server (MCU), or is closed.
        """
        if self.closed:
            raise InvalidStateError(f"room {self.id!r} is closed")
        if len(self.sessions) >= self.max_peers:
            raise LimitError(f"room {self.id!r} is full ({self.max_peers} participants)")
        peer = self.router.add_external_peer(peer_id, name)
        self.sessions[peer_id] = member
        self.names[peer_id] = name
        self.broadcast("peer_joined", {"peer": peer.describe()}, exclude=peer_id)
        self.log.info("external participant joined", peer=peer_id, name=name, peers=len(self.sessions))
        self._emit("participant_joined", {"room": self.id, "participant": {"id": peer_id, "name": name}})
        return peer

    def add_viewer(self, member: Member, viewer_id: str, name: str) -> Viewer:
        """Add a WHEP viewer (it watches once :meth:`Viewer.watch` answered); ``member.removed`` when it ends.

        :raises InvalidStateError: the room is closed."""
        if self.closed:
            raise InvalidStateError(f"room {self.id!r} is closed")
        viewer = self.router.create_viewer(viewer_id, name)
        self.viewers[viewer_id] = member
        self.log.info("viewer added", viewer=viewer_id, name=name, viewers=len(self.viewers))
        return viewer

    async def remove_viewer(self, viewer_id: str, reason: str) -> bool:
        """Close a viewer (the player deleted its session). Whether it was here."""
        if self.viewers.pop(viewer_id, None) is None:
            return False
        await self.router.remove_viewer(viewer_id)
        self.log.info("viewer removed", viewer=viewer_id, reason=reason, viewers=len(self.viewers))
        return True

    async def leave(self, peer_id: str, reason: str) -> None:
        """Remove a participant: its tracks end for everyone, then ``peer_left``. Idempotent."""
        session = self.sessions.pop(peer_id, None)
        if session is None:
            return
        for identity, holder in list(self.identities.items()):
            if holder == peer_id:
                del self.identities[identity]
        await self.router.remove_peer(peer_id)
        name = self.names.pop(peer_id, None)
        self.broadcast("peer_left", {"peer_id": peer_id, "reason": reason})
        self.log.info("peer left", peer=peer_id, reason=reason, peers=len(self.sessions))
        self._emit("participant_left",
                   {"room": self.id, "reason": reason, "participant": {"id": peer_id, "name": name}})
        if not self.sessions:
            await self.close("empty")

    async def remove(self, peer_id: str, reason: str) -> None:
        """The server removes a participant (kicked, connection failed): its session gets ``left``."""
        session = self.sessions.get(peer_id)
        if session is None:
            raise NotFoundError(f"no participant {peer_id!r} in room {self.id!r}")
        session.removed(reason)
        await self.leave(peer_id, reason)

    def spawn_close(self, reason: str) -> None:
        """Close the room from synchronous code (the task belongs to the room)."""
        if not self._tasks.closed:
            self._tasks.spawn(self.close(reason), name=f"close room {self.id}")

    async def close(self, reason: str = "closed") -> None:
        """Close the room: every participant gets ``left``, the router closes. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for peer_id, session in list(self.sessions.items()):
            session.removed(reason)
            self._emit("participant_left", {"room": self.id, "reason": reason,
                                            "participant": {"id": peer_id, "name": self.names.get(peer_id)}})
        self.sessions.clear()
        self.names.clear()
        for member in list(self.viewers.values()):
            member.removed(reason)
        self.viewers.clear()
        await self.router.close()
        await self._tasks.close()
        self._on_empty(self)

    def set_muted(self, track_id: str, muted: bool) -> dict[str, Any]:
        """Pause or resume a track (admin); everyone, its owner included, gets ``track_muted``."""
        track = self.router.set_muted(track_id, muted)
        data = {"peer_id": track.peer_id, "track_id": track.id, "muted": muted}
        self.broadcast("track_muted", data)
        return data

    # --- RouterObserver --------------------------------------------------------------------------------

    def source_added(self, track: TrackInfo) -> None:
        self.broadcast("track_published", {"peer_id": track.peer_id, "track": track.public()}, exclude=track.peer_id)
        self._emit("track_published", {"room": self.id,
                                       "participant": {"id": track.peer_id, "name": self.names.get(track.peer_id)},
                                       "track": {**track.public(), "codec": track.codec}})

    def layers_wanted(self, track: TrackInfo, rids: list[str]) -> None:
        session = self.sessions.get(track.peer_id)
        if session is not None:
            session.notify("publish_layers", {"track_id": track.id, "active": rids})

    def source_removed(self, track: TrackInfo) -> None:
        self.broadcast("track_unpublished", {"peer_id": track.peer_id, "track_id": track.id}, exclude=track.peer_id)

    def peer_failed(self, peer_id: str, reason: str) -> None:
        async def remove() -> None:
            # The peer may be gone by the time this runs (its websocket closed too): nothing to do then.
            if peer_id in self.sessions:
                await self.remove(peer_id, reason)

        if not self._tasks.closed:
            self._tasks.spawn(remove(), name=f"remove failed peer {peer_id}")

    def viewer_closed(self, viewer_id: str, reason: str) -> None:
        member = self.viewers.pop(viewer_id, None)
        if member is not None:
            self.log.info("viewer ended", viewer=viewer_id, reason=reason, viewers=len(self.viewers))
            member.removed(reason)

    def send_offer(self, peer_id: str, offer: SubscribeOffer) -> None:
        session = self.sessions.get(peer_id)
        if session is not None:
            session.notify("offer", {"type": "offer", "sdp": offer.sdp, "consumers": [t.public() for t in offer.tracks],
                                     "restart": offer.restart})


class RoomRegistry:
    """The rooms of this process (the embedded, single-node registry)."""

    def __init__(self, emit: Emit | None = None, *, max_rooms: int = 1000, max_peers_per_room: int = 100,
                 mcu_defaults: McuOptions | None = None) -> None:
        self.rooms: dict[str, Room] = {}
        self.mcu_defaults = mcu_defaults
        #: called with each room that closes (the cluster releases its placement)
        self.on_room_closed: list[Callable[[Room], None]] = []
        self.max_rooms = max_rooms
        self.max_peers_per_room = max_peers_per_room
        self._emit: Emit = emit or (lambda event, data: None)

    def get(self, room_id: str) -> Room:
        room = self.rooms.get(room_id)
        if room is None:
            raise NotFoundError(f"no room {room_id!r}")
        return room

    def get_or_create(self, room_id: str, *, mode: str | None = None, mcu: McuOptions | None = None) -> Room:
        """The room ``room_id``, created in ``mode`` (default ``sfu``) if it does not exist.

        :raises InvalidStateError: the room exists in another mode than ``mode`` (rooms never switch).
        """
        room = self.rooms.get(room_id)
        if room is not None and mode is not None and mode != room.mode:
            raise InvalidStateError(f"room {room_id} is in {room.mode} mode")
        if room is None:
            if len(self.rooms) >= self.max_rooms:
                raise LimitError(f"this server hosts its maximum of {self.max_rooms} rooms")
            room = self.rooms[room_id] = Room(room_id, on_empty=self._remove, emit=self._emit,
                                              max_peers=self.max_peers_per_room, mode=mode or "sfu",
                                              mcu=mcu or self.mcu_defaults)
            room.log.info("room created", mode=room.mode)
            self._emit("room_started", {"room": room_id})
        return room

    def _remove(self, room: Room) -> None:
        if self.rooms.get(room.id) is room:
            del self.rooms[room.id]
            room.log.info("room closed")
            self._emit("room_finished", {"room": room.id})
            for callback in self.on_room_closed:
                callback(room)

    async def close(self) -> None:
        for room in list(self.rooms.values()):
            await room.close("server shutdown")
