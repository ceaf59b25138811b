"""Chat, metadata, rooms made ahead of time, active speakers and connection quality, over the real protocol."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import ServerProcess, connect
from media import EncodedVideoTrack, SineTrack, encode_vp8_clip

from chorus.signaling.client import ChorusClient, RequestError


class RawClient:
    """A protocol client on a bare websocket: sends what it likes, keeps every message it gets."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.responses: dict[int | None, dict[str, Any]] = {}
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._next = 1
        self._arrived = asyncio.Event()

    async def read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            msg = json.loads(message.data)
            if msg["type"] == "res":
                self.responses[msg["id"]] = msg
            else:
                self.events.append((msg["method"], msg["data"]))
            self._arrived.set()

    async def send(self, method: str, data: dict[str, Any] | None = None) -> int:
        request_id = self._next
        self._next += 1
        await self.ws.send_str(json.dumps({"type": "req", "id": request_id, "method": method, "data": data or {}}))
        return request_id

    async def response(self, request_id: int, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while request_id not in self.responses:
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), max(deadline - time.monotonic(), 0.01))
        return self.responses[request_id]

    async def request(self, method: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.response(await self.send(method, data))

    def chats(self) -> list[dict[str, Any]]:
        return [d for m, d in self.events if m == "chat"]


@pytest.fixture
async def raw(server: ServerProcess) -> AsyncIterator[Any]:
    """Make raw protocol clients; all are closed afterwards."""
    async with aiohttp.ClientSession() as http:
        made: list[tuple[RawClient, asyncio.Task[None]]] = []

        async def make() -> RawClient:
            client = RawClient(await http.ws_connect(server.ws_url, max_msg_size=0))
            made.append((client, asyncio.get_running_loop().create_task(client.read())))
            return client

        yield make
        for client, task in made:
            await client.ws.close()
            await task


async def api(server: ServerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(method, f"{server.http_url}/api{path}",
                                                             json=body) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


async def test_chat_to_room_and_to_one(raw: Any, room_name: str) -> None:
    a, b, c = await raw(), await raw(), await raw()
    ids = {}
    for name, client in (("a", a), ("b", b), ("c", c)):
        ids[name] = (await client.request("join", {"v": 1, "room": room_name, "name": name}))["data"]["peer_id"]
    sent = (await a.request("chat", {"text": "hello all"}))["data"]["message"]
    assert sent["from"] == ids["a"] and sent["name"] == "a" and sent["to"] is None and sent["text"] == "hello all"
    private = (await a.request("chat", {"text": "just you", "to": ids["b"]}))["data"]["message"]
    assert private["to"] == ids["b"]
    await asyncio.sleep(0.3)
    assert [m["text"] for m in b.chats()] == ["hello all", "just you"]
    assert [m["text"] for m in c.chats()] == ["hello all"]
    assert a.chats() == []  # a sender gets its message in the response, not again as a notification
    unknown = await a.request("chat", {"text": "x", "to": "p-nobody"})
    assert unknown["error"]["code"] == "not_found"
    for bad in ({}, {"text": ""}, {"text": "   "}, {"text": 42}, {"text": "x", "to": 7}):
        assert (await a.request("chat", bad))["error"]["code"] == "bad_request", bad


async def test_chat_abuse_is_refused_and_the_sender_stays(raw: Any, room_name: str) -> None:
    """A 1 MB message, 1000 messages a second and HTML: refused, limited, kept as text; the others unaffected."""
    sender, other = await raw(), await raw()
    await sender.request("join", {"v": 1, "room": room_name, "name": "flood"})
    await other.request("join", {"v": 1, "room": room_name, "name": "other"})

    huge = await sender.request("chat", {"text": "x" * 1_000_000})  # over max_message_bytes: not even parsed
    assert huge["error"]["code"] == "limit_exceeded", huge
    over = await sender.request("chat", {"text": "é" * 2049})  # 4098 UTF-8 bytes: over the 4 kB text limit
    assert over["error"]["code"] == "limit_exceeded"
    assert (await sender.request("chat", {"text": "y" * 4096}))["ok"]

    started = time.monotonic()
    ids = [await sender.send("chat", {"text": f"flood {i}"}) for i in range(1000)]
    results = [await sender.response(i) for i in ids]
    elapsed = time.monotonic() - started
    accepted = sum(1 for r in results if r["ok"])
    limited = sum(1 for r in results if not r["ok"] and r["error"]["code"] == "limit_exceeded")
    print(f"1000 chat messages in {elapsed:.2f} s: {accepted} accepted, {limited} limit_exceeded")
    assert accepted + limited == 1000
    assert accepted <= 20 + 5 * elapsed + 2  # the burst plus the sustained rate

    html = "<img src=x onerror=alert(1)>"
    assert (await sender.request("chat", {"text": html}))["ok"] or True  # may still be rate limited
    assert (await sender.request("ping"))["ok"]  # still connected
    await asyncio.sleep(0.3)
    texts = [m["text"] for m in other.chats()]
    assert len([t for t in texts if t.startswith("flood")]) == accepted
    assert "x" * 1000 not in "".join(texts)
    assert (await other.request("ping"))["ok"]


async def test_late_joiner_gets_the_last_100(raw: Any, server: ServerProcess, room_name: str) -> None:
    first = await raw()
    await first.request("join", {"v": 1, "room": room_name, "name": "first"})
    for i in range(5):
        assert (await first.request("chat", {"text": f"early {i}"}))["ok"]
    async with aiohttp.ClientSession() as http:
        for i in range(110):  # from the server: no rate limit
            async with http.post(f"{server.http_url}/api/rooms/{room_name}/chat",
                                 json={"text": f"server {i}"}) as response:
                assert response.status == 200
    status, body = await api(server, "POST", f"/rooms/{room_name}/chat", {"text": "x", "to": "p-nobody"})
    assert status == 404
    late = await raw()
    joined = (await late.request("join", {"v": 1, "room": room_name, "name": "late"}))["data"]
    texts = [m["text"] for m in joined["chat"]]
    assert texts == [f"server {i}" for i in range(10, 110)]
    assert all(m["from"] is None for m in joined["chat"])


async def test_rooms_made_ahead_and_metadata(raw: Any, server: ServerProcess, room_name: str) -> None:
    status, room = await api(server, "POST", "/rooms", {"name": room_name, "mode": "mcu", "max_participants": 2,
                                                        "metadata": {"topic": "standup"}, "empty_timeout": 60})
    assert status == 201, room
    assert room["mode"] == "mcu" and room["metadata"] == {"topic": "standup"} and room["max_participants"] == 2
    assert (await api(server, "POST", "/rooms", {"name": room_name, "mode": "mcu"}))[0] == 200  # idempotent
    assert (await api(server, "POST", "/rooms", {"name": room_name, "mode": "sfu"}))[0] == 409
    assert (await api(server, "POST", "/rooms", {"name": "bad name!"}))[0] == 400
    assert (await api(server, "POST", "/rooms", {"name": room_name + "x", "metadata": "no"}))[0] == 400
    assert (await api(server, "POST", "/rooms", {"name": room_name + "x", "metadata": {"k": "v" * 5000}}))[0] == 429
    rooms = (await api(server, "GET", "/rooms"))[1]["rooms"]
    assert any(r["id"] == room_name and r["participants"] == 0 for r in rooms)  # open with nobody in it

    a, b, c = await raw(), await raw(), await raw()
    joined = (await a.request("join", {"v": 1, "room": room_name, "name": "a"}))["data"]
    assert joined["mode"] == "mcu" and joined["metadata"] == {"topic": "standup"}
    b_id = (await b.request("join", {"v": 1, "room": room_name, "name": "b"}))["data"]["peer_id"]
    full = await c.request("join", {"v": 1, "room": room_name, "name": "c"})
    assert full["error"]["code"] == "limit_exceeded"  # max_participants: 2

    status, _ = await api(server, "POST", f"/rooms/{room_name}/metadata", {"metadata": {"topic": "retro"}})
    assert status == 200
    status, _ = await api(server, "POST", f"/rooms/{room_name}/participants/{b_id}/metadata",
                          {"metadata": {"role": "host"}})
    assert status == 200
    await asyncio.sleep(0.3)
    for client in (a, b):
        metadata = [d for m, d in client.events if m == "metadata"]
        assert {"room": {"topic": "retro"}} in metadata
        assert {"peer_id": b_id, "metadata": {"role": "host"}} in metadata
    described = (await api(server, "GET", f"/rooms/{room_name}"))[1]
    assert described["metadata"] == {"topic": "retro"}
    assert [p["metadata"] for p in described["participants"] if p["id"] == b_id] == [{"role": "host"}]

    # Everyone leaves: a room made ahead of time stays for its empty timeout.
    for client in (a, b):
        await client.request("leave")
    assert (await api(server, "GET", f"/rooms/{room_name}"))[0] == 200
    assert (await api(server, "DELETE", f"/rooms/{room_name}"))[0] == 204


async def test_empty_timeout_closes_a_room_nobody_joined(server: ServerProcess, room_name: str) -> None:
    assert (await api(server, "POST", "/rooms", {"name": room_name, "empty_timeout": 0.5}))[0] == 201
    assert (await api(server, "GET", f"/rooms/{room_name}"))[0] == 200
    await asyncio.sleep(1.0)
    assert (await api(server, "GET", f"/rooms/{room_name}"))[0] == 404


async def test_active_speakers_and_connection_quality(server: ServerProcess, clients: list[ChorusClient],
                                                      room_name: str) -> None:
    """Only the bot with a tone is an active speaker; it moves when the tone does. Everyone gets each
    participant's connection quality."""
    clip = encode_vp8_clip(frames=30)
    bots = []
    for i in range(3):
        bot = await connect(server, clients, decode=False)
        await bot.join(room_name, f"bot{i}")
        tone = SineTrack(300 + 100 * i, amplitude=0.5 if i == 1 else 0.0)
        bots.append((bot, tone))
        await bot.publish(tone, EncodedVideoTrack(clip))
    watcher = bots[0][0]
    deadline = time.monotonic() + 10
    while not all(b.active_speakers == [bots[1][0].peer_id] for b, _ in bots):
        assert time.monotonic() < deadline, [(m, d) for m, d in watcher.events if m == "active_speakers"]
        await asyncio.sleep(0.1)

    # The tone moves to bot 2: it becomes the speaker within a second.
    joined_at = {}
    alone_at = {}
    started = time.monotonic()
    watcher.on_active_speakers(lambda peers: joined_at.setdefault("c", time.monotonic()) if bots[2][0].peer_id in peers
                               else None)
    watcher.on_active_speakers(lambda peers: alone_at.setdefault("c", time.monotonic())
                               if peers == [bots[2][0].peer_id] else None)
    bots[1][1].amplitude = 0.0
    bots[2][1].amplitude = 0.5
    await watcher.wait_for_event("active_speakers", lambda d: d["peers"] == [bots[2][0].peer_id], timeout=5)
    print(f"the new speaker was marked after {(joined_at['c'] - started) * 1000:.0f} ms, alone after "
          f"{(alone_at['c'] - started) * 1000:.0f} ms")
    assert alone_at["c"] - started < 1.0
    notifications = [d for m, d in watcher.events if m == "active_speakers"]
    assert all(len(d["peers"]) <= 4 for d in notifications)

    quality = await watcher.wait_for_event("connection_quality", timeout=6)
    by_peer = {q["peer_id"]: q for q in quality["peers"]}
    assert set(by_peer) == {b.peer_id for b, _ in bots}
    for q in by_peer.values():
        assert q["quality"] in ("excellent", "good"), q  # loopback
        assert q["uplink_loss"] is not None and q["uplink_loss"] < 0.02
    assert any(q["rtt_ms"] is not None and q["rtt_ms"] < 100 for q in by_peer.values())


async def test_python_client_chat(server: ServerProcess, clients: list[ChorusClient], room_name: str) -> None:
    alice = await connect(server, clients)
    bob = await connect(server, clients)
    await alice.join(room_name, "alice")
    await bob.join(room_name, "bob")
    got: list[dict[str, Any]] = []
    bob.on_chat(got.append)
    arrived = bob.expect_event("chat")
    sent = await alice.send_chat("<b>hi</b>")
    await arrived
    assert got == [sent] and sent["text"] == "<b>hi</b>"
    with pytest.raises(RequestError) as excinfo:
        await alice.send_chat("z" * 5000)
    assert excinfo.value.code == "limit_exceeded"
    carol = await connect(server, clients)
    await carol.join(room_name, "carol")
    assert [m["text"] for m in carol.chat] == ["<b>hi</b>"]


async def test_a_stopped_m_section_ends_its_track_and_can_come_back(server: ServerProcess,
                                                                   clients: list[ChorusClient],
                                                                   room_name: str) -> None:
    """What screen sharing relies on: an m-section made inactive ends its track for the others at once; sending
    on it again is a new track; only sending m-sections count towards max_tracks_per_peer."""
    clip = encode_vp8_clip(frames=30)
    sharer = await connect(server, clients)
    await sharer.join(room_name, "sharer")
    watcher = await connect(server, clients, decode=False)
    await watcher.join(room_name, "watcher")
    first = await sharer.publish(SineTrack(440), EncodedVideoTrack(clip), EncodedVideoTrack(clip))
    screen = first[2]
    assert sharer.publish_pc is not None
    transceiver = next(t for t in sharer.publish_pc.getTransceivers() if t.mid == screen["mid"])

    gone = watcher.expect_event("track_unpublished", lambda d: d["track_id"] == screen["id"])
    transceiver.direction = "inactive"
    assert await sharer.publish() == []
    await gone

    back = watcher.expect_event("track_published", lambda d: d["peer_id"] == sharer.peer_id)
    transceiver.direction = "sendonly"
    revived = await sharer.publish()
    assert [t["mid"] for t in revived] == [screen["mid"]] and revived[0]["id"] != screen["id"]
    assert (await back)["track"]["id"] == revived[0]["id"]

    # unpublish ends it at once, before any renegotiation.
    gone = watcher.expect_event("track_unpublished", lambda d: d["track_id"] == revived[0]["id"])
    await sharer.request("unpublish", {"track_id": revived[0]["id"]})
    await gone
    with pytest.raises(RequestError) as missing:
        await sharer.request("unpublish", {"track_id": revived[0]["id"]})
    assert missing.value.code == "not_found"
    transceiver.direction = "inactive"
    assert await sharer.publish() == []

    # Four sending m-sections are the default limit (the inactive one does not count): a fifth is refused.
    await sharer.publish(SineTrack(550), EncodedVideoTrack(clip))
    with pytest.raises(RequestError) as excinfo:
        await sharer.publish(EncodedVideoTrack(clip))
    assert excinfo.value.code == "limit_exceeded"
