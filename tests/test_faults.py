"""Faults as operators meet them: a subscriber process killed, a publisher's network gone for 5 s, the
server itself crashing and coming back under live browser pages."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from browser import CHROMIUM, FLAGS, INBOUND_STATS, PER_STREAM_FRAMES, wait_until
from calls import Received, two_person_call
from conftest import ServerProcess, connect
from media import count_frames
from netns import NetworkNamespace

from chorus.signaling.client import ChorusClient

HERE = Path(__file__).resolve().parent
playwright_api = pytest.importorskip("playwright.async_api")


async def test_killed_subscriber_hurts_no_one(server: ServerProcess, clients: list[ChorusClient],
                                              room_name: str) -> None:
    publisher, watcher, video = await two_person_call(server, clients, room_name)

    proc = subprocess.Popen([sys.executable, str(HERE / "peer_process.py"), server.ws_url, room_name, "victim",
                             "subscribe"], stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)  # type: ignore[union-attr]
        victim = line.split()[1]
        await count_frames(video, 1.0)  # drain what queued up while the victim started
        before = await count_frames(video, 2.0) / 2.0
        sent_before = await sent_bytes(publisher)
        gone = watcher.expect_event("peer_left", lambda d: d["peer_id"] == victim, timeout=20)
        killed_at = time.monotonic()
        proc.kill()
        after = await count_frames(video, 3.0) / 3.0
        await gone
        sent_rate = (await sent_bytes(publisher) - sent_before) / (time.monotonic() - killed_at + 2.0)
        print(f"watcher {before:.1f} -> {after:.1f} fps; ghost gone after "
              f"{time.monotonic() - killed_at:.1f} s; publisher sending {sent_rate * 8 / 1000:.0f} kbps")
        assert after >= 0.9 * before
        assert time.monotonic() - killed_at < 20
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


async def sent_bytes(client: ChorusClient) -> int:
    stats = await client.publish_pc.getStats()  # type: ignore[union-attr]
    return sum(s.bytesSent for s in stats.values() if s.type == "outbound-rtp")


# --- the bundled page survives a server crash ------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed")
    async with playwright_api.async_playwright() as p:
        instance = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield instance
        await instance.close()


async def wait_video_rising(page: object, timeout: float) -> None:
    """Until the page decodes at least one remote video with frames still rising."""
    deadline = time.monotonic() + timeout
    await wait_until(page, f"({INBOUND_STATS})().then(s => s.video_streams >= 1)", timeout)
    first = await page.evaluate(PER_STREAM_FRAMES)  # type: ignore[attr-defined]
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        now = await page.evaluate(PER_STREAM_FRAMES)  # type: ignore[attr-defined]
        if any(v > first.get(k, 0) for k, v in now.items()):
            return
    raise AssertionError("video did not resume")


async def test_page_reconnects_after_server_restart(tmp_path: Path, browser: object) -> None:
    server = ServerProcess(tmp_path)
    try:
        pages = []
        for name in ("ann", "ben"):
            context = await browser.new_context()  # type: ignore[attr-defined]
            page = await context.new_page()
            await page.goto(f"{server.http_url}/?room=restart&name={name}")
            pages.append(page)
        for page in pages:
            await wait_video_rising(page, 15)

        server.kill()  # a crash: no goodbye
        server = ServerProcess(tmp_path, port=server.port)
        back_at = time.monotonic()
        await asyncio.gather(*(wait_video_rising(page, 10) for page in pages))
        elapsed = time.monotonic() - back_at
        print(f"both pages decoding again {elapsed:.1f} s after the server came back")
        assert elapsed <= 10
        for page in pages:
            assert await page.locator(".tile.remote").count() == 1  # type: ignore[attr-defined]
    finally:
        server.stop()


# --- a publisher's network disappears for 5 s -----------------------------------------------------------


async def test_publisher_network_drop_rejoins_without_duplicate(tmp_path: Path, netns: NetworkNamespace,
                                                                clients: list[ChorusClient]) -> None:
    server = ServerProcess(tmp_path, host=netns.host_ip, env={"CHORUS_ICE_HOST_ADDRESSES": json.dumps([netns.host_ip])})
    try:
        async with playwright_api.async_playwright() as p:
            # The page is served from the test host's address, not localhost: let it count as a secure
            # context so getUserMedia works.
            browser = await p.chromium.launch(executable_path=netns.wrap(CHROMIUM, tmp_path), args=[
                *FLAGS, f"--unsafely-treat-insecure-origin-as-secure={server.http_url}"])
            page = await (await browser.new_context()).new_page()
            await page.goto(f"{server.http_url}/?room=drop&name=mobile")
            await page.wait_for_function("window.chorusReady === true", timeout=15000)
            assert await page.evaluate("window.chorus.localTracks.length") == 2  # camera and mic published

            watcher = await connect(server, clients)
            received = Received(watcher)
            await watcher.join("drop", "watcher")
            await received.wait(2, timeout=15)
            old_id = next(peer for peer, kind in received.tracks)
            assert await count_frames(received.tracks[(old_id, "video")], 1.0) > 5

            left = watcher.expect_event("peer_left", lambda d: d["peer_id"] == old_id, timeout=40)
            netns.link(False)
            await asyncio.sleep(5.0)
            netns.link(True)
            restored_at = time.monotonic()

            # The page notices, rejoins with the same identity, and the server replaces the stale session.
            await left
            deadline = time.monotonic() + 10
            while not any(peer != old_id and kind == "video" for peer, kind in received.tracks):
                assert time.monotonic() < deadline, "the publisher did not come back within 10 s"
                await asyncio.sleep(0.1)
            new_id = next(peer for peer, kind in received.tracks if peer != old_id and kind == "video")
            video = received.tracks[(new_id, "video")]
            await asyncio.wait_for(video.recv(), max(0.1, deadline - time.monotonic()))  # first decoded frame
            elapsed = time.monotonic() - restored_at
            frames = await count_frames(video, 2.0)
            print(f"video back at the watcher {elapsed:.1f} s after the network returned ({frames} frames in the "
                  "next 2 s)")
            assert elapsed <= 10 and frames > 5

            with urllib.request.urlopen(f"{server.http_url}/api/rooms/drop", timeout=5) as response:
                names = sorted(p["name"] for p in json.loads(response.read())["participants"])
            assert names == ["mobile", "watcher"]  # no duplicate, no ghost
            await browser.close()
    finally:
        server.stop()
