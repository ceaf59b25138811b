"""
The admin REST API (see docs/admin-api.md). Every route needs ``Authorization: Bearer <token>`` with the
``admin`` grant, unless the server runs in dev mode.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sfu import ChorusError

from . import resources
from .auth import Verify, forbidden
from .room import RoomRegistry

ADMIN_REGISTRY = web.AppKey("admin_registry", RoomRegistry)
ADMIN_VERIFY: web.AppKey[Verify] = web.AppKey("admin_verify")

STATUS = {"bad_request": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404}


def error(code: str, reason: str) -> web.Response:
    return web.json_response({"error": {"code": code, "reason": reason}}, status=STATUS.get(code, 500))


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


async def list_rooms(request: web.Request) -> web.Response:
    rooms = request.app[ADMIN_REGISTRY].rooms.values()
    return web.json_response({"rooms": [
        {"id": r.id, "mode": r.mode, "participants": len(r.router.peers),
         "tracks": sum(1 for _ in r.router.producers())}
        for r in rooms
    ]})


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
    try:
        body: Any = await request.json()
    except (ValueError, UnicodeDecodeError):
        return error("bad_request", "the body must be JSON")
    if not isinstance(body, dict) or not isinstance(body.get("muted"), bool):
        return error("bad_request", "the body must be {\"muted\": true|false}")
    return web.json_response(room.set_muted(request.match_info["track"], body["muted"]))


async def process_stats(request: web.Request) -> web.Response:
    """Resource counts of this process, for leak checks: objects, tasks, file descriptors, sockets, memory."""
    return web.json_response(resources.snapshot())


def create_admin_app(registry: RoomRegistry, verify: Verify) -> web.Application:
    """The admin API as a sub-application, mounted at ``/api``."""
    app = web.Application(middlewares=[admin_auth])
    app[ADMIN_REGISTRY] = registry
    app[ADMIN_VERIFY] = verify
    app.router.add_get("/rooms", list_rooms)
    app.router.add_get("/rooms/{room}", get_room)
    app.router.add_delete("/rooms/{room}", close_room)
    app.router.add_delete("/rooms/{room}/participants/{participant}", kick)
    app.router.add_post("/rooms/{room}/tracks/{track}/mute", mute_track)
    app.router.add_get("/debug/process", process_stats)
    return app

