"""Reconnection with backoff: a page whose ICE can never succeed follows the schedule, says so on screen
and gives up at the documented point; the schedule itself; the Python client on the same rules."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from browser import CHROMIUM, FLAGS
from conftest import ServerProcess, free_port
from netns import NetworkNamespace

from chorus.signaling.client import Backoff, ChorusClient

playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")

#: The test's shortened schedule (the defaults are 1 s doubling to 20 s, 12 attempts).
SCHEDULE = {"initialDelay": 400, "maxDelay": 1600, "maxAttempts": 4, "stableAfter": 10000, "connectTimeout": 2500}


def ceiling(attempt: int) -> float:
    """The upper bound (ms) of the delay before failed attempt number ``attempt`` (1-based)."""
    return float(min(SCHEDULE["maxDelay"], SCHEDULE["initialDelay"] * 2 ** (attempt - 1)))


@pytest.mark.timeout(150)
async def test_page_whose_ice_never_succeeds_backs_off(tmp_path: Path,
                                                       netns_factory: Callable[[], NetworkNamespace]) -> None:
    ns = netns_factory()
    # The server offers only 127.0.0.1 as its media address: from the namespace that is the namespace's own
    # loopback, so ICE can never succeed, while signaling (the veth address, HTTPS) works. (The schedule is
    # shortened, and so is connectTimeout: Chromium itself takes ~18 s to call such a connection failed.)
    server = ServerProcess(tmp_path, host=ns.host_ip, tls=True,
                           args=["--self-signed", ns.host_ip, "--cert-dir", str(tmp_path / "certs")])
    try:
        pin = server.log().split("SPKI pin (sha256/base64) ", 1)[1].split()[0]
        async with playwright_api.async_playwright() as p:
            browser = await p.chromium.launch(executable_path=ns.wrap(CHROMIUM, tmp_path),
                                              args=[*FLAGS, f"--ignore-certificate-errors-spki-list={pin}"])
            context = await browser.new_context()
            await context.add_init_script(f"window.chorusReconnect = {json.dumps(SCHEDULE)}")
            page = await context.new_page()
            await page.goto(f"https://{ns.host_ip}:{server.port}/?room=unreachable&name=lost")
            started = time.monotonic()
            delays: list[tuple[int, int]] = []  # (attempt, delay ms) as the client chose them
            texts: set[str] = set()
            last_retry = None
            while time.monotonic() - started < 120:
                state = await page.evaluate("""() => ({state: window.chorus && window.chorus.state,
                    retryAt: window.chorus && window.chorus.retryAt, delay: window.chorus && window.chorus.retryDelay,
                    attempt: window.chorus && window.chorus.backoff.attempt,
                    text: document.getElementById('status').textContent,
                    error: document.getElementById('error').textContent})""")
                if state["retryAt"] and state["retryAt"] != last_retry:
                    last_retry = state["retryAt"]
                    delays.append((state["attempt"], state["delay"]))
                texts.add(state["text"])
                if state["state"] == "failed":
                    break
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started
            await page.screenshot(path=str(tmp_path / "gave-up.png"))
            await browser.close()
        print(f"attempts (number, delay ms): {delays}; gave up after {elapsed:.1f} s; status texts seen: "
              f"{sorted(t for t in texts if 'attempt' in t)[:4]}...; final error: {state['error']!r}")
        assert state["state"] == "failed"
        assert [a for a, _ in delays] == list(range(1, SCHEDULE["maxAttempts"] + 1))
        for attempt, delay in delays:  # within [½, 1] of the ceiling: exponential, capped, jittered
            assert ceiling(attempt) / 2 <= delay <= ceiling(attempt), (attempt, delay)
        assert len({d for _, d in delays}) > 1
        assert any(t.startswith("reconnecting in") and f"of {SCHEDULE['maxAttempts']})" in t for t in texts), texts
        assert f"gave up after {SCHEDULE['maxAttempts']} attempts" in state["error"]
        assert elapsed < 45
    finally:
        server.stop()


async def test_backoff_schedule() -> None:
    backoff = Backoff()  # the defaults
    ceilings = [min(20.0, 2.0**n) for n in range(12)]
    delays = [backoff.next() for _ in range(13)]
    assert delays[-1] is None  # gives up after 12 attempts
    for delay, top in zip(delays, ceilings, strict=False):
        assert delay is not None and top / 2 <= delay <= top
    assert max(d for d in delays if d is not None) >= 15.0 / 2 and ceilings[-1] >= 15.0
    backoff.reset()
    assert backoff.next() is not None and backoff.attempt == 1


async def test_python_client_backs_off_and_gives_up(tmp_path: Path) -> None:
    """The server goes away for good: the client retries on the schedule, then gives up."""
    port = free_port()
    server = ServerProcess(tmp_path, port=port)
    client = ChorusClient(server.ws_url, reconnect=True,
                          backoff=Backoff(initial_delay=0.2, max_delay=0.8, max_attempts=4))
    try:
        await client.connect()
        await client.join("gone", "bot")
        server.kill()
        started = time.monotonic()
        await asyncio.wait_for(client.gave_up.wait(), 20)
        took = time.monotonic() - started
        states = [s for _, s, _ in client.state_changes]
        print(f"python client: {states}, gave up after {took:.1f} s")
        assert states == ["connected", "reconnecting", "failed"]
        assert 0.1 + 0.2 + 0.4 + 0.4 <= took <= 0.2 + 0.4 + 0.8 + 0.8 + 5  # the four delays, plus connect failures
    finally:
        await client.close()
        server.stop()


async def test_python_client_rejoins_when_server_returns(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(tmp_path, port=port)
    client = ChorusClient(server.ws_url, reconnect=True, backoff=Backoff(initial_delay=0.5, max_delay=2.0))
    try:
        await client.connect()
        await client.join("back", "bot")
        server.kill()
        await asyncio.sleep(1.5)
        server = ServerProcess(tmp_path, port=port)
        await asyncio.wait_for(client.reconnected.wait(), 15)
        assert client.state == "connected"
        assert json.loads(server.get("/api/rooms/back")[1])["participants"][0]["name"] == "bot"
    finally:
        await client.close()
        server.stop()
