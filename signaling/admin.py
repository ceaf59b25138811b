"""
The admin REST API (see docs/admin-api.md). Every route needs ``Authorization: Bearer <token>`` with the
``admin`` grant, unless the server runs in dev mode.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from chorus.egress.errors import EgressError
from chorus.egress.manager import EgressManager, EgressRequest
from chorus.sfu import MODES, ChorusError, McuOptions

from . import resources
from .auth import Verify, forbidden
from .chat import check_text
from .cluster import Cluster, http_base
from .config import Settings
from .protocol import ROOM_RE, ProtocolError, bad_request, get_metadata, get_optional_str
from .room import RoomRegistry

ADMIN_REGISTRY = web.AppKey("admin_registry", RoomRegistry)
ADMIN_VERIFY: web.AppKey[Verify] = web.AppKey("admin_verify")
ADMIN_CLUSTER: web.AppKey[Callable[[], Cluster | None]] = web.AppKey("admin_cluster")
#: ``drain(timeout or None) -> drain state``: starts draining the node (idempotent).
ADMIN_DRAIN: web.AppKey[Callable[[float | None], dict[str, Any]]] = web.AppKey("admin_drain")

#: The longest block the test-only hook accepts (seconds).
MAX_BLOCK = 10.0
ADMIN_SETTINGS = web.AppKey("admin_settings", Settings)
ADMIN_EGRESS: web.AppKey[EgressManager | None] = web.AppKey("admin_egress")

STATUS = {"bad_request": 400, "bad_input": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404,
          "invalid_state": 409, "unsupported_codec": 415, "limit_exceeded": 429, "worker_failed": 502,
          "unavailable": 503, "io_error": 507}


def error(code: str, reason: str) -> web.Response:
    return web.json_response({"error": {"code": code, "reason": reason}}, status=STATUS.get(code, 500))


def local_rooms(registry: RoomRegistry) -> list[dict[str, Any]]:
    rooms = []
    for room in registry.rooms.values():
        counts = room.router.counts()
        rooms.append({"id": room.id, "mode": room.mode, "participants": counts.peers,
                      "tracks": sum(counts.producers.values())})
    return rooms


async def forward(request: web.Request, base_url: str) -> web.Response:
    """Send this admin request on to another node (same method, path, body and Authorization)."""
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, http.request(
        request.method, base_url + request.path_qs, data=await request.read(), headers=headers
    ) as response:
        return web.Response(status=response.status, body=await response.read(),
                            content_type=response.content_type if response.status != 204 else None)


@web.middleware
async def cluster_routing(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
    """A request about a room hosted by another node is answered by that node."""
    room = request.match_info.get("room")
    cluster = request.app[ADMIN_CLUSTER]()
    if room is None or cluster is None or room in request.app[ADMIN_REGISTRY].rooms:
        return await handler(request)
    owner = await cluster.owner(room)
    if owner is None or owner == cluster.node_id:
        return await handler(request)
    node = (await cluster.nodes()).get(owner)
    if node is None:
        return await handler(request)
    return await forward(request, str(node["http"]))


@web.middleware
async def admin_auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
    try:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None
        grants = request.app[ADMIN_VERIFY](token)
        if not grants.admin:
            raise forbidden("the token does not grant admin")
        return await handler(request)
    except ChorusError as exc:
        return error(exc.code, exc.reason)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object.

    :raises ProtocolError: ``bad_request``: not JSON, or not an object."""
    try:
        body: Any = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the body must be JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def optional_int(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise bad_request(f"'{key}' must be an integer from {low} to {high}")
    return value


async def create_room(request: web.Request) -> web.StreamResponse:
    """
    Create a room ahead of time with its mode and limits (201, the room); an existing room in the same mode is
    answered as it is (200), in another mode with 409 ``invalid_state``.
    """
    body = await json_body(request)
    registry = request.app[ADMIN_REGISTRY]
    settings = request.app[ADMIN_SETTINGS]
    room_id = get_optional_str(body, "name", max_len=64)
    if room_id is None or not ROOM_RE.match(room_id):
        raise bad_request("'name' must be 1-64 characters of A-Z a-z 0-9 _ . -")
    mode = body.get("mode", "sfu")
    if mode not in MODES:
        raise bad_request("'mode' must be \"sfu\" or \"mcu\"")
    try:
        mcu = McuOptions.from_dict(body["mcu"]) if body.get("mcu") is not None else None
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    max_participants = optional_int(body, "max_participants", 1, settings.max_peers_per_room)
    max_tracks = optional_int(body, "max_tracks_per_peer", 1, settings.max_tracks_per_peer)
    metadata = get_metadata(body, "metadata", max_bytes=settings.max_metadata_bytes) if "metadata" in body else None
    timeout = body.get("empty_timeout", settings.room_empty_timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout <= 86400:
        raise bad_request("'empty_timeout' must be a number of seconds from 0 to 86400")

    cluster = request.app[ADMIN_CLUSTER]()
    if cluster is not None:
        url = await cluster.place(room_id, hosted_here=room_id in registry.rooms)
        if url is not None:
            return await forward(request, http_base(url))  # the node that hosts (or now will host) it
    existing = registry.rooms.get(room_id)
    if existing is not None:
        if existing.mode != mode:
            raise ProtocolError("invalid_state", f"room {room_id} exists in {existing.mode} mode")
        return web.json_response(existing.describe())
    room = registry.create(room_id, mode=mode, mcu=mcu, max_participants=max_participants,
                           max_tracks_per_peer=max_tracks, metadata=metadata, empty_timeout=float(timeout))
    return web.json_response(room.describe(), status=201)


async def set_room_metadata(request: web.Request) -> web.Response:
    """Replace a room's metadata; every participant gets ``metadata {room}``."""
    room = request.app[ADMIN_REGISTRY].get(request.match_info["room"])
    body = await json_body(request)
    room.set_metadata(get_metadata(body, "metadata", max_bytes=request.app[ADMIN_SETTINGS].max_metadata_bytes))
    return web.json_response({"room": room.id, "metadata": room.metadata})


async def set_participant_metadata(request: web.Request) -> web.Response:
    """Replace a participant's metadata; every participant gets ``metadata {peer_id, metadata}``."""
    room = request.app[ADMIN_REGISTRY].get(request.match_info["room"])
    body = await json_body(request)
    metadata = get_metadata(body, "metadata", max_bytes=request.app[ADMIN_SETTINGS].max_metadata_bytes)
    peer_id = request.match_info["participant"]
    room.set_peer_metadata(peer_id, metadata)
    return web.json_response({"peer_id": peer_id, "metadata": metadata})


async def send_chat(request: web.Request) -> web.Response:
    """A chat message from the server (``from: null``) to the room, or to one participant with ``to``."""
    room = request.app[ADMIN_REGISTRY].get(request.match_info["room"])
    body = await json_body(request)
    try:
        text = check_text(body.get("text"), request.app[ADMIN_SETTINGS].chat_max_bytes)
    except TypeError as exc:
        raise bad_request(str(exc)) from None
    except OverflowError as exc:
        raise ProtocolError("limit_exceeded", str(exc)) from None
    return web.json_response({"message": room.send_chat(None, text, get_optional_str(body, "to", max_len=64))})


async def list_rooms(request: web.Request) -> web.Response:
    """Every room of the cluster (``?scope=local``: only this node's), each with the node hosting it."""
    cluster = request.app[ADMIN_CLUSTER]()
    rooms = local_rooms(request.app[ADMIN_REGISTRY])
    if cluster is None or request.query.get("scope") == "local":
        return web.json_response({"rooms": rooms})
    for room in rooms:
        room["node"] = cluster.node_id
    headers = {"Authorization": request.headers.get("Authorization", "")}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for node_id, node in (await cluster.nodes()).items():
            if node_id == cluster.node_id:
                continue
            try:
                async with http.get(f"{node['http']}/api/rooms?scope=local", headers=headers) as response:
                    for room in (await response.json())["rooms"]:
                        rooms.append({**room, "node": node_id})
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                continue  # a node that just died: its rooms are listed again once they moved
    return web.json_response({"rooms": rooms})


async def list_nodes(request: web.Request) -> web.Response:
    cluster = request.app[ADMIN_CLUSTER]()
    if cluster is None:
        return web.json_response({"nodes": []})
    return web.json_response({"nodes": [{"id": k, **v} for k, v in (await cluster.nodes()).items()]})


async def get_room(request: web.Request) -> web.Response:
    return web.json_response(request.app[ADMIN_REGISTRY].get(request.match_info["room"]).describe())


async def close_room(request: web.Request) -> web.Response:
    room = request.app[ADMIN_REGISTRY].get(request.match_info["room"])
    await room.close("closed by admin")
    return web.Response(status=204)


async def kick(request: web.Request) -> web.Response:
    room = request.app[ADMIN_REGISTRY].get(request.match_info["room"])
    await room.remove(request.match_info["participant"], "kicked")
    return web.Response(status=204)


async def mute_track(request: web.Request) -> web.Response:
    room = request.app[ADMIN_REGISTRY].get(request.match_info["room"])
    body = await json_body(request)
    if not isinstance(body.get("muted"), bool):
        return error("bad_request", "the body must be {\"muted\": true|false}")
    return web.json_response(room.set_muted(request.match_info["track"], body["muted"]))


async def drain_node(request: web.Request) -> web.Response:
    """Drain this node, as SIGTERM does: optional body ``{"timeout": seconds}`` (default ``drain_timeout``)."""
    timeout: float | None = None
    if request.can_read_body:
        try:
            body: Any = await request.json()
        except (ValueError, UnicodeDecodeError):
            return error("bad_request", "the body must be JSON")
        value = body.get("timeout") if isinstance(body, dict) else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            return error("bad_request", "'timeout' must be a number of seconds >= 0")
        timeout = float(value) if value is not None else None
    return web.json_response(request.app[ADMIN_DRAIN](timeout), status=202)


async def block_loop(request: web.Request) -> web.Response:
    """Test-only (``debug_hooks``): block the event loop for ``?seconds=`` (at most 10), as a slow callback
    would."""
    try:
        seconds = float(request.query.get("seconds", "0.5"))
    except ValueError:
        return error("bad_request", "'seconds' must be a number")
    if not 0 <= seconds <= MAX_BLOCK:
        return error("bad_request", f"'seconds' must be from 0 to {MAX_BLOCK:g}")
    time.sleep(seconds)  # blocking on purpose: this is what the loop-lag monitor must see
    return web.json_response({"blocked_s": seconds})


async def process_stats(request: web.Request) -> web.Response:
    """Resource counts of this process, for leak checks: objects, tasks, file descriptors, sockets, memory."""
    return web.json_response(resources.snapshot())


def _egress(request: web.Request) -> EgressManager:
    manager = request.app[ADMIN_EGRESS]
    if manager is None:
        raise EgressError("not_found", "egress is not enabled on this server")
    return manager


async def _json(request: web.Request) -> object:
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        raise EgressError("bad_input", "the body must be JSON") from None


async def start_egress(request: web.Request) -> web.Response:
    """Start an HLS/DASH or recording egress: 201 with its description."""
    egress = await _egress(request).start(EgressRequest.parse(await _json(request)))
    return web.json_response(egress.describe(), status=201)


async def list_egresses(request: web.Request) -> web.Response:
    room = request.query.get("room")
    return web.json_response({"egresses": _egress(request).describe(room)})


async def get_egress(request: web.Request) -> web.Response:
    return web.json_response(_egress(request).get(request.match_info["egress"]).describe())


async def stop_egress(request: web.Request) -> web.Response:
    """Stop an egress: answered once its files are final (playlists ended, recordings indexed)."""
    egress = await _egress(request).stop(request.match_info["egress"])
    return web.json_response(egress.describe())


async def list_recordings(request: web.Request) -> web.Response:
    manager = _egress(request)
    room = request.query.get("room")
    recordings = await asyncio.to_thread(manager.store.listing, room)
    return web.json_response({"recordings": [r.public() for r in recordings]})


async def delete_recording(request: web.Request) -> web.Response:
    manager = _egress(request)
    room, folder = request.match_info["room"], request.match_info["folder"]
    name = request.match_info.get("name")
    busy = {p.name for p in manager.busy_folders()}
    if folder in busy:
        raise EgressError("invalid_state", "that recording is still being written: stop its egress first")
    deleted = manager.store.delete(room, folder, name)
    return web.json_response({"deleted": deleted})


def _no_drain(timeout: float | None) -> dict[str, Any]:
    raise web.HTTPNotImplemented(text="this server cannot drain\n")


def create_admin_app(registry: RoomRegistry, verify: Verify,
                     cluster: Callable[[], Cluster | None] = lambda: None, *,
                     drain: Callable[[float | None], dict[str, Any]] = _no_drain,
                     debug_hooks: bool = False, settings: Settings | None = None,
                     egress: EgressManager | None = None) -> web.Application:
    """The admin API as a sub-application, mounted at ``/api``."""
    app = web.Application(middlewares=[admin_auth, cluster_routing])
    app[ADMIN_REGISTRY] = registry
    app[ADMIN_VERIFY] = verify
    app[ADMIN_CLUSTER] = cluster
    app[ADMIN_DRAIN] = drain
    app.router.add_post("/drain", drain_node)
    if debug_hooks:
        app.router.add_post("/debug/block", block_loop)
    app[ADMIN_SETTINGS] = settings or Settings()
    app[ADMIN_EGRESS] = egress
    app.router.add_post("/egress", start_egress)
    app.router.add_get("/egress", list_egresses)
    app.router.add_get("/egress/{egress}", get_egress)
    app.router.add_delete("/egress/{egress}", stop_egress)
    app.router.add_get("/recordings", list_recordings)
    app.router.add_delete("/recordings/{room}/{folder}", delete_recording)
    app.router.add_delete("/recordings/{room}/{folder}/{name}", delete_recording)
    app.router.add_get("/rooms", list_rooms)
    app.router.add_post("/rooms", create_room)
    app.router.add_post("/rooms/{room}/metadata", set_room_metadata)
    app.router.add_post("/rooms/{room}/participants/{participant}/metadata", set_participant_metadata)
    app.router.add_post("/rooms/{room}/chat", send_chat)
    app.router.add_get("/nodes", list_nodes)
    app.router.add_get("/rooms/{room}", get_room)
    app.router.add_delete("/rooms/{room}", close_room)
    app.router.add_delete("/rooms/{room}/participants/{participant}", kick)
    app.router.add_post("/rooms/{room}/tracks/{track}/mute", mute_track)
    app.router.add_get("/debug/process", process_stats)
    return app

