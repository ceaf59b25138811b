"""The aiohttp application: websocket signaling, admin API, health, metrics, and the bundled page."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, web

from chorus.egress.errors import EgressError
from chorus.egress.manager import EgressConfig, EgressManager, parse_rungs
from chorus.ingest import IngressManager
from chorus.sfu import McuOptions, aiortc_adapter
from chorus.sfu.tasks import Tasks
from chorus.turn import credentials as turn_credentials

from . import auth, forwarded
from .admin import create_admin_app
from .cluster import Cluster
from .config import Settings
from .drain import Drain
from .egress_http import EGRESS, add_routes
from .ingress import add_admin_routes, build_manager
from .limits import ConnectionLimiter, RateLimiter
from .loophealth import LoopMonitor
from .metrics import Metrics
from .room import Room, RoomRegistry
from .session import Session
from .webhooks import WebhookSender
from .whip import WebRtcHttp

logger = logging.getLogger("chorus.app")

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", RoomRegistry)
METRICS = web.AppKey("metrics", Metrics)
WEBHOOKS = web.AppKey("webhooks", WebhookSender)
WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet[web.WebSocketResponse])
READY = web.AppKey("ready", asyncio.Event)
JOIN_LIMITER = web.AppKey("join_limiter", RateLimiter)
CLUSTER: web.AppKey[Cluster | None] = web.AppKey("cluster")
#: The node's drain state and the hook other subsystems subscribe to (see drain.py).
DRAIN = web.AppKey("drain", Drain)
CONNECTIONS = web.AppKey("connections", ConnectionLimiter)
LOOP = web.AppKey("loop", LoopMonitor)
APP_TASKS = web.AppKey("app_tasks", Tasks)
INGRESS = web.AppKey("ingress", IngressManager)
WEBRTC_HTTP = web.AppKey("webrtc_http", WebRtcHttp)


class ConfigError(Exception):
    """Settings that Chorus refuses to run with."""


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


def token_verifier(settings: Settings) -> auth.Verify:
    """Token verification for these settings: real with a secret, allow-all in dev mode."""
    secret = settings.auth_secret
    if secret is None:
        return lambda token: auth.DEV_GRANTS
    return lambda token: auth.verify_token(secret, token)


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    settings = app[SETTINGS]
    origin = request.headers.get("Origin")
    if settings.allowed_origins is not None and origin is not None and origin not in settings.allowed_origins:
        raise web.HTTPForbidden(text=f"origin {origin!r} is not allowed\n")
    remote = forwarded.client_address(request)
    connections = app[CONNECTIONS]
    refused = connections.admit(remote)
    if refused is not None:
        # Refused before the upgrade, at once, and the connection is not kept.
        app[METRICS].refused.labels("per_address" if "address" in refused else "total").inc()
        response = web.json_response({"error": {"code": "too_many_connections", "reason": refused}}, status=429,
                                     headers={"Retry-After": "10"})
        response.force_close()
        return response  # type: ignore[return-value]
    try:
        # Messages up to max_frame_bytes are read; those over max_message_bytes get limit_exceeded (see Session).
        ws = web.WebSocketResponse(heartbeat=15.0,
                                   max_msg_size=max(settings.max_frame_bytes, settings.max_message_bytes))
        await ws.prepare(request)
        app[WEBSOCKETS].add(ws)
        app[METRICS].sessions.inc()
        metrics_ = app[METRICS]
        session = Session(
            ws,
            app[REGISTRY],
            settings,
            ice_servers=lambda identity: ice_servers_for(settings, identity),
            verify_token=token_verifier(settings),
            remote=remote,
            join_limiter=app[JOIN_LIMITER],
            cluster=app[CLUSTER],
            drain=app[DRAIN],
            on_error=lambda code: metrics_.errors.labels(code).inc(),
            on_join_timeout=metrics_.join_timeouts.inc,
        )
        try:
            await session.run()
        finally:
            app[WEBSOCKETS].discard(ws)
        return ws
    finally:
        connections.release(remote)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    registry = request.app[REGISTRY]
    return web.json_response(
        {"status": "ok", "rooms": len(registry.rooms), "peers": sum(len(r.sessions) for r in registry.rooms.values())}
    )


async def readyz(request: web.Request) -> web.Response:
    """
    Readiness: the media plane passed its startup checks, the node is not draining and, in a cluster, Redis
    answers. The event loop's lag is reported but never changes the answer (see loophealth.py).
    """
    app = request.app
    loop = app[LOOP].describe()
    drain = app[DRAIN]
    if not app[READY].is_set():
        return web.json_response({"status": "starting", "loop": loop}, status=503)
    if drain.draining:
        return web.json_response({"status": "draining", "deadline": drain.deadline, "loop": loop}, status=503)
    cluster = app[CLUSTER]
    if cluster is not None and not cluster.ready:
        return web.json_response({"status": "cluster registry unreachable", "loop": loop}, status=503)
    return web.json_response({"status": "ready", "loop": loop})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def index(request: web.Request) -> web.FileResponse:
    # The page's address may carry a room token: no Referer with it to anyone (the page also takes it out
    # of its address bar at once).
    return web.FileResponse(_web_root(request.app[SETTINGS]) / "index.html",
                            headers={"Referrer-Policy": "no-referrer"})


async def watch_page(request: web.Request) -> web.FileResponse:
    """The WHEP player: ``/watch?room=R`` (``&participant=P``)."""
    return web.FileResponse(_web_root(request.app[SETTINGS]) / "watch.html", headers={"Referrer-Policy": "no-referrer"})


async def broadcast_page(request: web.Request) -> web.FileResponse:
    """A WHIP publisher of the camera: ``/broadcast?room=R&name=N``."""
    return web.FileResponse(_web_root(request.app[SETTINGS]) / "broadcast.html",
                            headers={"Referrer-Policy": "no-referrer"})


def _web_root(settings: Settings) -> Path:
    return settings.web_root or WEB_ROOT


async def media_plane(app: web.Application) -> AsyncIterator[None]:
    """Check the aiortc internals we rely on, choose ICE host addresses; close every room on shutdown."""
    settings = app[SETTINGS]
    await aiortc_adapter.check()
    aiortc_adapter.set_host_addresses(settings.ice_host_addresses)
    if settings.rtc_min_port is not None and settings.rtc_max_port is not None:
        aiortc_adapter.set_port_range(settings.rtc_min_port, settings.rtc_max_port)
    aiortc_adapter.guard_stun_parsing()
    if settings.auth_secret is None:
        logger.warning("DEV MODE: no auth_secret is set; anyone may join any room and use the admin API. "
                       "Set CHORUS_AUTH_SECRET for any real deployment.")
    app[READY].set()
    yield
    app[READY].clear()
    await app[REGISTRY].close()


def build_cluster(settings: Settings, registry: RoomRegistry) -> Cluster:
    """This node's cluster membership (nothing connects until the heartbeat starts)."""
    assert settings.redis_url is not None
    ws_url = settings.node_url or f"ws://{settings.host}:{settings.port}/ws"
    node_id = settings.node_id or ws_url.split("://", 1)[-1].removesuffix("/ws").replace("/", "_")

    def lost(room_id: str) -> None:
        room = registry.rooms.get(room_id)
        if room is not None:
            room.spawn_close("moved to another node")

    return Cluster(settings.redis_url, node_id, ws_url, ttl=settings.node_ttl,
                   local_rooms=lambda: {r.id: len(r.sessions) for r in registry.rooms.values()},
                   on_lost_room=lost)


