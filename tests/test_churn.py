"""Churn: participants join, publish and leave over and over; nothing may be left behind.

``make test`` runs 100 cycles and checks that peer connections, media objects, tasks, threads, file
descriptors and UDP sockets return exactly to their baseline. ``make soak`` runs 1000 cycles
(CHORUS_CHURN_CYCLES) and also checks that RSS grows by at most 10 %.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from typing import Any

from calls import Received
from conftest import ServerProcess, connect
from media import EncodedVideoTrack, SineTrack, count_frames, encode_vp8_clip

from chorus.signaling.client import ChorusClient

CYCLES = int(os.environ.get("CHORUS_CHURN_CYCLES", "100"))
EXACT = ("peer_connections", "peers", "producers", "consumers", "tasks", "threads", "fds", "udp_sockets")


def process(server: ServerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.http_url}/api/debug/process", timeout=10) as response:
        return json.loads(response.read())


async def cycle(server: ServerProcess, room: str, clip: list[bytes], n: int) -> None:
    client = ChorusClient(server.ws_url)
    await client.connect()
    try:
        await client.join(room, f"churn{n}")
        await client.publish(SineTrack(300), EncodedVideoTrack(clip))
        pc = client.publish_pc
        assert pc is not None
        deadline = time.monotonic() + 10
        while pc.connectionState != "connected":
            assert time.monotonic() < deadline, "publish connection did not connect"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # let some media flow
        if n % 2:
            await client.leave()  # half leave politely, half just vanish
    finally:
        await client.close()


async def test_churn_returns_to_baseline(server: ServerProcess, clients: list[ChorusClient], room_name: str) -> None:
    clip = encode_vp8_clip(frames=30)
    # A long-lived participant watches everyone come and go (its subscribe connection gets compacted).
    watcher = await connect(server, clients)
    received = Received(watcher)
    await watcher.join(room_name, "watcher")

    for n in range(5):  # warm-up: imports, caches, first compaction paths
        await cycle(server, room_name, clip, n)
    await asyncio.sleep(1.0)
    before = process(server)

    started = time.monotonic()
    for n in range(CYCLES):
        await cycle(server, room_name, clip, n)
        if (n + 1) % 100 == 0:
            print(f"{n + 1}/{CYCLES} cycles, {time.monotonic() - started:.0f} s", flush=True)

    # Let closing finish, then compare.
    deadline = time.monotonic() + 20
    while True:
        after = process(server)
        if all(after[k] == before[k] for k in EXACT) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    print("before", before)
    print("after ", after)
    for key in EXACT:
        assert after[key] == before[key], (key, before[key], after[key])
    if CYCLES >= 1000:
        assert after["rss_bytes"] <= before["rss_bytes"] * 1.10, (before["rss_bytes"], after["rss_bytes"])

    # The watcher is still in a working call: a new publisher reaches it.
    publisher = await connect(server, clients)
    await publisher.join(room_name, "last")
    await publisher.publish(EncodedVideoTrack(clip))
    await received.wait(1, timeout=10)
    deadline = time.monotonic() + 10
    while (publisher.peer_id, "video") not in received.tracks:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert await count_frames(received.tracks[(publisher.peer_id, "video")], 3.0) >= 20  # type: ignore[index]
