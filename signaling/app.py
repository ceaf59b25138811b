"""The aiohttp application: websocket signaling at /ws, health, and the bundled page at /."""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, web

from sfu import aiortc_adapter
from turn import credentials as turn_credentials

from .config import Settings
from .room import RoomRegistry
from .session import Session

logger = logging.getLogger("chorus.app")

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", RoomRegistry)
WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet[web.WebSocketResponse])


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    settings = request.app[SETTINGS]
    ws = web.WebSocketResponse(heartbeat=15.0, max_msg_size=settings.max_message_bytes)
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    session = Session(ws, request.app[REGISTRY], ice_servers=lambda identity: ice_servers_for(settings, identity),
                      remote=request.remote)
    try:
        await session.run()
    finally:
        request.app[WEBSOCKETS].discard(ws)
    return ws


def ice_servers_for(settings: Settings, identity: str) -> list[dict[str, Any]]:
    """What a joining participant gets as ``ice_servers``: configured entries, STUN, TURN with fresh
    credentials minted for ``identity``."""
    return list(settings.ice_servers) + turn_credentials.ice_servers(
        identity=identity,
        turn_secret=settings.turn_secret,
        turn_urls=settings.turn_urls,
        stun_urls=settings.stun_urls,
        ttl=settings.turn_ttl,
    )


async def healthz(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    return web.json_response(
        {"status": "ok", "rooms": len(registry.rooms), "peers": sum(len(r.sessions) for r in registry.rooms.values())}
    )


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(_web_root(request.app[SETTINGS]) / "index.html")


def _web_root(settings: Settings) -> Path:
    return settings.web_root or WEB_ROOT


async def media_plane(app: web.Application) -> AsyncIterator[None]:
    """Check the aiortc internals we rely on, choose ICE host addresses; close every room on shutdown."""
    settings = app[SETTINGS]
    await aiortc_adapter.check()
    aiortc_adapter.set_host_addresses(settings.ice_host_addresses)
    yield
    await app[REGISTRY].close()


async def close_websockets(app: web.Application) -> None:
    for ws in set(app[WEBSOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings()
    app = web.Application(client_max_size=settings.max_message_bytes)
    app[SETTINGS] = settings
    app[REGISTRY] = RoomRegistry()
    app[WEBSOCKETS] = weakref.WeakSet()
    app.cleanup_ctx.append(media_plane)
    app.on_shutdown.append(close_websockets)
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", index)
    app.router.add_static("/", _web_root(settings), show_index=False)
    return app