async def cluster_membership(app: web.Application) -> AsyncIterator[None]:
    """Heartbeat into the cluster registry while the app runs; leave the cluster on shutdown."""
    cluster = app[CLUSTER]
    if cluster is None:
        yield
        return
    tasks = Tasks("cluster membership")
    releases = Tasks("cluster room releases")

    def release(room: Room) -> None:
        releases.spawn(cluster.release(room.id), name=f"release room {room.id}")

    app[REGISTRY].on_room_closed.append(release)
    tasks.spawn(cluster.run(), name="cluster heartbeat")
    yield
    await tasks.close()
    while len(releases):  # let every placement release finish (they are short)
        await asyncio.sleep(0.01)
    await releases.close()
    await cluster.close()


async def ingest_plane(app: web.Application) -> AsyncIterator[None]:
    """Ingresses: load them, open the RTMP/SRT listeners, start the pulls; on shutdown every running ingress
    ends (reason ``server shutdown``) before the rooms close."""
    manager = app[INGRESS]
    await manager.start()
    def drained(deadline: float) -> None:  # a draining node takes no new stream; running ones end (drain.py)
        app[APP_TASKS].spawn(manager.close("the server is draining"), name="ingress drain")

    app[DRAIN].subscribe(drained)
    yield
    await manager.close("server shutdown")


async def webhook_delivery(app: web.Application) -> AsyncIterator[None]:
    tasks = Tasks("webhooks")
    tasks.spawn(app[WEBHOOKS].run(), name="webhooks")
    yield
    await tasks.close()


async def loop_health(app: web.Application) -> AsyncIterator[None]:
    tasks = Tasks("loop health")
    tasks.spawn(app[LOOP].run(), name="event loop lag sampler")
    yield
    await tasks.close()


