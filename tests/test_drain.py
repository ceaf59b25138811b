"""Graceful drain: SIGTERM (or POST /api/drain) moves a cluster node's calls to another node without ending
them; a single node tells its participants, answers /readyz 503, waits, then exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from browser import CHROMIUM, FLAGS, INBOUND_STATS, wait_until
from conftest import ServerProcess, connect, free_port
from test_cluster import Redis, wait_ready

from chorus.signaling.client import ChorusClient, RequestError

playwright_api = pytest.importorskip("playwright.async_api")

#: In-page sampler: the longest time (ms) without a new decoded video frame since `armed`, across the
#: subscribe connections the page goes through (a reconnection brings a new one whose count starts at 0).
GAP_SAMPLER = """() => {
  const s = window.__gap = {armed: false, lastFrameAt: performance.now(), maxGap: 0, pc: null, count: 0};
  setInterval(async () => {
    const pc = window.chorus && window.chorus.subscribePc;
    let frames = 0;
    if (pc) (await pc.getStats()).forEach(r => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') frames += r.framesDecoded || 0;
    });
    const now = performance.now();
    if (pc !== s.pc) { s.pc = pc; s.count = 0; }
    if (frames > s.count) { s.count = frames; s.lastFrameAt = now; }
    if (s.armed) s.maxGap = Math.max(s.maxGap, now - s.lastFrameAt);
  }, 40);
}"""


class Webhooks:
    """A webhook receiver on loopback: every delivery's JSON body, in arrival order."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        self.events.append(await request.json())
        return web.Response(status=204)

    def names(self) -> list[str]:
        return [e["event"] for e in self.events]


