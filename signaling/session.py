"""One websocket connection: reads requests, dispatches them by method name, writes responses/events."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from chorus.sfu import MODES, ChorusError, McuOptions, Peer, new_id
from chorus.sfu.logs import PeerLogger

from . import protocol
from .auth import Grants, forbidden
from .chat import check_text
from .cluster import Cluster, Redirect
from .config import Settings
from .drain import Drain
from .limits import RateLimiter
from .protocol import ProtocolError, bad_request, get_bool, get_optional_str, get_sdp, get_str
from .room import TRACK_SOURCES, Room, RoomRegistry

logger = logging.getLogger("chorus.session")

#: Notifications queued for a client that does not read them; past this the session is closed.
MAX_PENDING_NOTIFICATIONS = 2000
#: Close code of a websocket that did not join a room within ``join_timeout`` (reason "join timeout").
CLOSE_JOIN_TIMEOUT = 4008

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Session:
    """
    The server side of one websocket: one session, at most one peer at a time.

    Requests are handled one at a time, in order. Notifications go through a bounded queue drained by a
    writer task, so media-plane callbacks never wait on a slow client. Both tasks belong to the session's
    TaskGroup; when the socket closes, the peer leaves its room.
    """

    def __init__(self, ws: web.WebSocketResponse, registry: RoomRegistry, settings: Settings, *,
                 ice_servers: Callable[[str], list[dict[str, Any]]], verify_token: Callable[[object], Grants],
                 remote: str | None, join_limiter: RateLimiter | None = None, cluster: Cluster | None = None,
                 drain: Drain | None = None, on_error: Callable[[str], None] = lambda code: None,
                 on_join_timeout: Callable[[], None] = lambda: None) -> None:
        self.cluster = cluster
        self.drain = drain
        self._on_join_timeout = on_join_timeout
        #: when this session last had no peer (it must join within ``join_timeout`` of it)
        self._idle_since = time.monotonic()
        self._handling = False
        self.ws = ws
        self.registry = registry
        self.settings = settings
        self.remote = remote or "?"
        self._join_limiter = join_limiter
        self.room: Room | None = None
        self.peer: Peer | None = None
        self.grants: Grants | None = None
        self._verify_token = verify_token
        self._on_error = on_error
        self.log = PeerLogger(logger, remote=remote)
        self._ice_servers = ice_servers
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self._handlers: dict[str, Handler] = {
            "join": self.on_join,
            "publish": self.on_publish,
            "answer": self.on_answer,
            "trickle": self.on_trickle,
            "mute": self.on_mute,
            "set_preferences": self.on_set_preferences,
            "leave": self.on_leave,
            "ping": self.on_ping,
            "chat": self.on_chat,
            "unpublish": self.on_unpublish,
        }

    # --- outgoing ------------------------------------------------------------------------------------

    def notify(self, method: str, data: dict[str, Any]) -> None:
        """Queue a notification for the client (never blocks)."""
        self._send(protocol.notification(method, data))

    def _send(self, text: str) -> None:
        if self._outbox.qsize() >= MAX_PENDING_NOTIFICATIONS:
            self.log.warning("client does not read its messages, closing")
            self._outbox.put_nowait(None)
            return
        self._outbox.put_nowait(text)

    async def _writer(self) -> None:
        while (text := await self._outbox.get()) is not None:
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                break
        await self.ws.close()

    # --- main loop -------------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                writer = tasks.create_task(self._writer(), name="ws writer")
                watchdog = tasks.create_task(self._join_watchdog(), name="ws join timeout")
                await self._reader()
                watchdog.cancel()
                self._outbox.put_nowait(None)
                await writer
        finally:
            await self._leave("drained" if self.drain is not None and self.drain.draining else "disconnected")

    async def _join_watchdog(self) -> None:
        """Close the websocket once it has spent ``join_timeout`` seconds without a peer (never joined, or
        left and stayed): an idle socket holds a connection slot and memory for nothing."""
        timeout = self.settings.join_timeout
        while True:
            idle_for = time.monotonic() - self._idle_since
            if self.peer is None and not self._handling and idle_for >= timeout:
                self.log.info("closing a websocket that did not join", timeout_s=timeout)
                self._on_join_timeout()
                await self.ws.close(code=CLOSE_JOIN_TIMEOUT, message=b"join timeout")
                return
            await asyncio.sleep(max(0.05, timeout - idle_for) if self.peer is None else timeout)

    async def _reader(self) -> None:
        async for message in self.ws:
            if message.type == WSMsgType.TEXT:
                await self._handle(message.data)
            elif message.type == WSMsgType.BINARY:
                self._send(protocol.error_response(None, "bad_request", "binary messages are not accepted"))
            elif message.type == WSMsgType.ERROR:
                self.log.info("websocket error", error=str(self.ws.exception()))
                break

    async def _handle(self, text: str) -> None:
        request_id: int | None = None
        self._handling = True
        try:
            limit = self.settings.max_message_bytes
            if len(text) > limit or (len(text) * 4 > limit and len(text.encode("utf-8", "replace")) > limit):
                # Read (up to max_frame_bytes) but not parsed: refused, and the socket stays open.
                request_id = protocol.peek_id(text)
                raise ProtocolError("limit_exceeded", f"the message is larger than {limit} bytes")
            request = protocol.parse_request(text)
            request_id = request.id
            handler = self._handlers.get(request.method)
            if handler is None:
                raise ProtocolError("unknown_method", f"unknown method {request.method[:64]!r}")
            data = await handler(request.data)
            self._send(protocol.response(request_id, data))
        except ChorusError as exc:
            request_id = getattr(exc, "request_id", request_id)
            self._on_error(exc.code)
            extra = {"url": exc.url} if isinstance(exc, Redirect) else None
            self._send(protocol.error_response(request_id, exc.code, exc.reason, extra))
        except Exception:
            self.log.error("request failed", exc_info=True, request=request_id)
            self._on_error("internal_error")
            self._send(protocol.error_response(request_id, "internal_error", "the server failed to handle this"))
        finally:
            self._handling = False

    # --- helpers ---------------------------------------------------------------------------------------

    def _joined(self) -> tuple[Room, Peer]:
        if self.room is None or self.peer is None:
            raise ProtocolError("invalid_state", "join a room first")
        return self.room, self.peer

    def removed(self, reason: str) -> None:
        """The server took this session's peer out of its room (kicked, failed, room closed)."""
        self.room = self.peer = None
        self.grants = None
        self._idle_since = time.monotonic()
        self.notify("left", {"reason": reason})

    async def _leave(self, reason: str) -> None:
        room, peer = self.room, self.peer
        self.room = self.peer = None
        self._idle_since = time.monotonic()
        if room is not None and peer is not None:
            await room.leave(peer.id, reason)

    # --- methods ---------------------------------------------------------------------------------------

    async def on_join(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.peer is not None:
            raise ProtocolError("invalid_state", "already joined; leave first")
        version = data.get("v", protocol.PROTOCOL_VERSION)
        if version != protocol.PROTOCOL_VERSION:
            raise ProtocolError("unsupported_version", f"protocol version {version!r} is not supported; use 1")
        if self._join_limiter is not None and not self._join_limiter.allow(self.remote):
            raise ProtocolError("rate_limited", "too many joins from your address; slow down")
        room_id = get_str(data, "room", max_len=64)
        if not protocol.ROOM_RE.match(room_id):
            raise bad_request("'room' must be a safe path segment: 1-64 letters, digits, '_', '-' or '.', "
                              "not starting with '.'")
        name = get_optional_str(data, "name", max_len=64) if data.get("name") != "" else None
        # The token is checked before anything is allocated for this participant.
        grants = self._verify_token(data.get("token"))
        grants.check_room(room_id)
        # Who this is: the token's identity, or (dev mode) one the client states. A second join with the
        # same identity replaces the first (a client reconnecting before its old session timed out).
        identity = grants.identity or get_optional_str(data, "identity", max_len=64)
        name = name or grants.name or grants.identity
        if not name:
            raise bad_request("'name' must be a non-empty string")
        # The room's mode (and MCU composite options) apply when this join creates the room; joining an
        # existing room in another mode is invalid_state.
        mode = data.get("mode")
        if mode is not None and mode not in MODES:
            raise bad_request("'mode' must be \"sfu\" or \"mcu\"")
        try:
            mcu = McuOptions.from_dict(data["mcu"]) if data.get("mcu") is not None else None
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        if self.drain is not None and self.drain.draining:
            # Shutting down: in a cluster, send the client to the node that now hosts the room.
            if self.cluster is not None:
                url = await self.cluster.place(room_id, hosted_here=False)
                if url is not None:
                    raise Redirect(room_id, url)
            self.drain.refuse("new joins")
        if self.cluster is not None:
            # Rooms live on one node of the cluster: join there (the client follows the redirect).
            url = await self.cluster.place(room_id, hosted_here=room_id in self.registry.rooms)
            if url is not None:
                raise Redirect(room_id, url)
        # Read before joining: nothing may be awaited between joining and answering, or the first subscribe
        # offer (sent by the new peer's negotiation task) could overtake the join response.
        nodes = await self.cluster.node_urls() if self.cluster is not None else []
        room = self.registry.get_or_create(room_id, mode=mode, mcu=mcu)
        peer_id = new_id("p")
        peer = await room.join(self, peer_id, name, identity=identity, subscribe=grants.can_subscribe,
                               metadata=grants.metadata)
        others = room.describe_peers(exclude=peer.id)
        self.log = self.log.bind(room=room_id, peer=peer_id)
        self.room = room
        self.grants = grants
        self.peer = peer
        return {
            "v": protocol.PROTOCOL_VERSION,
            "peer_id": peer_id,
            "room": room_id,
            "mode": room.mode,
            "peers": others,
            "ice_servers": self._ice_servers(peer_id),
            "can_publish": grants.can_publish,
            "can_subscribe": grants.can_subscribe,
            "nodes": nodes,
            "metadata": room.metadata,
            "own_metadata": room.peer_metadata.get(peer_id, {}),
            "chat": room.chat_history(peer_id),
            "active_speakers": room.router.active_speakers(),
        }

    async def on_publish(self, data: dict[str, Any]) -> dict[str, Any]:
        room, peer = self._joined()
        if self.grants is not None and not self.grants.can_publish:
            raise forbidden("your token does not grant publishing")
        sdp = get_sdp(data, "offer", max_len=self.settings.max_sdp_bytes, max_lines=self.settings.max_sdp_lines)
        sources = data.get("sources")
        if sources is not None:
            if (not isinstance(sources, dict) or len(sources) > 64
                    or not all(isinstance(k, str) and len(k) <= 32 and v in TRACK_SOURCES for k, v in sources.items())):
                raise bad_request(f"'sources' must map m-section ids to one of {', '.join(TRACK_SOURCES)}")
            room.label_tracks(peer.id, sources)
        answer, producers = await peer.publish(sdp, max_tracks=room.max_tracks_per_peer
                                               or self.settings.max_tracks_per_peer)
        return {
            "type": "answer",
            "sdp": answer,
            "tracks": [{"id": p.id, "kind": p.kind, "mid": p.mid} for p in producers],
        }

    async def on_answer(self, data: dict[str, Any]) -> dict[str, Any]:
        _, peer = self._joined()
        await peer.answer(get_sdp(data, "answer", max_len=self.settings.max_sdp_bytes,
                                  max_lines=self.settings.max_sdp_lines))
        return {}

    async def on_trickle(self, data: dict[str, Any]) -> dict[str, Any]:
        _, peer = self._joined()
        target = data.get("target")
        if target not in ("publish", "subscribe"):
            raise bad_request("'target' must be \"publish\" or \"subscribe\"")
        candidate = data.get("candidate")
        if candidate is not None and not isinstance(candidate, dict):
            raise bad_request("'candidate' must be an object or null")
        if candidate is not None:
            if not isinstance(candidate.get("candidate", ""), str) or len(candidate.get("candidate", "")) > 1024:
                raise bad_request("'candidate.candidate' must be a string of at most 1024 characters")
            mline = candidate.get("sdpMLineIndex")
            if mline is not None and (type(mline) is not int or not 0 <= mline < 1024):
                raise bad_request("'candidate.sdpMLineIndex' must be a small integer")
            mid = candidate.get("sdpMid")
            if mid is not None and (not isinstance(mid, str) or len(mid) > 32):
                raise bad_request("'candidate.sdpMid' must be a short string")
        await peer.add_ice_candidate(target, candidate)
        return {}

    async def on_mute(self, data: dict[str, Any]) -> dict[str, Any]:
        room, peer = self._joined()
        track_id = get_str(data, "track_id", max_len=64)
        muted = get_bool(data, "muted")
        producer = peer.set_muted(track_id, muted)
        room.broadcast("track_muted", {"peer_id": peer.id, "track_id": producer.id, "muted": muted},
                       exclude=peer.id)
        return {}

    async def on_set_preferences(self, data: dict[str, Any]) -> dict[str, Any]:
        room, peer = self._joined()
        track_id = get_str(data, "track_id", max_len=64)
        max_height = data.get("max_height")
        if max_height is not None and (type(max_height) is not int or not 0 <= max_height <= 100_000):
            raise bad_request("'max_height' must be a whole number of pixels (0-100000) or null")
        paused = data.get("paused", False)
        if not isinstance(paused, bool):
            raise bad_request("'paused' must be true or false")
        room.router.set_preferences(peer.id, track_id, max_height=max_height or None, paused=paused)
        return {}

    async def on_leave(self, data: dict[str, Any]) -> dict[str, Any]:
        self._joined()
        await self._leave("left")
        return {}

    async def on_ping(self, data: dict[str, Any]) -> dict[str, Any]:
        return {"now": time.time()}

    async def on_unpublish(self, data: dict[str, Any]) -> dict[str, Any]:
        _, peer = self._joined()
        peer.unpublish(get_str(data, "track_id", max_len=64))
        return {}

    async def on_chat(self, data: dict[str, Any]) -> dict[str, Any]:
        room, peer = self._joined()
        try:
            text = check_text(data.get("text"), self.settings.chat_max_bytes)
        except TypeError as exc:
            raise bad_request(str(exc)) from None
        except OverflowError as exc:
            raise ProtocolError("limit_exceeded", str(exc)) from None
        to = get_optional_str(data, "to", max_len=64)
        if not room.chat_allowed(peer.id):
            raise ProtocolError("limit_exceeded", "too many chat messages; slow down")
        return {"message": room.send_chat(peer.id, text, to)}
