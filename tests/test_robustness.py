"""One bad or vanished client never hurts the others."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiortc.mediastreams import MediaStreamError
from calls import Received
from conftest import ServerProcess, connect
from media import ColorTrack, SineTrack, count_frames

from chorus.signaling.client import ChorusClient

HERE = Path(__file__).resolve().parent


async def test_killed_peer_disappears_for_everyone(server: ServerProcess, clients: list[ChorusClient],
                                                   room_name: str) -> None:
    """SIGKILL a participant's process (no goodbye): the others get peer_left and its tracks end in < 2 s."""
    watcher = await connect(server, clients)
    received = Received(watcher)
    await watcher.join(room_name, "watcher")

    proc = subprocess.Popen([sys.executable, str(HERE / "peer_process.py"), server.ws_url, room_name, "victim"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)  # type: ignore[union-attr]
        assert line.startswith("ready"), line
        victim_id = line.split()[1]
        await received.wait(2)
        video = received.tracks[(victim_id, "video")]
        audio = received.tracks[(victim_id, "audio")]
        assert await count_frames(video, 1.0) > 5

        left = watcher.expect_event("peer_left", lambda d: d["peer_id"] == victim_id, timeout=5)
        unpublished = watcher.expect_event("track_unpublished", lambda d: d["peer_id"] == victim_id, timeout=5)
        killed_at = time.monotonic()
        proc.kill()
        await left
        await unpublished
        left_after = time.monotonic() - killed_at

        async def ended(track: object) -> float:
            while True:
                try:
                    await track.recv()  # type: ignore[attr-defined]
                except MediaStreamError:
                    return time.monotonic() - killed_at

        ended_after = max(await asyncio.wait_for(asyncio.gather(ended(video), ended(audio)), 5))
        print(f"peer_left after {left_after * 1000:.0f} ms, tracks ended after {ended_after * 1000:.0f} ms")
        assert left_after < 2.0
        assert ended_after < 2.0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


async def raw_request(ws: aiohttp.ClientWebSocketResponse, payload: str) -> dict:
    await ws.send_str(payload)
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


BAD_SDP = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/x\r\n"


async def test_bad_input_gets_typed_errors_and_hurts_no_one(server: ServerProcess, clients: list[ChorusClient],
                                                            room_name: str) -> None:
    # A call in progress between two other peers.
    alice = await connect(server, clients)
    await alice.join(room_name, "alice")
    await alice.publish(SineTrack(440), ColorTrack())
    bob = await connect(server, clients)
    bob_received = Received(bob)
    await bob.join(room_name, "bob")
    await bob_received.wait(2)
    video = bob_received.tracks[(alice.peer_id, "video")]  # type: ignore[index]
    assert await count_frames(video, 1.0) > 10

    async with aiohttp.ClientSession() as session, session.ws_connect(server.ws_url) as ws:
        cases = [
            ("not json", None, "bad_request"),
            ("[1, 2]", None, "bad_request"),
            ('{"type": "req", "id": "x", "method": "ping"}', None, "bad_request"),
            ('{"type": "req", "id": 1, "method": "fly", "data": {}}', 1, "unknown_method"),
            ('{"type": "req", "id": 2, "method": "publish", "data": {"type": "offer", "sdp": "v=0"}}', 2,
             "invalid_state"),
            ('{"type": "req", "id": 3, "method": "join", "data": {"v": 9, "room": "r", "name": "n"}}', 3,
             "unsupported_version"),
            ('{"type": "req", "id": 4, "method": "join", "data": {"room": "../etc", "name": "n"}}', 4, "bad_request"),
            ('{"type": "req", "id": 5, "method": "join", "data": {"room": 5, "name": "n"}}', 5, "bad_request"),
            ('{"type": "req", "id": 6, "method": "answer", "data": {"type": "answer", "sdp": "v=0"}}', 6,
             "invalid_state"),
            ("[" * 100000 + "]" * 100000, None, "bad_request"),
        ]
        for payload, expected_id, code in cases:
            reply = await raw_request(ws, payload)
            assert reply["type"] == "res" and reply["ok"] is False, (payload[:50], reply)
            assert reply["id"] == expected_id
            assert reply["error"]["code"] == code, (payload[:50], reply)
            assert reply["error"]["reason"]

        # Joined, the same socket sends invalid SDP, then an offer with no codec Chorus forwards.
        reply = await raw_request(ws, json.dumps(
            {"type": "req", "id": 10, "method": "join", "data": {"v": 1, "room": room_name, "name": "mallory"}}))
        assert reply["ok"], reply
        events_seen = []
        for payload, code in [
            ({"type": "offer", "sdp": BAD_SDP}, "invalid_sdp"),
            ({"type": "offer", "sdp": "v=0\r\nthis is not sdp\r\n"}, "invalid_sdp"),
            ({"type": "offer", "sdp": 42}, "bad_request"),
        ]:
            await ws.send_str(json.dumps({"type": "req", "id": 11, "method": "publish", "data": payload}))
            while True:
                msg = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
                if msg["type"] == "res":
                    break
                events_seen.append(msg["method"])  # notifications (offer of the call's tracks) may interleave
            assert msg["ok"] is False and msg["error"]["code"] == code, (payload, msg)
        # The socket is still usable.
        await ws.send_str(json.dumps({"type": "req", "id": 12, "method": "ping", "data": {}}))
        while (msg := json.loads((await asyncio.wait_for(ws.receive(), 5)).data))["type"] != "res":
            pass
        assert msg["ok"] and msg["id"] == 12

    # The call went on unharmed, and the server is healthy.
    assert await count_frames(video, 1.0) > 10
    async with aiohttp.ClientSession() as session, session.get(f"{server.http_url}/healthz") as resp:
        assert resp.status == 200
