"""The long steady call (``make soak``, not ``make test``): three Chromium pages in one room for
CHORUS_SOAK_MINUTES minutes (each publishing the fake 640x480 camera and microphone, each receiving the other
two), the server's RSS and every page's decoded frame rate reported each minute. RSS at the end must be within
5 % of minute 10 (the caches fill during the first minutes), and the frame rates unchanged."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from browser import CHROMIUM, FLAGS, INBOUND_STATS, wait_until
from conftest import ServerProcess

playwright_api = pytest.importorskip("playwright.async_api")

MINUTES = int(os.environ.get("CHORUS_SOAK_MINUTES", "0"))

pytestmark = [
    pytest.mark.skipif(MINUTES <= 0, reason="the long call runs in make soak (CHORUS_SOAK_MINUTES)"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed"),
]


async def test_steady_call_memory(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, env={"CHORUS_LOG_LEVEL": "warning"})
    series: list[dict[str, float]] = []
    try:
        async with playwright_api.async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            pages = []
            for i in range(3):
                page = await (await browser.new_context()).new_page()
                await page.goto(f"{server.http_url}/?room=soak&name=p{i}")
                pages.append(page)
            for page in pages:
                await wait_until(page, f"({INBOUND_STATS})().then(s => s.video_streams >= 2)", 30)
            started = time.monotonic()
            last = [(await page.evaluate(INBOUND_STATS))["video_frames"] for page in pages]
            for minute in range(1, MINUTES + 1):
                await asyncio.sleep(started + minute * 60 - time.monotonic())
                frames = [(await page.evaluate(INBOUND_STATS))["video_frames"] for page in pages]
                fps = [round((now - then) / 60 / 2, 1) for now, then in zip(frames, last, strict=True)]
                last = frames  # fps above: per remote stream (two per page)
                process = json.loads(server.get("/api/debug/process", timeout=30)[1])
                point = {"minute": minute, "rss_mb": round(process["rss_bytes"] / 1e6, 1), "fps": min(fps),
                         "tasks": process["tasks"], "fds": process["fds"], "python_blocks": process["python_blocks"],
                         "malloc_in_use_mb": round(process.get("malloc_in_use_bytes", 0) / 1e6, 1),
                         "malloc_free_mb": round(process.get("malloc_free_bytes", 0) / 1e6, 1)}
                series.append(point)
                print(f"soak minute {minute}: RSS {point['rss_mb']} MB, fps per remote stream {fps}, "
                      f"tasks {point['tasks']}, fds {point['fds']}, python blocks {point['python_blocks']}, "
                      f"malloc in use {point['malloc_in_use_mb']} MB, free {point['malloc_free_mb']} MB", flush=True)
            await browser.close()
    finally:
        server.stop()
        (tmp_path / "soak.json").write_text(json.dumps(series))
        print("soak series:", json.dumps(series), flush=True)
    assert "Traceback" not in server.log()
    if MINUTES >= 12:
        at10, end = series[9], series[-1]
        assert end["rss_mb"] <= at10["rss_mb"] * 1.05, (at10, end)
        assert end["fps"] >= 0.9 * at10["fps"], (at10, end)
