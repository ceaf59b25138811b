"""A Room pairs the signaling sessions of its participants with one media-plane Router."""

from __future__ import annotations

import asyncio
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
    quality,
)
from chorus.sfu.logs import PeerLogger
from chorus.sfu.tasks import Tasks

from .chat import ChatLog
from .limits import RateLimiter

logger = logging.getLogger("chorus.room")

#: What a published track is, as its publisher says (``publish.sources``); the default is by kind.
TRACK_SOURCES = ("camera", "microphone", "screen", "screen_audio")


def default_source(kind: str) -> str:
    return "microphone" if kind == "audio" else "camera"

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
    participants. It also holds what only signaling knows: display names, what each track is (camera, screen…),
    room and participant metadata, and the chat (:class:`~.chat.ChatLog`). While anyone is in it, it tells
    everyone each participant's connection quality every :data:`chorus.sfu.quality.INTERVAL` seconds.

    Lifecycle: *open* → *closed*. A room created by a join closes when its last peer leaves; one created ahead
    of time (``empty_timeout`` set, the admin API) stays open that many seconds with nobody in it. ``on_empty``
    removes it from the registry.
    """

    def __init__(self, room_id: str, on_empty: Callable[[Room], None], emit: Emit, *, max_peers: int = 100,
                 mode: str = "sfu", mcu: McuOptions | None = None, metadata: dict[str, Any] | None = None,
                 empty_timeout: float | None = None, max_tracks_per_peer: int | None = None,
                 chat_history: int = 100, chat_rate: float = 5.0, chat_burst: int = 20) -> None:
        self.id = room_id
        #: ``sfu`` (forward every track) or ``mcu`` (mix on the server); fixed for the room's lifetime.
        self.mode = mode
        self.max_peers = max_peers
        #: Tracks one participant may publish here (``None``: the server's setting).
        self.max_tracks_per_peer = max_tracks_per_peer
        #: Seconds the room stays open while empty; ``None``: it closes when the last peer leaves.
        self.empty_timeout = empty_timeout
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
        #: The room's metadata (a JSON object, set through the admin API).
        self.metadata: dict[str, Any] = metadata or {}
        #: peer id → its metadata (from its token, or the admin API).
        self.peer_metadata: dict[str, dict[str, Any]] = {}
        self.chat = ChatLog(chat_history)
        self.closed = False
        self._chat_limiter = RateLimiter(chat_rate, chat_burst)
        self._peer_identity: dict[str, str] = {}
        self._labels: dict[tuple[str, str], str] = {}  # (peer id, mid) → source, as stated at publish
        self._track_sources: dict[str, str] = {}  # track id → source
        self._on_empty = on_empty
        self._emit = emit
        self._tasks = Tasks(f"room {room_id}")
        self._quality_task: asyncio.Task[None] | None = None
        self._empty_timer: asyncio.Task[None] | None = None

    def identity_of(self, peer_id: str) -> str:
        """Who a participant is: its identity (token or join), else its peer id (what egresses follow)."""
        for identity, holder in self.identities.items():
            if holder == peer_id:
                return identity
        return peer_id

    def broadcast(self, method: str, data: dict[str, Any], *, exclude: str | None = None) -> None:
        for peer_id, session in list(self.sessions.items()):
            if peer_id != exclude:
                session.notify(method, data)

    def describe(self) -> dict[str, Any]:
        """The room for the admin API: id, mode, metadata, participants (with their tracks and metadata)."""
        media = self.router.describe()
        media["participants"] = [self.public_peer(p) for p in media.get("participants", [])]
        return {"id": self.id, "mode": self.mode, "metadata": self.metadata, "max_participants": self.max_peers,
                "empty_timeout": self.empty_timeout, **media}

    def public_peer(self, peer: dict[str, Any]) -> dict[str, Any]:
        """A participant as the router describes it, with what signaling knows: metadata, each track's source."""
        tracks = [{**t, "source": self._track_sources.get(t["id"], default_source(t["kind"]))}
                  for t in peer.get("tracks", [])]
        return {**peer, "tracks": tracks, "metadata": self.peer_metadata.get(peer["id"], {})}

    def describe_peers(self, *, exclude: str | None = None) -> list[dict[str, Any]]:
        return [self.public_peer(p) for p in self.router.describe_peers(exclude=exclude)]

    # --- membership ------------------------------------------------------------------------------------

    async def join(self, session: Member, peer_id: str, name: str, *, identity: str | None = None,
                   subscribe: bool = True, metadata: dict[str, Any] | None = None) -> Peer:
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
        self.peer_metadata[peer_id] = metadata or {}
        if identity:
            self.identities[identity] = peer_id
            self._peer_identity[peer_id] = identity
        self._stop_empty_timer()
        if self._quality_task is None and not self._tasks.closed:
            self._quality_task = self._tasks.spawn(self._watch_quality(), name=f"connection quality of {self.id}")
        self.broadcast("peer_joined", {"peer": self.public_peer(peer.describe())}, exclude=peer_id)
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
        self.peer_metadata.pop(peer_id, None)
        self._peer_identity.pop(peer_id, None)
        for key in [k for k in self._labels if k[0] == peer_id]:
            del self._labels[key]
        self.broadcast("peer_left", {"peer_id": peer_id, "reason": reason})
        self.log.info("peer left", peer=peer_id, reason=reason, peers=len(self.sessions))
        self._emit("participant_left",
                   {"room": self.id, "reason": reason, "participant": {"id": peer_id, "name": name}})
        if not self.sessions:
            if self.empty_timeout is None:
                await self.close("empty")
            else:
                self.start_empty_timer()

    async def remove(self, peer_id: str, reason: str) -> None:
        """The server removes a participant (kicked, connection failed): its session gets ``left``."""
        session = self.sessions.get(peer_id)
        if session is None:
            raise NotFoundError(f"no participant {peer_id!r} in room {self.id!r}")
        session.removed(reason)
        await self.leave(peer_id, reason)

    def start_empty_timer(self) -> None:
        """Close the room once it has been empty for ``empty_timeout`` seconds (rooms made ahead of time)."""
        self._stop_empty_timer()
        if self.empty_timeout is not None and not self._tasks.closed:
            self._empty_timer = self._tasks.spawn(self._close_if_still_empty(self.empty_timeout),
                                                  name=f"empty timeout of {self.id}")

    def _stop_empty_timer(self) -> None:
        if self._empty_timer is not None:
            self._empty_timer.cancel()
            self._empty_timer = None

    async def _close_if_still_empty(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._empty_timer = None
        if not self.sessions:
            self.log.info("room empty for its timeout", timeout=delay)
            await self.close("empty")

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

    # --- what signaling alone knows: track sources, metadata, chat ------------------------------------------

    def label_tracks(self, peer_id: str, sources: dict[str, str]) -> None:
        """What the tracks ``peer_id`` is about to publish are, by m-section (``{mid: "screen"}``)."""
        for mid, source in sources.items():
            self._labels[(peer_id, mid)] = source

    def set_metadata(self, metadata: dict[str, Any]) -> None:
        """Replace the room's metadata; everyone gets ``metadata {room}``."""
        self.metadata = metadata
        self.broadcast("metadata", {"room": metadata})

    def set_peer_metadata(self, peer_id: str, metadata: dict[str, Any]) -> None:
        """Replace a participant's metadata; everyone, the participant included, gets ``metadata {peer_id, metadata}``.

        :raises NotFoundError: no such participant."""
        if peer_id not in self.sessions:
            raise NotFoundError(f"no participant {peer_id!r} in room {self.id!r}")
        self.peer_metadata[peer_id] = metadata
        self.broadcast("metadata", {"peer_id": peer_id, "metadata": metadata})

    def chat_allowed(self, peer_id: str) -> bool:
        """Whether ``peer_id`` may send a chat message now (per-participant token bucket, kept across rejoins)."""
        return self._chat_limiter.allow(self._peer_identity.get(peer_id, peer_id))

    def send_chat(self, sender: str | None, text: str, to: str | None = None) -> dict[str, Any]:
        """
        Keep a message and deliver it: to everyone but its sender, or to ``to`` alone. ``sender`` ``None``: from the
        server. Returns the message as delivered (``{id, from, name, to, text, ts}``).

        :raises NotFoundError: ``to`` is not in the room.
        """
        if to is not None and to not in self.sessions:
            raise NotFoundError(f"no participant {to!r} in room {self.id!r}")
        message = self.chat.add(
            sender=sender, name=self.names.get(sender) if sender else None, to=to, text=text,
            sender_identity=self._peer_identity.get(sender) if sender else None,
            to_identity=self._peer_identity.get(to) if to else None,
        )
        data = message.public()
        if to is None:
            self.broadcast("chat", data, exclude=sender)
        elif to != sender:
            self.sessions[to].notify("chat", data)
        return data

    def chat_history(self, peer_id: str) -> list[dict[str, Any]]:
        """The kept messages ``peer_id`` may see (for its join response)."""
        return self.chat.history(peer_id, self._peer_identity.get(peer_id))

    async def _watch_quality(self) -> None:
        while True:
            await asyncio.sleep(quality.INTERVAL)
            if not self.sessions:
                continue
            try:
                peers = [q.public() for q in await self.router.connection_quality()]
            except Exception:  # a connection closing under the statistics must not stop the next samples
                self.log.warning("connection quality sampling failed", exc_info=True)
                continue
            if peers:
                self.broadcast("connection_quality", {"peers": peers})

    def set_muted(self, track_id: str, muted: bool) -> dict[str, Any]:
        """Pause or resume a track (admin); everyone, its owner included, gets ``track_muted``."""
        track = self.router.set_muted(track_id, muted)
        data = {"peer_id": track.peer_id, "track_id": track.id, "muted": muted}
        self.broadcast("track_muted", data)
        return data

    # --- RouterObserver --------------------------------------------------------------------------------

    def source_added(self, track: TrackInfo) -> None:
        source = self._labels.get((track.peer_id, track.mid or ""), default_source(track.kind))
        self._track_sources[track.id] = source
        public = {**track.public(), "source": source}
        self.broadcast("track_published", {"peer_id": track.peer_id, "track": public}, exclude=track.peer_id)
        self._emit("track_published", {"room": self.id,
                                       "participant": {"id": track.peer_id, "name": self.names.get(track.peer_id)},
                                       "track": {**public, "codec": track.codec}})

    def layers_wanted(self, track: TrackInfo, rids: list[str]) -> None:
        session = self.sessions.get(track.peer_id)
        if session is not None:
            session.notify("publish_layers", {"track_id": track.id, "active": rids})

    def source_removed(self, track: TrackInfo) -> None:
        self._track_sources.pop(track.id, None)
        self.broadcast("track_unpublished", {"peer_id": track.peer_id, "track_id": track.id}, exclude=track.peer_id)

    def active_speakers(self, peer_ids: list[str]) -> None:
        self.broadcast("active_speakers", {"peers": peer_ids})

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
                 mcu_defaults: McuOptions | None = None, chat: dict[str, Any] | None = None) -> None:
        self.rooms: dict[str, Room] = {}
        self.mcu_defaults = mcu_defaults
        #: Chat settings of new rooms: ``chat_history``, ``chat_rate``, ``chat_burst`` (see :class:`Room`).
        self.chat = chat or {}
        #: called with each room that closes (the cluster releases its placement, egresses detach)
        self.on_room_closed: list[Callable[[Room], None]] = []
        #: called with each room that opens (egresses waiting for it attach)
        self.on_room_opened: list[Callable[[Room], None]] = []
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
            room = self._create(room_id, mode=mode or "sfu", mcu=mcu)
        return room

    def create(self, room_id: str, *, mode: str = "sfu", mcu: McuOptions | None = None,
               max_participants: int | None = None, max_tracks_per_peer: int | None = None,
               metadata: dict[str, Any] | None = None, empty_timeout: float = 300.0) -> Room:
        """
        Create a room ahead of time (the admin API): it waits ``empty_timeout`` seconds for its first participant,
        and as long again after its last one leaves. ``max_participants`` is capped by the server's limit.

        :raises InvalidStateError: the room exists already.
        :raises LimitError: the server hosts its maximum of rooms.
        """
        if room_id in self.rooms:
            raise InvalidStateError(f"room {room_id} exists")
        peers = min(max_participants or self.max_peers_per_room, self.max_peers_per_room)
        room = self._create(room_id, mode=mode, mcu=mcu, max_peers=peers, max_tracks_per_peer=max_tracks_per_peer,
                            metadata=metadata, empty_timeout=empty_timeout)
        room.start_empty_timer()
        return room

    def _create(self, room_id: str, *, mode: str, mcu: McuOptions | None, **options: Any) -> Room:
        if len(self.rooms) >= self.max_rooms:
            raise LimitError(f"this server hosts its maximum of {self.max_rooms} rooms")
        options.setdefault("max_peers", self.max_peers_per_room)
        room = self.rooms[room_id] = Room(room_id, on_empty=self._remove, emit=self._emit, mode=mode,
                                          mcu=mcu or self.mcu_defaults, **self.chat, **options)
        room.log.info("room created", mode=room.mode)
        self._emit("room_started", {"room": room_id})
        for callback in self.on_room_opened:
            callback(room)
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
