"""
Janus, the peer SFU Chorus is measured against: a private configuration (VideoRoom plugin and websocket
transport only, on loopback, one media event loop) and a minimal client of its websocket API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from chorus.sfu.tasks import Tasks

JANUS_LIB = Path("/usr/lib/x86_64-linux-gnu/janus")
PLUGIN = "janus.plugin.videoroom"


def janus_binary() -> str | None:
    return shutil.which("janus")


def _lib_dir() -> Path | None:
    candidates = (JANUS_LIB, *Path("/usr/lib").glob("*/janus"), Path("/usr/lib/janus"), Path("/opt/janus/lib/janus"))
    for candidate in candidates:
        if (candidate / "plugins" / "libjanus_videoroom.so").exists():
            return candidate
    return None


SHIM_SOURCE = Path(__file__).resolve().parent / "native" / "loopback_ifaddrs.c"


def loopback_shim() -> Path:
    """
    Build (once, into the temp folder) the LD_PRELOAD library that makes Janus gather ICE candidates on
    127.0.0.1 only (see native/loopback_ifaddrs.c): Janus skips loopback interfaces otherwise.
    """
    source = SHIM_SOURCE.read_bytes()
    target = Path(tempfile.gettempdir()) / f"chorus-bench-lo-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not target.exists():
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise RuntimeError("a C compiler (cc) is needed to build the Janus loopback shim (apt-get install gcc)")
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SHIM_SOURCE), "-ldl"], check=True)
        os.replace(tmp, target)
    return target


def write_config(folder: Path, ws_port: int, rtp_ports: tuple[int, int] = (20000, 29999)) -> Path:
    """
    Write a private Janus configuration into ``folder``: only the VideoRoom plugin and the websocket
    transport (loopback), ICE on loopback only, one media event loop. Returns the janus.jcfg path.
    """
    lib = _lib_dir()
    if lib is None:
        raise RuntimeError("Janus plugins not found (apt-get install -y janus)")
    folder.mkdir(parents=True, exist_ok=True)
    for sub, name in (("plugins", "libjanus_videoroom.so"), ("transports", "libjanus_websockets.so")):
        (folder / sub).mkdir(exist_ok=True)
        link = folder / sub / name
        if not link.exists():
            link.symlink_to(lib / sub / name)
    (folder / "events").mkdir(exist_ok=True)
    (folder / "loggers").mkdir(exist_ok=True)
    (folder / "janus.jcfg").write_text(f"""
general: {{
    configs_folder = "{folder}"
    plugins_folder = "{folder}/plugins"
    transports_folder = "{folder}/transports"
    events_folder = "{folder}/events"
    loggers_folder = "{folder}/loggers"
    debug_level = 3
    session_timeout = 60
    event_loops = 1
    hide_dependencies = true
}}
certificates: {{
}}
media: {{
    ipv6 = false
    rtp_port_range = "{rtp_ports[0]}-{rtp_ports[1]}"
    nack_optimizations = false
}}
nat: {{
    nice_debug = false
    ice_enforce_list = "lo"  # with the loopback shim, the only interface left
    ice_tcp = false
    full_trickle = false
}}
plugins: {{
}}
transports: {{
}}
loggers: {{
}}
events: {{
    broadcast = false
}}
""")
    (folder / "janus.plugin.videoroom.jcfg").write_text("general: {\n}\n")
    (folder / "janus.transport.websockets.jcfg").write_text(f"""