@pytest.fixture
async def webhooks() -> AsyncIterator[Webhooks]:
    hooks = Webhooks()
    app = web.Application()
    app.router.add_post("/hook", hooks.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", hooks.port).start()
    yield hooks
    await runner.cleanup()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    yield server
    server.stop()


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the server did not exit"
        await asyncio.sleep(0.05)
    return int(proc.returncode)


@pytest.mark.timeout(120)
async def test_cluster_drain_moves_browser_calls(tmp_path: Path, redis: Redis, webhooks: Webhooks) -> None:
    nodes = []
    for _ in range(2):
        port = free_port()
        nodes.append(ServerProcess(tmp_path, port=port, env={
            "CHORUS_REDIS_URL": redis.url, "CHORUS_NODE_URL": f"ws://127.0.0.1:{port}/ws", "CHORUS_NODE_TTL": "3",
            "CHORUS_DRAIN_TIMEOUT": "30", "CHORUS_WEBHOOK_URLS": json.dumps([webhooks.url])}))
    try:
        for node in nodes:
            wait_ready(node)
        a, b = nodes
        async with playwright_api.async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            pages = []
            for name in ("ann", "ben"):
                page = await (await browser.new_context()).new_page()
                await page.goto(f"{a.http_url}/?room=moving&name={name}")
                pages.append(page)
            for page in pages:
                await wait_until(page, f"({INBOUND_STATS})().then(s => s.video_frames > 20)", 20)
            if await pages[0].evaluate("window.chorus.url") != a.ws_url:
                a, b = b, a  # placement put the room on the other node: drain that one
            for page in pages:
                await page.evaluate(GAP_SAMPLER)
            await asyncio.sleep(1.0)
            for page in pages:
                await page.evaluate("window.__gap.armed = true; window.__gap.maxGap = 0")

            a.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            status, body = a.get("/readyz")
            assert status == 503 and json.loads(body)["status"] == "draining"
            for page in pages:  # both pages carry on on node B, by themselves
                try:
                    await wait_until(page, f"""(async () => window.chorus.state === 'connected'
                        && window.chorus.url === {json.dumps(b.ws_url)}
                        && (await ({INBOUND_STATS})()).video_frames > 20)()""", 20)
                except AssertionError:
                    seen = await page.evaluate(f"""async () => ({{state: window.chorus.state, url: window.chorus.url,
                        error: String(window.chorus.lastError), stats: await ({INBOUND_STATS})()}})""")
                    raise AssertionError(f"page not back on B ({b.ws_url}): {seen}\nA: {a.log()[-3000:]}\n"
                                         f"B: {b.log()[-3000:]}") from None
            code = await wait_exit(a.proc, 20)
            drained_after = time.monotonic() - started
            await asyncio.sleep(1.0)
            gaps = [await page.evaluate("window.__gap.maxGap") for page in pages]
            states = [await page.evaluate("window.chorus.state") for page in pages]
            room = json.loads(b.get("/api/rooms/moving")[1])
            await browser.close()
        print(f"node A drained and exited ({code}) {drained_after:.1f} s after SIGTERM; longest media gap per "
              f"page on the move: {', '.join(f'{g / 1000:.2f} s' for g in gaps)}")
        assert code == 0
        assert states == ["connected", "connected"]
        assert max(gaps) < 3000, gaps
        assert drained_after < 15
        assert sorted(p["name"] for p in room["participants"]) == ["ann", "ben"]  # one room on B, no ghosts
        log = a.log()
        assert "draining" in log and "outcome=empty" in log and "Traceback" not in log
        # The webhooks say what happened: A drains, its participants leave it, the room finishes there and
        # starts on B, A is drained.
        deadline = time.monotonic() + 5
        while "node_drained" not in webhooks.names():
            assert time.monotonic() < deadline, webhooks.names()
            await asyncio.sleep(0.1)
        names = webhooks.names()
        assert names.index("node_draining") < names.index("node_drained")
        drained = next(e for e in webhooks.events if e["event"] == "node_drained")
        assert drained["outcome"] == "empty"
        left = [e for e in webhooks.events if e["event"] == "participant_left" and e.get("reason") == "drained"]
        assert len(left) == 2
    finally:
        for node in nodes:
            node.stop()


async def test_single_node_drain(tmp_path: Path, webhooks: Webhooks, clients: list[ChorusClient]) -> None:
    """No other node: participants hear `draining` (no url), the node answers /readyz 503 and refuses joins
    until the deadline, then closes the call, and exits 0."""
    node = ServerProcess(tmp_path, env={"CHORUS_DRAIN_TIMEOUT": "4",
                                        "CHORUS_WEBHOOK_URLS": json.dumps([webhooks.url])})
    try:
        members = []
        for name in ("amy", "bob"):
            client = await connect(node, clients)
            await client.join("single", name)
            members.append(client)
        draining = [c.expect_event("draining", timeout=5) for c in members]
        left = [c.expect_event("left", timeout=15) for c in members]
        node.proc.send_signal(signal.SIGTERM)
        signalled = time.time()
        notices = [await d for d in draining]
        heard = time.time()
        for notice in notices:
            assert "url" not in notice
            assert abs(notice["deadline"] - (signalled + 4)) < 1.0
        readiness = set()
        while time.time() < signalled + 3:
            status, body = node.get("/readyz")
            readiness.add((status, json.loads(body)["status"]))
            await asyncio.sleep(0.2)
        assert readiness == {(503, "draining")}
        latecomer = await connect(node, clients)
        with pytest.raises(RequestError) as excinfo:
            await latecomer.join("single", "late")
        assert excinfo.value.code == "unavailable"
        endings = [await e for e in left]
        closed = time.time()
        assert all(e["reason"] == "server shutdown" for e in endings)
        assert closed >= notices[0]["deadline"] - 0.5  # the call went on until the deadline
        assert await wait_exit(node.proc, 10) == 0
        print(f"draining heard {heard - signalled:.2f} s after SIGTERM, call closed after "
              f"{closed - signalled:.1f} s (deadline 4 s), exit 0")
        names = webhooks.names()
        assert "node_draining" in names and "node_drained" in names
        drained = next(e for e in webhooks.events if e["event"] == "node_drained")
        assert drained["outcome"] == "timeout" and drained["rooms_closed"] == 1
        assert names.index("node_draining") < names.index("room_finished") < names.index("node_drained")
    finally:
        node.stop()


async def test_drain_api_and_second_sigterm(tmp_path: Path, clients: list[ChorusClient]) -> None:
    node = ServerProcess(tmp_path, env={"CHORUS_DRAIN_TIMEOUT": "60"})
    try:
        client = await connect(node, clients)
        await client.join("stays", "carol")
        # POST /api/drain drains like SIGTERM (a custom timeout may be given).
        import urllib.request

        request = urllib.request.Request(f"{node.http_url}/api/drain", data=b'{"timeout": 60}', method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 202
            state = json.loads(response.read())
        assert state["draining"] is True and state["deadline"] > time.time() + 50
        await client.wait_for_event("draining", timeout=5)
        assert node.get("/readyz")[0] == 503
        # The room keeps the node waiting; a second SIGTERM (first one while draining) ends it at once.
        node.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await wait_exit(node.proc, 10)
        print(f"SIGTERM while draining: exit {code} after {time.monotonic() - started:.2f} s")
        assert code == 143
        assert time.monotonic() - started < 3
    finally:
        node.stop()


async def test_sigint_stops_at_once(tmp_path: Path) -> None:
    node = ServerProcess(tmp_path)
    node.proc.send_signal(signal.SIGINT)
    assert await wait_exit(node.proc, 10) == 0
    node.stop()
    assert "Traceback" not in node.log()


def test_exit_status_is_documented() -> None:
    root = Path(__file__).resolve().parent.parent
    docs = (root / "docs" / "admin-api.md").read_text()
    assert "143" in docs and "SIGTERM" in docs
    assert os.path.exists(root / "docs" / "deploy.md")
