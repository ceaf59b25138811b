"""
Signaling's side of ingest: the :class:`~chorus.ingest.IngressManager` built from the settings, the rooms it
joins (:class:`IngestRooms`, its :class:`~chorus.ingest.RoomAccess`), and the admin routes ``/api/ingress``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from chorus.ingest import (
    BridgeSettings,
    FileStore,
    IngestSettings,
    IngressManager,
    IngressMember,
    IngressStore,
    PullSettings,
    RedisStore,
    ReencodeSettings,
    RoomUnavailableError,
)
from chorus.ingest.errors import LimitError as IngestLimitError
from chorus.sfu import ExternalPeer, InvalidStateError, LimitError, new_id

from . import protocol
from .cluster import Cluster, Unavailable, http_base
from .config import Settings
from .room import RoomRegistry


class IngestRooms:
    """The rooms as ingest reaches them: created on demand, placed on this node in a cluster."""

    def __init__(self, registry: RoomRegistry, cluster: Cluster | None) -> None:
        self.registry = registry
        self.cluster = cluster

    async def join(self, room: str, name: str, member: IngressMember) -> ExternalPeer:
        """:raises RoomUnavailableError: see :class:`~chorus.ingest.RoomAccess`."""
        if not protocol.ROOM_RE.match(room):
            raise RoomUnavailableError(f"{room!r} is not a valid room name")
        if self.cluster is not None:
            try:
                url = await self.cluster.place(room, hosted_here=room in self.registry.rooms)
            except Unavailable as e:
                raise RoomUnavailableError(e.reason) from None
            if url is not None:
                raise RoomUnavailableError(f"room {room!r} is hosted by another node ({http_base(url)}): "
                                           "send the stream there")
        try:
            return self.registry.get_or_create(room).join_external(member, new_id("p"), name)
        except (LimitError, InvalidStateError) as e:
            raise RoomUnavailableError(e.reason) from None

    async def leave(self, room: str, peer_id: str, reason: str) -> None:
        target = self.registry.rooms.get(room)
        if target is not None:
            await target.leave(peer_id, reason)


def local_host(host: str) -> str:
    """A listen address as a URL host: loopback for the wildcard addresses, brackets around IPv6."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def public_http_url(settings: Settings) -> str:
    """This server's HTTP base URL as clients reach it (set ``public_url`` when they come from elsewhere)."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    if settings.node_url:
        return http_base(settings.node_url)
    return f"{settings.scheme}://{local_host(settings.host)}:{settings.port}"


def ingest_settings(settings: Settings, node_id: str = "") -> IngestSettings:
    listen = settings.ingest_host or settings.host
    return IngestSettings(
        listen_host=listen,
        public_host=settings.ingest_public_host or local_host(listen),
        http_url=public_http_url(settings),
        rtmp_port=settings.rtmp_port,
        srt_port=settings.srt_port,
        max_live=settings.max_ingresses,
        max_per_address=settings.ingest_max_per_address,
        idle_timeout=settings.ingest_idle_timeout,
        media_root=settings.ingest_media_root,
        bridge=BridgeSettings(passthrough_profiles=frozenset(settings.ingest_passthrough_profiles),
                              reencode=ReencodeSettings(bitrate=settings.reencode_bitrate,
                                                        preset=settings.reencode_preset)),
        pull=PullSettings(media_root=settings.ingest_media_root),
        node_id=node_id,
    )


def build_manager(settings: Settings, registry: RoomRegistry, cluster: Cluster | None,
                  emit: Callable[[str, dict[str, Any]], None]) -> IngressManager:
    """The manager of this node: records in Redis in a cluster, else in the ``ingress_store`` file."""
    store: IngressStore = RedisStore(settings.redis_url) if settings.redis_url else FileStore(
        Path(settings.ingress_store))
    return IngressManager(ingest_settings(settings, cluster.node_id if cluster else ""),
                          IngestRooms(registry, cluster), store=store, on_event=emit)


# --- admin API ---------------------------------------------------------------------------------------------------

ADMIN_INGRESS: web.AppKey[Callable[[], IngressManager | None]] = web.AppKey("admin_ingress")


def _error(status: int, code: str, reason: str) -> web.Response:
    return web.json_response({"error": {"code": code, "reason": reason}}, status=status)


def _manager(request: web.Request) -> IngressManager:
    manager = request.app[ADMIN_INGRESS]()
    if manager is None:
        raise web.HTTPServiceUnavailable(text="ingest is not running\n")
    return manager


async def list_ingress(request: web.Request) -> web.Response:
    """Every ingress with its state, codecs, bit rate and last error; the listeners; recent refusals."""
    return web.json_response(_manager(request).overview())


async def create_ingress(request: web.Request) -> web.Response:
    """``{"kind": "rtmp"|"srt"|"whip"|"url", "room", "name", "url"?}`` → 201 with the URL and stream key."""
    manager = _manager(request)
    try:
        body: Any = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _error(400, "bad_request", "the body must be JSON")
    if not isinstance(body, dict):
        return _error(400, "bad_request", "the body must be a JSON object")
    try:
        room = protocol.get_str(body, "room", max_len=64, pattern=protocol.ROOM_RE)
        name = protocol.get_str(body, "name", max_len=64)
        kind = protocol.get_str(body, "kind", max_len=8)
        url = protocol.get_optional_str(body, "url", max_len=2048)
    except protocol.ProtocolError as e:
        return _error(400, e.code, e.reason)
    try:
        created = await manager.create(kind, room, name, url)
    except ValueError as e:
        return _error(400, "bad_request", str(e))
    except IngestLimitError as e:
        return _error(429, e.code, e.reason)
    return web.json_response(created, status=201)


async def get_ingress(request: web.Request) -> web.Response:
    try:
        return web.json_response(_manager(request).describe(request.match_info["ingress"]))
    except KeyError:
        return _error(404, "not_found", "no such ingress")


async def revoke_ingress(request: web.Request) -> web.Response:
    """Delete an ingress: its key stops working and a running stream ends (``revoked``)."""
    if not await _manager(request).revoke(request.match_info["ingress"]):
        return _error(404, "not_found", "no such ingress")
    return web.Response(status=204)


def add_admin_routes(admin: web.Application, manager: Callable[[], IngressManager | None]) -> None:
    admin[ADMIN_INGRESS] = manager
    admin.router.add_get("/ingress", list_ingress)
    admin.router.add_post("/ingress", create_ingress)
    admin.router.add_get("/ingress/{ingress}", get_ingress)
    admin.router.add_delete("/ingress/{ingress}", revoke_ingress)