general: {{
    json = "compact"
    ws = true
    ws_port = {ws_port}
    ws_ip = "127.0.0.1"
    wss = false
}}
admin: {{
    admin_ws = false
    admin_wss = false
}}
""")
    return folder / "janus.jcfg"


class JanusError(RuntimeError):
    pass


class JanusSession:
    """One Janus session on its own websocket (as a browser would have), with its keepalive."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session_id: int | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.events: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks = Tasks("janus session")
        self._ack_ok: set[str] = set()  # transactions whose answer is a bare "ack" (keepalive, trickle)

    async def connect(self) -> None:
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(self.url, protocols=("janus-protocol",), max_msg_size=0)
        self._tasks.spawn(self._read())
        created = await self.call({"janus": "create"})
        self.session_id = created["data"]["id"]
        self._tasks.spawn(self._keepalive())

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed and self.session_id is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.call({"janus": "destroy"}), 2)
        await self._tasks.close()
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            msg = json.loads(message.data)
            kind = msg.get("janus")
            transaction = msg.get("transaction")
            if kind == "ack" and transaction in self._pending and transaction not in self._ack_ok:
                # An asynchronous plugin request: the answer comes later as an "event".
                continue
            future = self._pending.pop(transaction, None) if transaction else None
            if future is not None and not future.done():
                if kind == "error":
                    future.set_exception(JanusError(json.dumps(msg.get("error"))))
                else:
                    future.set_result(msg)
                continue
            sender = msg.get("sender")
            if sender is not None:
                self.events.setdefault(sender, asyncio.Queue()).put_nowait(msg)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("janus websocket closed"))

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(25)
            with contextlib.suppress(Exception):
                await self.call({"janus": "keepalive"}, timeout=10, ack=True)

    async def call(self, body: dict[str, Any], *, timeout: float = 20.0, ack: bool = False) -> dict[str, Any]:
        assert self._ws is not None
        transaction = f"t{next(self._ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[transaction] = future
        if ack:
            self._ack_ok.add(transaction)
        message = {**body, "transaction": transaction}
        if self.session_id is not None:
            message["session_id"] = self.session_id
        await self._ws.send_str(json.dumps(message))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(transaction, None)
            self._ack_ok.discard(transaction)

    async def attach(self) -> JanusHandle:
        result = await self.call({"janus": "attach", "plugin": PLUGIN})
        handle_id = result["data"]["id"]
        self.events.setdefault(handle_id, asyncio.Queue())
        return JanusHandle(self, handle_id)


class JanusHandle:
    """A VideoRoom plugin handle."""

    def __init__(self, session: JanusSession, handle_id: int) -> None:
        self.session = session
        self.id = handle_id

    async def message(self, body: dict[str, Any], jsep: dict[str, Any] | None = None,
                      *, timeout: float = 20.0) -> dict[str, Any]:
        """Send a plugin request; returns the plugin's synchronous answer or its event."""
        request: dict[str, Any] = {"janus": "message", "handle_id": self.id, "body": body}
        if jsep is not None:
            request["jsep"] = jsep
        result = await self.session.call(request, timeout=timeout)
        if result.get("janus") == "ack":  # should not happen (acks are skipped), but be tolerant
            return await self.next_event(timeout=timeout)
        data = result.get("plugindata", {}).get("data", {})
        if "error" in data:
            raise JanusError(f"{data.get('error_code')}: {data['error']}")
        return result

    async def next_event(self, *, timeout: float = 20.0) -> dict[str, Any]:
        queue = self.session.events.setdefault(self.id, asyncio.Queue())
        while True:
            msg = await asyncio.wait_for(queue.get(), timeout)
            if msg.get("janus") == "event":
                data = msg.get("plugindata", {}).get("data", {})
                if "error" in data:
                    raise JanusError(f"{data.get('error_code')}: {data['error']}")
                return msg

    async def trickle_done(self) -> None:
        await self.session.call({"janus": "trickle", "handle_id": self.id, "candidate": {"completed": True}},
                                 ack=True)


async def wait_ready(url: str, timeout: float = 15.0) -> None:
    """Wait until Janus answers ``info`` on its websocket."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(url, protocols=("janus-protocol",)) as ws:
                    await ws.send_str(json.dumps({"janus": "info", "transaction": "ready"}))
                    msg = await asyncio.wait_for(ws.receive(), 3)
                    if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data).get("janus") == "server_info":
                        return
        except (TimeoutError, OSError, aiohttp.ClientError):
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"janus did not answer on {url}")
        await asyncio.sleep(0.2)


async def create_room(url: str, room: int, publishers: int) -> None:
    session = JanusSession(url)
    await session.connect()
    try:
        handle = await session.attach()
        await handle.message({
            "request": "create", "room": room, "publishers": max(publishers, 1) + 2, "bitrate": 0,
            "fir_freq": 0, "audiocodec": "opus", "videocodec": "vp8", "notify_joining": False,
            "permanent": False,
            # Janus's default, explicit: publishers that offer transport-wide-cc (browsers; not the aiortc
            # generator) get transport-cc feedback. "bitrate": 0 means no cap, and so no REMB to publishers.
            "transport_wide_cc_ext": True,
        })
    finally:
        await session.close()

