"""
The baseline: what aiortc's public API offers for a group call. ``python -m chorus.bench.relay_server --port N``

A deliberately small server that speaks the subset of the Chorus protocol the benchmark uses (``join``,
``publish``, server ``offer`` → client ``answer``) and forwards with :class:`aiortc.contrib.media.MediaRelay`:
each published track is decoded once, and every subscriber's RTCRtpSender re-encodes it (VP8, Opus).
This is the cost Chorus's RTP-level forwarding removes. Not for production: no auth, no cleanup beyond
closing connections, no renegotiation when a publisher leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay

from chorus.sfu import aiortc_adapter
from chorus.sfu.tasks import Tasks

logger = logging.getLogger("bench.relay")


@dataclass
class Published:
    peer_id: str
    track_id: str
    track: MediaStreamTrack


@dataclass
class Peer:
    id: str
    ws: web.WebSocketResponse
    room: Room
    publish_pc: RTCPeerConnection | None = None
    subscribe_pc: RTCPeerConnection | None = None
    sent: set[str] = field(default_factory=set)  # track ids offered to this peer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    answer: asyncio.Future[dict[str, Any]] | None = None


@dataclass
class Room:
    name: str
    peers: dict[str, Peer] = field(default_factory=dict)
    tracks: list[Published] = field(default_factory=list)


class RelayServer:
    def __init__(self) -> None:
        self.relay = MediaRelay()
        self.rooms: dict[str, Room] = {}
        self.ids = itertools.count(1)
        self.pcs: set[RTCPeerConnection] = set()
        self.tasks = Tasks("relay offers")

    async def send(self, peer: Peer, message: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await peer.ws.send_str(json.dumps(message))

    async def offer_tracks(self, peer: Peer) -> None:
        """Add every not-yet-offered track of the others to the peer's subscribe connection, and offer."""
        async with peer.lock:
            new = [t for t in peer.room.tracks if t.peer_id != peer.id and t.track_id not in peer.sent]
            if not new or peer.ws.closed:
                return
            if peer.subscribe_pc is None:
                peer.subscribe_pc = RTCPeerConnection()
                self.pcs.add(peer.subscribe_pc)
            pc = peer.subscribe_pc
            consumers = []
            for published in new:
                transceiver = pc.addTransceiver(self.relay.subscribe(published.track), direction="sendonly")
                peer.sent.add(published.track_id)
                consumers.append((transceiver, published))
            await pc.setLocalDescription(await pc.createOffer())
            peer.answer = asyncio.get_running_loop().create_future()
            await self.send(peer, {"type": "evt", "method": "offer", "data": {
                "type": "offer", "sdp": pc.localDescription.sdp,
                "consumers": [{"mid": t.mid, "track_id": p.track_id, "peer_id": p.peer_id, "kind": p.track.kind}
                              for t, p in consumers],
            }})
            answer = await asyncio.wait_for(peer.answer, 15)
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))

    async def handle(self, peer_holder: list[Peer], room_name: str | None, method: str,
                     data: dict[str, Any], ws: web.WebSocketResponse) -> dict[str, Any]:
        if method == "join":
            room = self.rooms.setdefault(data["room"], Room(data["room"]))
            peer = Peer(f"p-{next(self.ids)}", ws, room)
            room.peers[peer.id] = peer
            peer_holder.append(peer)
            self.tasks.spawn(self.offer_tracks(peer))
            return {"v": 1, "peer_id": peer.id, "room": room.name, "peers": [], "ice_servers": []}
        peer = peer_holder[0]
        if method == "publish":
            pc = peer.publish_pc = RTCPeerConnection()
            self.pcs.add(pc)
            received: list[MediaStreamTrack] = []
            pc.on("track", received.append)
            await pc.setRemoteDescription(RTCSessionDescription(data["sdp"], "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            tracks = []
            for track in received:
                track_id = f"t-{next(self.ids)}"
                mid = next(t.mid for t in pc.getTransceivers() if t.receiver.track is track)
                peer.room.tracks.append(Published(peer.id, track_id, track))
                tracks.append({"id": track_id, "kind": track.kind, "mid": mid})
            for other in list(peer.room.peers.values()):
                if other is not peer:
                    self.tasks.spawn(self.offer_tracks(other))
            return {"type": "answer", "sdp": pc.localDescription.sdp, "tracks": tracks}
        if method == "answer":
            if peer.answer is not None and not peer.answer.done():
                peer.answer.set_result(data)
            return {}
        if method == "ping":
            return {"now": asyncio.get_running_loop().time()}
        raise ValueError(f"unknown method {method!r}")

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=15)
        await ws.prepare(request)
        holder: list[Peer] = []
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            msg = json.loads(message.data)
            try:
                data = await self.handle(holder, None, msg["method"], msg.get("data", {}), ws)
                reply = {"type": "res", "id": msg["id"], "ok": True, "data": data}
            except Exception as exc:  # noqa: BLE001
                logger.exception("request failed")
                reply = {"type": "res", "id": msg.get("id"), "ok": False,
                         "error": {"code": "internal_error", "reason": str(exc)}}
            await ws.send_str(json.dumps(reply))
        for peer in holder:
            peer.room.peers.pop(peer.id, None)
            for pc in (peer.publish_pc, peer.subscribe_pc):
                if pc is not None:
                    self.pcs.discard(pc)
                    await pc.close()
        return ws


def main() -> None:
    parser = argparse.ArgumentParser(description="MediaRelay (decode + re-encode) baseline server")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    aiortc_adapter.set_host_addresses(["127.0.0.1"])
    server = RelayServer()
    app = web.Application()
    app.router.add_get("/ws", server.websocket)
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
