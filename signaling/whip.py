"""
WebRTC over plain HTTP: WHIP (RFC 9725) to publish into a room, WHEP (draft-ietf-wish-whep) to watch one.

Routes (see docs/ingest.md for what clients send):

* ``POST /whip/{room}`` — an SDP offer (``application/sdp``) → ``201`` with the answer, ``Location`` of the
  session, ``ETag``, ``Link`` headers carrying ICE servers (TURN with fresh credentials), ``Accept-Patch``. The
  client becomes a participant of the room (it receives nothing). ``Authorization: Bearer`` takes a room token
  with the publish grant or an ingress stream key (kind ``whip``); in dev mode none is needed and ``?name=``
  names the participant.
* ``POST /whep/{room}`` and ``/whep/{room}/{participant}`` — a receive-only offer → ``201`` with the answer: one
  video and one audio track of the participant named (id or name), else of the one who published video most
  recently; ``409`` + ``Retry-After`` when nothing is live. Bearer: a room token with the subscribe grant.
* ``PATCH …/session/{id}`` — ``application/trickle-ice-sdpfrag`` (RFC 8840): candidates are added → ``204``; new
  ICE credentials (an ICE restart, which aiortc cannot do) → ``422``. ``If-Match`` other than the session's
  ``ETag`` or ``*`` → ``412``.
* ``DELETE …/session/{id}`` → ``200``; a WHIP participant leaves the room at once.
* ``OPTIONS`` on all of them → ``204`` with CORS (and ``Accept-Post: application/sdp`` on the endpoints).

Errors are RFC 9457 problem documents (``application/problem+json``) with a ``code`` member (the same codes as
the websocket protocol, see docs/signaling.md). In a cluster a POST for a room hosted by another node gets
``307`` to that node (RFC 9725 §4.5). Every response carries CORS headers so browser pages on other origins can
use these endpoints. A WHIP session whose media stops for ``ingest_idle_timeout`` seconds is ended (a client that
vanished without DELETE), so are sessions of a client over ``ingest_max_per_address``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from chorus.ingest import EndReason, IngestError, IngestTimeoutError, IngressManager, IngressMember, LiveIngress
from chorus.ingest.errors import UnauthorizedError
from chorus.sfu import (
    ChorusError,
    InvalidSdpError,
    NotFoundError,
    Peer,
    Viewer,
    new_id,
)
from chorus.sfu.logs import PeerLogger
from chorus.sfu.rtp import FORWARDABLE
from chorus.sfu.sdp import parse_sdp
from chorus.sfu.tasks import Tasks

from . import auth, protocol
from .cluster import Cluster, Unavailable, http_base
from .config import Settings
from .room import RoomRegistry

SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"
#: seconds a player is told to wait (``Retry-After``) before asking again when nothing is live
RETRY_AFTER = 5
#: seconds after the answer before a WHIP session without media counts as gone (ICE, DTLS, first packets)
CONNECT_GRACE = 10.0

_STATUS = {"bad_request": 400, "invalid_sdp": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404,
           "not_live": 409, "conflict": 409, "precondition_failed": 412, "payload_too_large": 413,
           "unsupported_media_type": 415, "unsupported_codec": 422, "ice_restart_unsupported": 422,
           "too_many_tracks": 422, "rate_limited": 429, "limit_exceeded": 503, "unavailable": 503}


class HttpError(Exception):
    """An error answered as a problem document."""

    def __init__(self, code: str, detail: str, *, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status or _STATUS.get(code, 500)
        self.headers = headers or {}


def problem(error: HttpError) -> web.Response:
    """An RFC 9457 problem document."""
    body = {"type": f"urn:chorus:error:{error.code}", "title": error.code.replace("_", " "), "status": error.status,
            "detail": error.detail, "code": error.code}
    return web.json_response(body, status=error.status, content_type="application/problem+json",
                             headers=error.headers)


def link_headers(ice_servers: list[dict[str, Any]]) -> list[str]:
    """RFC 9725 §4.6: one ``Link`` per ICE server URL, TURN ones with their credentials."""
    def quoted(value: object) -> str:
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    links = []
    for server in ice_servers:
        urls = server.get("urls", [])
        for url in [urls] if isinstance(urls, str) else urls:
            link = f'<{url}>; rel="ice-server"'
            if server.get("username") is not None and server.get("credential") is not None:
                link += (f"; username={quoted(server['username'])}; credential={quoted(server['credential'])}"
                         '; credential-type="password"')
            links.append(link)
    return links


def check_offer(sdp: str) -> None:
    """
    The WHIP codec gate: at most one audio and one video m-section (RFC 9725 §4.4.2), each offering a codec
    Chorus forwards (Opus; VP8 or H.264). HEVC, AV1 or VP9 only (what OBS may send) is refused whole (§4.4.3).

    :raises HttpError: ``too_many_tracks``, ``unsupported_codec``; :raises InvalidSdpError: unparsable.
    """
    media = [m for m in parse_sdp(sdp).media if m.kind in ("audio", "video")]
    kinds = Counter(m.kind for m in media)
    if not media:
        raise InvalidSdpError("the offer has no audio or video m-section")
    if kinds["audio"] > 1 or kinds["video"] > 1:
        raise HttpError("too_many_tracks", "a WHIP session carries at most one audio and one video track")
    for m in media:
        offered = [c.mimeType for c in m.rtp.codecs if c.name.lower() not in ("rtx", "red", "ulpfec", "flexfec-03")]
        if not any(mime.lower() in FORWARDABLE for mime in offered):
            raise HttpError("unsupported_codec",
                            f"the {m.kind} m-section offers {', '.join(sorted(set(offered))) or 'no codec'}; Chorus "
                            "forwards Opus audio and VP8 or H.264 video (set your encoder to H.264)")


def ice_ufrag(sdp: str) -> str | None:
    for line in sdp.splitlines():
        if line.startswith("a=ice-ufrag:"):
            return line.split(":", 1)[1].strip()
    return None


def parse_sdpfrag(body: str) -> tuple[str | None, list[tuple[str | None, int, str]]]:
    """The ICE ufrag and the candidates (mid, m-line index, candidate line) of a trickle-ice-sdpfrag (RFC 8840).

    :raises HttpError: not a fragment."""
    ufrag: str | None = None
    candidates: list[tuple[str | None, int, str]] = []
    mid: str | None = None
    index = -1
    for raw in body.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("a=ice-ufrag:"):
            ufrag = line.split(":", 1)[1].strip()
        elif line.startswith("m="):
            index += 1
            mid = None
        elif line.startswith("a=mid:"):
            mid = line.split(":", 1)[1].strip()
        elif line.startswith("a=candidate:"):
            candidates.append((mid, max(index, 0), line[2:]))
        elif not line.startswith(("a=", "m=", "c=")):
            raise HttpError("bad_request", f"not a trickle-ice-sdpfrag line: {line[:80]!r}")
    return ufrag, candidates


@dataclass(eq=False)
class HttpSession:
    """One WHIP or WHEP session (the resource at its ``Location``)."""

    id: str
    kind: str  # "whip" | "whep"
    room: str
    remote: str
    etag: str
    remote_ufrag: str | None
    peer: Peer | None = None
    viewer: Viewer | None = None
    live: LiveIngress | None = None
    created: float = field(default_factory=time.monotonic)
    ended: bool = False
    last_bytes: int = -1
    last_change: float = field(default_factory=time.monotonic)

    @property
    def member_id(self) -> str:
        return self.peer.id if self.peer is not None else self.viewer.id if self.viewer is not None else ""

    @property
    def location(self) -> str:
        return f"/{self.kind}/{self.room}/session/{self.id}"


class WebRtcHttp:
    """The WHIP/WHEP endpoints of one app, and their sessions."""

    def __init__(self, settings: Settings, registry: RoomRegistry, *, verify: auth.Verify,
                 ice_servers: Callable[[str], list[dict[str, Any]]], cluster: Cluster | None,
                 ingress: Callable[[], IngressManager | None], draining: Callable[[], bool] = lambda: False,
                 on_error: Callable[[str], None] = lambda c: None) -> None:
        self.settings = settings
        self.registry = registry
        self.verify = verify
        self.ice_servers = ice_servers
        self.cluster = cluster
        self.ingress = ingress
        self.draining = draining
        self.on_error = on_error
        self.sessions: dict[str, HttpSession] = {}
        self.log = PeerLogger("chorus.whip")
        self.tasks = Tasks("whip/whep")

    # --- routing ------------------------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("POST", "/whip/{room}", self._endpoint(self.whip_post))
        app.router.add_route("OPTIONS", "/whip/{room}", self._endpoint(self.options))
        app.router.add_route("POST", "/whep/{room}", self._endpoint(self.whep_post))
        app.router.add_route("OPTIONS", "/whep/{room}", self._endpoint(self.options))
        app.router.add_route("POST", "/whep/{room}/{participant}", self._endpoint(self.whep_post))
        app.router.add_route("OPTIONS", "/whep/{room}/{participant}", self._endpoint(self.options))
        for kind in ("whip", "whep"):
            path = f"/{kind}/{{room}}/session/{{session}}"
            app.router.add_route("PATCH", path, self._endpoint(self.patch))
            app.router.add_route("DELETE", path, self._endpoint(self.delete))
            app.router.add_route("OPTIONS", path, self._endpoint(self.options))
        app.cleanup_ctx.append(self._lifecycle)

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        self.tasks.spawn(self._watchdog(), name="whip watchdog")
        yield
        await self.tasks.close()

    def _endpoint(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                response = await handler(request)
            except HttpError as e:
                self.on_error(e.code)
                response = problem(e)
            except ChorusError as e:
                self.on_error(e.code)
                response = problem(HttpError(e.code, e.reason))
            self._cors(request, response)
            return response

        return wrapped

    def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        allowed = self.settings.allowed_origins
        if allowed is None:
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif origin is not None and origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Expose-Headers"] = "Location, Link, ETag, Accept-Patch, Retry-After"

    async def options(self, request: web.Request) -> web.Response:
        headers = {"Access-Control-Allow-Methods": "POST, PATCH, DELETE, OPTIONS",
                   "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
                   "Access-Control-Max-Age": "86400"}
        if "session" in request.match_info:
            headers["Allow"] = "PATCH, DELETE, OPTIONS"
            headers["Accept-Patch"] = SDPFRAG
        else:
            headers["Allow"] = "POST, OPTIONS"
            headers["Accept-Post"] = SDP
        return web.Response(status=204, headers=headers)

    # --- shared steps -------------------------------------------------------------------------------------------

    def _refuse_if_draining(self) -> None:
        if self.draining():
            raise HttpError("unavailable", "this server is shutting down and takes no new sessions",
                            headers={"Retry-After": str(RETRY_AFTER)})

    def _room_id(self, request: web.Request) -> str:
        room = request.match_info["room"]
        if not protocol.ROOM_RE.match(room):
            raise HttpError("bad_request", f"room names use {protocol.ROOM_RE.pattern}")
        return room

    async def _redirect(self, request: web.Request, room: str, *, place: bool) -> None:
        """In a cluster, a room hosted by another node is served there: 307 (RFC 9725 §4.5)."""
        cluster = self.cluster
        if cluster is None:
            return
        base: str | None = None
        try:
            if place:
                ws_url = await cluster.place(room, hosted_here=room in self.registry.rooms)
                base = http_base(ws_url) if ws_url is not None else None
            elif room not in self.registry.rooms:
                owner = await cluster.owner(room)
                if owner is not None and owner != cluster.node_id:
                    node = (await cluster.nodes()).get(owner)
                    base = str(node["http"]) if node is not None else None
        except Unavailable as e:
            raise HttpError("unavailable", e.reason, headers={"Retry-After": str(RETRY_AFTER)}) from None
        if base is not None:
            raise HttpError("redirect", f"room {room!r} is hosted by {base}", status=307,
                            headers={"Location": base + request.path_qs})

    async def _offer(self, request: web.Request) -> str:
        if request.content_type != SDP:
            raise HttpError("unsupported_media_type", f"the offer must be sent as {SDP}")
        limit = self.settings.max_sdp_bytes
        if request.content_length is not None and request.content_length > limit:
            raise HttpError("payload_too_large", f"an offer may have at most {limit} bytes")
        body = await request.content.read(limit + 1)
        if len(body) > limit:
            raise HttpError("payload_too_large", f"an offer may have at most {limit} bytes")
        try:
            sdp = body.decode()
        except UnicodeDecodeError:
            raise HttpError("invalid_sdp", "the offer is not UTF-8 text") from None
        if not sdp.startswith("v=0") or sdp.count("\n") > self.settings.max_sdp_lines:
            raise HttpError("invalid_sdp", "not an SDP offer (or too many lines)")
        return sdp

    def _bearer(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        return header[7:].strip() or None if header.startswith("Bearer ") else None

    def _grants(self, request: web.Request, room: str, token: str | None, *, publish: bool) -> auth.Grants:
        """Check a room token (dev mode: anything goes) for ``room`` and the grant needed.

        :raises HttpError: unauthorized (with ``WWW-Authenticate``) or forbidden."""
        challenge = {"WWW-Authenticate": 'Bearer realm="chorus"'}
        try:
            grants = self.verify(token)
            grants.check_room(room)
        except auth.AuthError as e:
            raise HttpError(e.code, e.reason, headers=challenge if e.code == "unauthorized" else None) from None
        if publish and not grants.can_publish:
            raise HttpError("forbidden", "the token does not grant publishing")
        if not publish and not grants.can_subscribe:
            raise HttpError("forbidden", "the token does not grant subscribing")
        return grants

    def _check_address(self, remote: str) -> None:
        count = sum(1 for s in self.sessions.values() if s.remote == remote)
        if count >= self.settings.ingest_max_per_address:
            raise HttpError("rate_limited", f"at most {self.settings.ingest_max_per_address} WHIP/WHEP sessions "
                            "per address", headers={"Retry-After": str(RETRY_AFTER)})

    def _created(self, session: HttpSession, answer: str, identity: str) -> web.Response:
        headers = {"Location": session.location, "ETag": session.etag, "Accept-Patch": SDPFRAG,
                   "Content-Type": SDP}
        response = web.Response(status=201, text=answer, headers=headers)
        for link in link_headers(self.ice_servers(identity)):
            response.headers.add("Link", link)
        return response

    def _session(self, request: web.Request, kind: str) -> HttpSession:
        session = self.sessions.get(request.match_info["session"])
        if session is None or session.kind != kind or session.room != request.match_info["room"]:
            raise HttpError("not_found", "no such session (it ended, or never existed)")
        return session

    # --- WHIP -----------------------------------------------------------------------------------------------------

    async def whip_post(self, request: web.Request) -> web.Response:
        self._refuse_if_draining()
        room_id = self._room_id(request)
        await self._redirect(request, room_id, place=True)
        sdp = await self._offer(request)
        remote = request.remote or "?"
        token = self._bearer(request)
        manager = self.ingress()
        record = manager.authorize_key(token, "whip") if manager is not None and token else None
        identity: str | None = None
        if record is not None:
            if record.room != room_id:
                raise HttpError("forbidden", f"this stream key publishes to room {record.room!r}")
            name = record.name
        else:
            try:
                grants = self._grants(request, room_id, token, publish=True)
            except HttpError as e:
                if manager is not None:
                    manager.refuse("whip", (remote, 0), UnauthorizedError(e.detail))
                raise
            identity = grants.identity or None
            name = grants.name or grants.identity or request.query.get("name", "")[:64] or "whip"
        self._check_address(remote)
        check_offer(sdp)

        session = HttpSession(new_id("s"), "whip", room_id, remote, f'"{new_id("e")}"', ice_ufrag(sdp))
        live: LiveIngress | None = None
        if record is not None:
            assert manager is not None
            try:
                live = manager.whip_reserve(record, (remote, 0), lambda: self._stop(session, "stopped"))
            except IngestError as e:
                manager.refuse("whip", (remote, 0), e, record.id)
                code = "conflict" if isinstance(e, UnauthorizedError) else "limit_exceeded"
                raise HttpError(code, e.reason, headers={"Retry-After": str(RETRY_AFTER)}) from None
        try:
            room = self.registry.get_or_create(room_id)
            peer = await room.join(IngressMember(lambda reason: self._removed(session, reason)), new_id("p"), name,
                                   identity=identity, subscribe=False)
        except ChorusError:
            if live is not None and manager is not None:
                manager.whip_failed(live)
            raise
        session.peer, session.live = peer, live
        try:
            answer, _ = await peer.publish(sdp, max_tracks=2)
        except ChorusError:
            if live is not None and manager is not None:
                manager.whip_failed(live)
            session.live = None
            await room.leave(peer.id, "failed")
            raise
        self.sessions[session.id] = session
        if live is not None and manager is not None:
            router = room.router
            manager.whip_started(live, peer.id,
                                 lambda: sum(int(t["bytes"]) for t in router.track_stats(peer.id)),
                                 lambda: {"tracks": router.track_stats(peer.id)})
        self.log.info("whip session started", room=room_id, peer=peer.id, session=session.id, remote=remote,
                      ingress=record.id if record else None)
        return self._created(session, answer, peer.id)

    def _stop(self, session: HttpSession, reason: str) -> None:
        """End a WHIP session from the server side (ingress revoked, server draining)."""
        room = self.registry.rooms.get(session.room)
        if room is not None and session.peer is not None and not self.tasks.closed:
            self.tasks.spawn(room.remove(session.peer.id, reason), name=f"stop whip {session.id}")

    def _removed(self, session: HttpSession, reason: str) -> None:
        """The room removed the participant or viewer (failed, kicked, timed out, room closed)."""
        self._end(session, EndReason.from_error(IngestTimeoutError(reason)) if reason.startswith("timeout")
                  else EndReason("failed" if "failed" in reason else "removed", reason))

    def _end(self, session: HttpSession, reason: EndReason) -> None:
        if session.ended:
            return
        session.ended = True
        self.sessions.pop(session.id, None)
        manager = self.ingress()
        if session.live is not None and manager is not None:
            manager.whip_ended(session.live, reason)
        self.log.info(f"{session.kind} session ended", room=session.room, session=session.id, reason=reason.code)

    # --- WHEP -----------------------------------------------------------------------------------------------------

    async def whep_post(self, request: web.Request) -> web.Response:
        self._refuse_if_draining()
        room_id = self._room_id(request)
        participant = request.match_info.get("participant")
        await self._redirect(request, room_id, place=False)
        sdp = await self._offer(request)
        grants = self._grants(request, room_id, self._bearer(request), publish=False)
        remote = request.remote or "?"
        self._check_address(remote)
        if sum(1 for s in self.sessions.values() if s.kind == "whep") >= self.settings.whep_max_viewers:
            raise HttpError("limit_exceeded", "this server has its maximum of WHEP viewers",
                            headers={"Retry-After": str(RETRY_AFTER)})
        not_live = {"Retry-After": str(RETRY_AFTER)}
        room = self.registry.rooms.get(room_id)
        if room is None:
            raise HttpError("not_live", f"nothing is live in room {room_id!r}", headers=not_live)
        try:
            tracks = room.router.playback_tracks(participant)
        except NotFoundError as e:
            raise HttpError("not_live", e.reason, headers=not_live) from None
        if not tracks:
            raise HttpError("not_live", f"nothing is live in room {room_id!r}", headers=not_live)
        session = HttpSession(new_id("s"), "whep", room_id, remote, f'"{new_id("e")}"', ice_ufrag(sdp))
        name = grants.name or grants.identity or request.query.get("name", "")[:64] or "viewer"
        viewer = room.add_viewer(IngressMember(lambda reason: self._removed(session, reason)), new_id("v"), name)
        session.viewer = viewer
        try:
            answer = await viewer.watch(sdp, [t.id for t in tracks])
        except ChorusError as e:
            await room.remove_viewer(viewer.id, "failed")
            if isinstance(e, NotFoundError):
                raise HttpError("not_live", e.reason, headers=not_live) from None
            raise
        self.sessions[session.id] = session
        self.log.info("whep session started", room=room_id, viewer=viewer.id, session=session.id, remote=remote,
                      tracks=[t.id for t in tracks])
        return self._created(session, answer, viewer.id)

    # --- sessions -------------------------------------------------------------------------------------------------

    async def patch(self, request: web.Request) -> web.Response:
        kind = request.path.split("/", 2)[1]
        session = self._session(request, kind)
        if request.content_type != SDPFRAG:
            raise HttpError("unsupported_media_type", f"PATCH takes {SDPFRAG}")
        if_match = request.headers.get("If-Match")
        if if_match is not None and if_match not in ("*", session.etag):
            raise HttpError("precondition_failed", "the ETag does not match this session's ICE session")
        body = (await request.content.read(self.settings.max_sdp_bytes)).decode(errors="replace")
        ufrag, candidates = parse_sdpfrag(body)
        if ufrag is not None and session.remote_ufrag is not None and ufrag != session.remote_ufrag:
            raise HttpError("ice_restart_unsupported", "ICE restarts are not supported: start a new session")
        for mid, index, line in candidates:
            try:
                candidate = {"candidate": line, "sdpMid": mid, "sdpMLineIndex": index}
                if session.peer is not None:
                    await session.peer.add_ice_candidate("publish", candidate)
                elif session.viewer is not None:
                    await session.viewer.add_ice_candidate(candidate)
            except ChorusError:
                continue  # RFC 9725 §4.3.2: candidates that cannot be used are ignored
        return web.Response(status=204)

    async def delete(self, request: web.Request) -> web.Response:
        kind = request.path.split("/", 2)[1]
        session = self._session(request, kind)
        room = self.registry.rooms.get(session.room)
        self._end(session, EndReason("unpublished", "the client deleted its session") if kind == "whip"
                  else EndReason("stopped", "the player deleted its session"))
        if room is not None:
            if session.peer is not None:
                await room.leave(session.peer.id, "left")
            elif session.viewer is not None:
                await room.remove_viewer(session.viewer.id, "deleted")
        return web.Response(status=200)

    # --- a client that vanished -----------------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        """End WHIP sessions that received nothing for ``ingest_idle_timeout`` seconds (or lost every track)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if session.kind != "whip" or session.peer is None:
                    continue
                room = self.registry.rooms.get(session.room)
                if room is None:
                    continue
                stats = room.router.track_stats(session.peer.id)
                received = sum(int(t["bytes"]) for t in stats)
                if received != session.last_bytes:
                    session.last_bytes, session.last_change = received, now
                    if received:
                        continue
                # never any media: give ICE and DTLS time; media that stopped: the idle timeout
                deadline = session.created + CONNECT_GRACE if received == 0 else \
                    session.last_change + self.settings.ingest_idle_timeout
                if stats and now < deadline:
                    continue
                why = "no tracks left" if not stats else f"no media for {now - session.last_change:.1f} s"
                self.log.info("whip session timed out", room=session.room, session=session.id, detail=why)
                try:
                    await room.remove(session.peer.id, f"timeout: {why}")
                except NotFoundError:
                    self._end(session, EndReason("disconnected", why))