async def app_tasks(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[APP_TASKS].close()


def start_drain(app: web.Application, timeout: float | None = None) -> bool:
    """Start draining this node (SIGTERM, ``POST /api/drain``); :attr:`Drain.finished` is set when it is
    over. Returns False if it was already draining."""
    settings = app[SETTINGS]
    timeout = settings.drain_timeout if timeout is None else timeout
    if not app[DRAIN].start(timeout):
        return False
    app[APP_TASKS].spawn(drain_node(app), name="drain")
    return True


async def drain_node(app: web.Application) -> None:
    """The drain itself (see drain.py for the steps)."""
    drain, registry, cluster, webhooks = app[DRAIN], app[REGISTRY], app[CLUSTER], app[WEBHOOKS]
    assert drain.deadline is not None
    deadline = drain.deadline
    started = time.monotonic()
    node = cluster.node_id if cluster is not None else None
    rooms = list(registry.rooms.values())
    participants = sum(len(r.sessions) for r in rooms)
    logger.info("draining", extra={"chorus": {"rooms": len(rooms), "participants": participants,
                                              "timeout_s": round(deadline - time.time(), 1)}})
    webhooks.emit("node_draining", {"node": node, "deadline": deadline, "rooms": len(rooms),
                                    "participants": participants})
    moves: dict[str, str | None] = {}
    if cluster is not None:
        moves = await cluster.drain([r.id for r in rooms])
    for room in rooms:
        data: dict[str, Any] = {"deadline": deadline}
        if moves.get(room.id):
            data["url"] = moves[room.id]
        room.log.info("telling participants the node drains", target=moves.get(room.id))
        room.broadcast("draining", data)
    while (registry.rooms or drain.holds) and time.time() < deadline:
        await asyncio.sleep(0.1)
    left = list(registry.rooms.values())
    outcome = "empty" if not left and not drain.holds else "timeout"
    for room in left:
        await room.close("server shutdown")
    logger.info("drained", extra={"chorus": {"outcome": outcome, "rooms_closed": len(left),
                                             "seconds": round(time.monotonic() - started, 1)}})
    webhooks.emit("node_drained", {"node": node, "outcome": outcome, "rooms_closed": len(left),
                                   "unfinished": drain.holds})
    await webhooks.flush(timeout=5.0)
    drain.finished.set()


def egress_config(settings: Settings) -> EgressConfig:
    """The egress settings of ``settings``. :raises ConfigError: a malformed ``egress_ladder``."""
    try:
        rungs = parse_rungs(settings.egress_ladder)
    except EgressError as exc:
        raise ConfigError(f"egress_ladder: {exc.reason}") from None
    return EgressConfig(
        segment=settings.egress_segment_seconds, part=settings.egress_part_seconds,
        window=settings.egress_window_segments, rungs=rungs, top_bitrate=settings.egress_top_kbps * 1000,
        composite_width=settings.egress_composite_width & ~1, composite_height=settings.egress_composite_height & ~1,
        composite_fps=settings.egress_composite_fps, recordings=settings.recordings_dir,
        retention_days=settings.recordings_retention_days, output_dir=settings.egress_output_dir,
        public=settings.egress_public, max_egresses=settings.egress_max, worker_nice=settings.egress_worker_nice,
        room_grace=settings.egress_room_grace, keep_ended=settings.egress_keep_ended)


async def egress_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Egresses follow rooms as they open and close. A drain (SIGTERM, ``POST /api/drain``) takes no new
    egresses and holds until the running ones ended with their rooms; on shutdown every egress that is left ends
    and finalizes its files (playlists get EXT-X-ENDLIST) before the rooms close."""
    manager, registry = app[EGRESS], app[REGISTRY]

    def opened(room: Room) -> None:
        manager.room_opened(room.id, room.router, room.identity_of)

    def closed(room: Room) -> None:
        manager.room_closed(room.id)

    def draining(deadline: float) -> None:
        # No new egresses; each running one ends (files final) as its room closes; the drain waits for them.
        manager.drain()

        async def finalized() -> None:
            with app[DRAIN].hold("egresses finalizing"):
                await manager.wait_ended(deadline)

        app[APP_TASKS].spawn(finalized(), name="drain: egresses")

    registry.on_room_opened.append(opened)
    registry.on_room_closed.append(closed)
    app[DRAIN].subscribe(draining)
    for room in registry.rooms.values():
        opened(room)
    tasks = Tasks("egress")
    tasks.spawn(manager.run(), name="egress housekeeping")
    yield
    await manager.close("shutdown")
    await tasks.close()


async def close_websockets(app: web.Application) -> None:
    websockets = app[WEBSOCKETS]
    for ws in set(websockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


def create_app(settings: Settings | None = None) -> web.Application:
    """
    Build the Chorus application.

    :raises ConfigError: neither ``auth_secret`` nor ``dev_mode`` is set.
    """
    settings = settings or Settings()
    if settings.auth_secret is None and not settings.dev_mode:
        raise ConfigError("set auth_secret (CHORUS_AUTH_SECRET, at least 32 bytes) to require room tokens, "
                          "or dev_mode (CHORUS_DEV_MODE=1, or chorus serve --dev) to run without auth")
    app = web.Application(client_max_size=settings.max_message_bytes,
                          middlewares=[forwarded.middleware(forwarded.TrustedProxies(settings.trusted_proxies))])
    app[SETTINGS] = settings
    app[METRICS] = metrics_ = Metrics()
    app[DRAIN] = drain = Drain()
    app[CONNECTIONS] = connections = ConnectionLimiter(settings.max_connections, settings.max_connections_per_ip)
    app[LOOP] = LoopMonitor(settings.loop_lag_warning)
    app[APP_TASKS] = Tasks("app")
    metrics_.watch_loop(app[LOOP])
    metrics_.gauge("chorus_websockets_open", "Websockets open (admitted)", lambda: connections.open)
    metrics_.gauge("chorus_draining", "1 while this node drains", lambda: float(drain.draining))
    app[WEBHOOKS] = WebhookSender(settings.webhook_urls, settings.webhook_secret or settings.auth_secret,
                                  on_outcome=lambda outcome: metrics_.webhooks.labels(outcome).inc())
    app[REGISTRY] = RoomRegistry(
        emit=app[WEBHOOKS].emit, max_rooms=settings.max_rooms, max_peers_per_room=settings.max_peers_per_room,
        mcu_defaults=McuOptions(settings.mcu_width - settings.mcu_width % 2,
                                settings.mcu_height - settings.mcu_height % 2, settings.mcu_fps),
        chat={"chat_history": settings.chat_history, "chat_rate": settings.chat_rate_per_peer,
              "chat_burst": settings.chat_burst_per_peer},
    )
    egress = EgressManager(egress_config(settings), emit=app[WEBHOOKS].emit)
    app[JOIN_LIMITER] = RateLimiter(settings.join_rate_per_ip, settings.join_burst_per_ip)
    metrics_.watch(app[REGISTRY], egress)
    app[WEBSOCKETS] = weakref.WeakSet()
    app[READY] = asyncio.Event()
    app[CLUSTER] = build_cluster(settings, app[REGISTRY]) if settings.redis_url else None
    app[INGRESS] = ingress = build_manager(settings, app[REGISTRY], app[CLUSTER], app[WEBHOOKS].emit)
    metrics_.watch_ingress(ingress)
    cluster = app[CLUSTER]
    app[WEBRTC_HTTP] = webrtc_http = WebRtcHttp(
        settings, app[REGISTRY], verify=token_verifier(settings),
        ice_servers=lambda identity: ice_servers_for(settings, identity), cluster=cluster,
        ingress=lambda: ingress, draining=lambda: drain.draining,
        on_error=lambda code: metrics_.errors.labels(code).inc())
    # Cleanup runs in reverse: ingresses end (WHIP ones through the WHIP sessions) before the WHIP/WHEP
    # endpoints stop, and both before the rooms close.
    app.cleanup_ctx.append(media_plane)
    app.cleanup_ctx.append(cluster_membership)
    app.cleanup_ctx.append(webhook_delivery)
    app.cleanup_ctx.append(loop_health)
    app.cleanup_ctx.append(app_tasks)
    webrtc_http.add_routes(app)
    app.cleanup_ctx.append(ingest_plane)
    # Registered last: its cleanup (egresses end, files final, webhooks queued) runs first.
    app.cleanup_ctx.append(egress_lifecycle)
    app.on_shutdown.append(close_websockets)
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    admin = create_admin_app(
        app[REGISTRY], token_verifier(settings), lambda: cluster,
        drain=lambda timeout: (start_drain(app, timeout), drain.describe())[1],
        debug_hooks=settings.debug_hooks, settings=settings, egress=egress,
    )
    add_admin_routes(admin, lambda: ingress)
    app.add_subapp("/api", admin)
    app.router.add_get("/watch", watch_page)
    app.router.add_get("/broadcast", broadcast_page)
    add_routes(app, egress, token_verifier(settings), lambda: _web_root(settings))
    app.router.add_get("/", index)
    app.router.add_static("/", _web_root(settings), show_index=False)
    return app
