"""Every configured limit holds, with a clear error, and without disturbing anyone else."""

from __future__ import annotations

import json
from collections.abc import Iterator

import aiohttp
import pytest
from conftest import ServerProcess, connect
from media import ColorTrack, SineTrack

from chorus.signaling.client import ChorusClient, RequestError

ORIGIN = "https://meet.example.org"


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("limits"), env={
        "CHORUS_MAX_MESSAGE_BYTES": "8192",
        "CHORUS_MAX_FRAME_BYTES": "16384",
        "CHORUS_MAX_SDP_BYTES": "6000",
        "CHORUS_MAX_SDP_LINES": "150",
        "CHORUS_MAX_ROOMS": "2",
        "CHORUS_MAX_PEERS_PER_ROOM": "2",
        "CHORUS_MAX_TRACKS_PER_PEER": "1",
        "CHORUS_JOIN_RATE_PER_IP": "0.5",
        "CHORUS_JOIN_BURST_PER_IP": "8",
        "CHORUS_ALLOWED_ORIGINS": json.dumps([ORIGIN]),
    })
    yield proc
    proc.stop()
    assert "Traceback" not in proc.log()


async def test_message_size_limits(limited: ServerProcess) -> None:
    """Over max_message_bytes: limit_exceeded, and the socket stays open; over max_frame_bytes: closed, 1009."""
    async with aiohttp.ClientSession() as http, http.ws_connect(limited.ws_url) as ws:
        await ws.send_str(json.dumps({"type": "req", "id": 7, "method": "ping", "data": {"x": "a" * 9000}}))
        reply = json.loads((await ws.receive()).data)
        assert reply["id"] == 7 and reply["error"]["code"] == "limit_exceeded"
        await ws.send_str(json.dumps({"type": "req", "id": 8, "method": "ping"}))
        assert json.loads((await ws.receive()).data)["ok"] is True
        await ws.send_str(json.dumps({"type": "req", "id": 1, "method": "ping", "data": {"x": "a" * 20000}}))
        msg = await ws.receive()
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        assert ws.close_code == 1009


async def test_origin_allow_list(limited: ServerProcess) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as excinfo:
            await http.ws_connect(limited.ws_url, headers={"Origin": "https://evil.example.com"})
        assert excinfo.value.status == 403
        async with http.ws_connect(limited.ws_url, headers={"Origin": ORIGIN}) as ws:
            await ws.send_str(json.dumps({"type": "req", "id": 1, "method": "ping"}))
            assert json.loads((await ws.receive()).data)["ok"] is True


async def test_room_peer_track_sdp_and_rate_limits(limited: ServerProcess, clients: list[ChorusClient]) -> None:
    async def joined(room: str, name: str) -> ChorusClient:
        client = await connect(limited, clients)
        await client.join(room, name)
        return client

    a = await joined("room-a", "a1")
    await joined("room-a", "a2")
    # Peers per room.
    third = await connect(limited, clients)
    with pytest.raises(RequestError) as excinfo:
        await third.join("room-a", "a3")
    assert excinfo.value.code == "limit_exceeded" and "full" in excinfo.value.reason
    # Rooms per server.
    await joined("room-b", "b1")
    with pytest.raises(RequestError) as excinfo:
        await third.join("room-c", "c1")
    assert excinfo.value.code == "limit_exceeded" and "rooms" in excinfo.value.reason
    # Tracks per peer (limit 1): audio + video is refused, audio alone is fine.
    with pytest.raises(RequestError) as excinfo:
        await a.publish(SineTrack(440), ColorTrack())
    assert excinfo.value.code == "limit_exceeded"
    await a.publish_pc.close()  # type: ignore[union-attr]
    a.publish_pc = None
    await a.publish(SineTrack(440))
    # SDP size and line count.
    for sdp, what in (("v=0\r\n" + "a=x\r\n" * 200, "lines"), ("v=0\r\n" + "a=" + "x" * 6500 + "\r\n", "longer")):
        with pytest.raises(RequestError) as excinfo:
            await a.request("answer", {"type": "answer", "sdp": sdp})
        assert excinfo.value.code == "limit_exceeded" and what in excinfo.value.reason
    # Join rate per IP (burst 8, 0.5/s): the burst is spent by now, so joins are refused quickly.
    codes = []
    for _ in range(6):
        try:
            await third.join("room-b", "b2")
            await third.leave()
            codes.append("ok")
        except RequestError as exc:
            codes.append(exc.code)
    assert "rate_limited" in codes, codes
    # Nobody else noticed: the first peer still answers.
    assert "now" in await a.request("ping")
