"""Several Chorus nodes on one real redis-server: placement, redirects, node death, Redis outages."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import CHROMIUM, FLAGS, INBOUND_STATS, wait_until
from calls import Received
from conftest import ServerProcess, connect, free_port
from media import ColorTrack, EncodedVideoTrack, SineTrack, count_frames, encode_vp8_clip

from chorus.signaling.client import ChorusClient, RequestError

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


class Redis:
    """A throwaway redis-server on loopback (no persistence)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.folder = folder
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                             text=True).stdout.strip() != "PONG":
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def nodes(tmp_path: Path, redis: Redis) -> Iterator[list[ServerProcess]]:
    started = []
    for _ in range(2):
        port = free_port()
        started.append(ServerProcess(tmp_path, port=port, env={
            "CHORUS_REDIS_URL": redis.url, "CHORUS_NODE_URL": f"ws://127.0.0.1:{port}/ws", "CHORUS_NODE_TTL": "3"}))
    for node in started:
        wait_ready(node)
    yield started
    for node in started:
        node.stop()
        assert "Traceback" not in node.log()


def status(node: ServerProcess, path: str) -> int:
    try:
        with urllib.request.urlopen(node.http_url + path, timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_ready(node: ServerProcess, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while status(node, "/readyz") != 200:
        assert time.monotonic() < deadline, "node never became ready"
        time.sleep(0.1)


def api(node: ServerProcess, path: str) -> dict:
    with urllib.request.urlopen(node.http_url + path, timeout=5) as response:
        return json.loads(response.read())


async def test_clients_on_two_nodes_end_up_in_one_call(nodes: list[ServerProcess], clients: list[ChorusClient]) -> None:
    a, b = nodes
    alice = await connect(a, clients)
    alice_received = Received(alice)
    await alice.join("shared", "alice")
    await alice.publish(SineTrack(440), ColorTrack())
    bob = await connect(b, clients)  # connects to the other node...
    bob_received = Received(bob)
    await bob.join("shared", "bob")
    # ...and both end up on the node hosting the room (one of them was redirected there).
    assert bob.url == alice.url
    await bob.publish(SineTrack(660), ColorTrack())
    await alice_received.wait(2)
    await bob_received.wait(2)
    assert await count_frames(bob_received.tracks[(alice.peer_id, "video")], 2.0) >= 20  # type: ignore[index]
    assert await count_frames(alice_received.tracks[(bob.peer_id, "video")], 2.0) >= 20  # type: ignore[index]
    # The admin API of either node sees the whole cluster.
    for node in nodes:
        listed = {r["id"]: r for r in api(node, "/api/rooms")["rooms"]}
        assert listed["shared"]["participants"] == 2
        assert {p["name"] for p in api(node, "/api/rooms/shared")["participants"]} == {"alice", "bob"}
    assert len(api(b, "/api/nodes")["nodes"]) == 2


async def test_rooms_spread_evenly(nodes: list[ServerProcess], clients: list[ChorusClient]) -> None:
    for i in range(20):
        client = await connect(nodes[i % 2], clients)  # whichever node a client happens to reach
        await client.join(f"spread-{i}", "p")
    placed = Counter(r["node"] for r in api(nodes[0], "/api/rooms")["rooms"])
    print("rooms per node:", dict(placed))
    assert sum(placed.values()) == 20 and len(placed) == 2
    assert all(7 <= n <= 13 for n in placed.values())  # within ±30 % of 10


async def test_killed_node_clients_rejoin_elsewhere(nodes: list[ServerProcess], clients: list[ChorusClient],
                                                    tmp_path: Path) -> None:
    a, b = nodes
    clip = encode_vp8_clip(frames=60)
    # A Python publisher and a browser page, both in a room hosted by node A.
    publisher = await connect(a, clients, reconnect=True)
    publisher.republish = lambda: [EncodedVideoTrack(clip)]
    await publisher.join("survivor", "pub")
    await publisher.publish(EncodedVideoTrack(clip))
    if publisher.url != a.ws_url:  # placed on B: make A the host by killing B instead
        a, b = b, a
    assert publisher.url == a.ws_url

    async with __import__("playwright.async_api").async_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = await (await browser.new_context()).new_page()
        await page.goto(f"{a.http_url}/?room=survivor&name=viewer")
        await wait_until(page, f"({INBOUND_STATS})().then(s => s.video_frames > 10)", 15)

        a.kill()
        killed_at = time.monotonic()
        await asyncio.wait_for(publisher.reconnected.wait(), 15)
        assert publisher.url == b.ws_url
        # The page reconnects to node B and decodes the publisher again.
        await wait_until(page, f"""(async () => window.chorus.state === 'connected'
            && window.chorus.url === {json.dumps(b.ws_url)}
            && (await ({INBOUND_STATS})()).video_frames > 10)()""", 15 - (time.monotonic() - killed_at))
        elapsed = time.monotonic() - killed_at
        print(f"clients of the killed node back in a call on the other node after {elapsed:.1f} s")
        assert elapsed <= 15
        participants = {p["name"] for p in api(b, "/api/rooms/survivor")["participants"]}
        assert participants == {"pub", "viewer"}
        await browser.close()


async def test_redis_outage_keeps_calls_and_recovers(nodes: list[ServerProcess], redis: Redis,
                                                     clients: list[ChorusClient]) -> None:
    alice = await connect(nodes[0], clients)
    await alice.join("outage", "alice")
    await alice.publish(EncodedVideoTrack(encode_vp8_clip(frames=60)))
    a = next(n for n in nodes if n.ws_url == alice.url)  # the node hosting the call (placement chose it)
    bob = await connect(a, clients)
    received = Received(bob)
    await bob.join("outage", "bob")
    await received.wait(1)
    video = received.tracks[(alice.peer_id, "video")]  # type: ignore[index]
    await count_frames(video, 1.0)  # past the start-up
    before = await count_frames(video, 2.0) / 2.0

    redis.stop()
    stopped_at = time.monotonic()
    frames = 0
    readiness = set()
    while time.monotonic() - stopped_at < 15:
        frames += await count_frames(video, 1.0)
        readiness.add(status(a, "/readyz"))
        assert status(a, "/healthz") == 200  # live throughout
    during = frames / (time.monotonic() - stopped_at)
    # A room the node already hosts still takes joins; a new room cannot be placed.
    carol = await connect(a, clients)
    await carol.join("outage", "carol")
    eve = await connect(a, clients)
    with pytest.raises(RequestError) as excinfo:
        await eve.join("new-during-outage", "eve")
    assert excinfo.value.code == "unavailable"
    redis.start()
    wait_ready(a, timeout=10)
    print(f"call at {before:.1f} fps before, {during:.1f} fps during 15 s without Redis; readiness seen "
          f"{sorted(readiness)}, ready again after Redis came back")
    assert 503 in readiness
    assert during >= 0.9 * before
    # The room is registered again, and placement works again.
    deadline = time.monotonic() + 5
    while "outage" not in {r["id"] for r in api(a, "/api/rooms")["rooms"]}:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    dave = await connect(a, clients)
    await dave.join("after-outage", "dave")


async def test_whip_and_whep_redirect_to_the_node_hosting_the_room_and_ingress_keys_are_shared(
        nodes: list[ServerProcess], clients: list[ChorusClient]) -> None:
    """A WHIP or WHEP POST to the node that does not host the room gets 307 to the one that does (RFC 9725 §4.5);
    an ingress created on one node is known (and revoked) on the other through Redis."""
    import aiohttp

    alice = await connect(nodes[0], clients)
    await alice.join("streamed", "alice")
    await alice.publish(SineTrack(440), EncodedVideoTrack(encode_vp8_clip(frames=30)))
    host = next(n for n in nodes if alice.url == n.ws_url)
    other = next(n for n in nodes if n is not host)
    offer = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    async with aiohttp.ClientSession() as http:
        for path in ("/whip/streamed?name=cam", "/whep/streamed", "/whep/streamed/alice"):
            async with http.post(other.http_url + path, data=offer, allow_redirects=False,
                                 headers={"Content-Type": "application/sdp"}) as response:
                assert response.status == 307, path
                assert response.headers["Location"] == host.http_url + path
        async with http.post(other.http_url + "/api/ingress",
                             json={"kind": "rtmp", "room": "streamed", "name": "obs"}) as response:
            assert response.status == 201
            created = await response.json()

        async def listed(node: ServerProcess) -> set[str]:
            async with http.get(node.http_url + "/api/ingress") as response:
                return {i["id"] for i in (await response.json())["ingresses"]}

        deadline = time.monotonic() + 5
        while created["id"] not in await listed(host):
            assert time.monotonic() < deadline, "the other node never saw the ingress"
            await asyncio.sleep(0.2)
        async with http.delete(f"{host.http_url}/api/ingress/{created['id']}") as response:
            assert response.status == 204
        deadline = time.monotonic() + 5
        while created["id"] in await listed(other):
            assert time.monotonic() < deadline, "the revocation never reached the other node"
            await asyncio.sleep(0.2)
