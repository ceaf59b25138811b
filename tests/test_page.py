"""
The call page in real headless Chromium (fake devices): screen share, devices, chat, active speaker, layouts at
desktop and phone sizes (screenshots kept in test-artifacts/), MCU rooms from the page and from the admin API.

Pages capture 640x360 without simulcast (``&video=640x360&simulcast=0``) where three share the two cores;
the layout test runs the page as shipped (1280x720, simulcast) beside three aiortc bots.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from browser import CHROMIUM, FLAGS, speech_wav, wait_until
from conftest import ROOT, ServerProcess, connect
from media import EncodedVideoTrack, SineTrack

from chorus.signaling.client import ChorusClient

playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed"),
    pytest.mark.timeout(150),
]

ARTIFACTS = Path(os.environ.get("CHORUS_ARTIFACTS", ROOT / "test-artifacts")) / "page"
LIGHT = "&video=640x360&simulcast=0"

#: framesDecoded of each remote video the page shows, keyed "<peer id>:<source>" (source: camera, screen).
REMOTE_FRAMES = """async () => {
  const c = window.chorus;
  const out = {};
  if (!c || !c.subscribePc) return out;
  const byTrack = new Map([...c.remoteTracks.values()].map((t) => [t.track.id, t]));
  (await c.subscribePc.getStats()).forEach((r) => {
    const t = r.type === 'inbound-rtp' && r.kind === 'video' && byTrack.get(r.trackIdentifier);
    if (t) out[`${t.peerId}:${t.source}`] = r.framesDecoded || 0;
  });
  return out;
}"""

#: How much of the area between the header and the controls the videos' pictures cover (each video's content
#: rectangle after object-fit, clipped to its element and the area), and whether anything leaves the viewport.
GEOMETRY = """() => {
  const header = document.getElementById('topbar').getBoundingClientRect();
  const controls = document.getElementById('controls').getBoundingClientRect();
  const area = { left: 0, top: header.bottom, right: innerWidth, bottom: controls.top };
  const size = (area.right - area.left) * (area.bottom - area.top);
  let covered = 0;
  const videos = [];
  for (const v of document.querySelectorAll('#stage .tile:not([hidden]) video')) {
    const box = v.getBoundingClientRect();
    if (!v.videoWidth || !box.width || !box.height) continue;
    const ratio = v.videoWidth / v.videoHeight;
    let w = box.width;
    let h = box.height;
    const fit = getComputedStyle(v).objectFit;
    if (fit === 'contain' ? w / h > ratio : w / h < ratio) w = h * ratio; else h = w / ratio;
    const x = box.left + (box.width - w) / 2;
    const y = box.top + (box.height - h) / 2;
    const x1 = Math.max(x, box.left, area.left);
    const y1 = Math.max(y, box.top, area.top);
    const x2 = Math.min(x + w, box.right, area.right);
    const y2 = Math.min(y + h, box.bottom, area.bottom);
    if (x2 > x1 && y2 > y1) covered += (x2 - x1) * (y2 - y1);
    videos.push({ tile: v.parentElement.dataset.tileId, fit, box: [box.left, box.top, box.width, box.height] });
  }
  const outside = [];
  for (const el of document.querySelectorAll('body *')) {
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height || el.closest('[hidden]')) continue;
    if (r.left < -0.5 || r.top < -0.5 || r.right > innerWidth + 0.5 || r.bottom > innerHeight + 0.5) {
      outside.push(`${el.tagName}#${el.id}.${el.className}`);
    }
  }
  const root = document.documentElement;
  const scrolls = root.scrollWidth > innerWidth || root.scrollHeight > innerHeight;
  const layout = document.getElementById('stage').dataset.layout;
  return { coverage: covered / size, outside, scrolls, videos, layout };
}"""


def flags(*extra: str, devices: int = 2) -> list[str]:
    base = [f for f in FLAGS if not f.startswith("--use-fake-device-for-media-stream")]
    return [*base, f"--use-fake-device-for-media-stream=fps=30,device-count={devices}", *extra]


@asynccontextmanager
async def chromium(*extra: str, devices: int = 2) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=flags(*extra, devices=devices))
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Any, url: str, *, width: int = 960, height: int = 640) -> Any:
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    await page.goto(url)
    return page


def url(server: ServerProcess, room: str, name: str, extra: str = LIGHT) -> str:
    return f"{server.http_url}/?room={room}&name={name}{extra}"


async def ready(page: Any, remote_videos: int, timeout: float = 20) -> None:
    """Joined, and `remote_videos` remote videos decoding."""
    await page.wait_for_function("window.chorusReady === true", timeout=timeout * 1000)
    await wait_until(page, f"({REMOTE_FRAMES})().then(f => Object.values(f).filter(n => n > 3).length >= "
                           f"{remote_videos})", timeout)


async def frames(page: Any) -> dict[str, int]:
    result: dict[str, int] = await page.evaluate(REMOTE_FRAMES)
    return result


async def api(server: ServerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(method, f"{server.http_url}/api{path}",
                                                             json=body) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


async def timed(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> float:
    """Seconds until ``await condition()`` is true (fails after ``timeout``)."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def test_screen_share_device_switch_and_track_limit(server: ServerProcess, room_name: str) -> None:
    # Three fake cameras: Chromium's second one (fake_device_1) is a Y16 depth camera whose frames WebRTC never
    # encodes (not even between two local RTCPeerConnections); the third is an ordinary camera.
    async with chromium(devices=3) as browser:
        a, b, c = [await open_page(browser, url(server, room_name, n)) for n in "abc"]
        await asyncio.gather(*(ready(p, 2) for p in (a, b, c)))
        a_id, b_id = await a.evaluate("chorus.peerId"), await b.evaluate("chorus.peerId")

        # Must show 1: A shares its screen; B and C decode it as a second video of A, shown large.
        await a.click("#screen-button")
        for page in (b, c):
            await wait_until(page, f"({REMOTE_FRAMES})().then(f => f['{a_id}:screen'] > 10)", 15)
        before = [await frames(p) for p in (b, c)]
        await asyncio.sleep(2.0)
        after = [await frames(p) for p in (b, c)]
        for first, second in zip(before, after, strict=True):
            # A captured screen only sends frames when it changes: decoded is enough; A's camera keeps going.
            assert second[f"{a_id}:screen"] > 10
            assert second[f"{a_id}:camera"] - first[f"{a_id}:camera"] > 5, (first, second)
        for page in (b, c):
            size = await page.evaluate("[document.querySelector('.tile.screen video').videoWidth, "
                                       "document.querySelector('.tile.screen video').videoHeight]")
            assert size[0] >= 640 and size[1] >= 360, size
        for page in (b, c):
            assert await page.evaluate("document.querySelector('.tile.screen').classList.contains('main')")
            assert await page.evaluate("document.querySelector('.tile.screen .label').textContent") == "a's screen"
        assert await a.evaluate("Object.keys(chorus.sources).sort().join()") == \
            "camera,microphone,screen,screen_audio"

        # A fifth track (beyond camera, mic, screen, screen audio) is refused with limit_exceeded; nothing breaks.
        code = await a.evaluate("""async () => {
          const canvas = document.createElement('canvas');
          canvas.width = canvas.height = 64;
          canvas.getContext('2d').fillRect(0, 0, 64, 64);
          const track = canvas.captureStream(5).getVideoTracks()[0];
          try { await chorus.publishTrack(track); return 'published'; } catch (e) { return e.code; }
        }""")
        assert code == "limit_exceeded"
        assert await a.evaluate("chorus.publishPc.signalingState") == "stable"

        # The browser ends the capture (its "Stop sharing"): gone for the others within 1 s.
        await a.evaluate("() => { const t = chorus.sources.screen; t.stop(); t.dispatchEvent(new Event('ended')); }")
        started = time.monotonic()
        gone = "() => !document.querySelector('.tile.screen') && " \
               "![...chorus.remoteTracks.values()].some((t) => t.source === 'screen')"
        await asyncio.gather(*(p.wait_for_function(gone, polling=50, timeout=5000) for p in (b, c)))
        elapsed = time.monotonic() - started
        print(f"screen share gone for the others {elapsed * 1000:.0f} ms after the capture ended")
        assert elapsed < 1.0
        # A shares again (its m-sections are reused) and stops with the button.
        await a.click("#screen-button")
        try:
            await wait_until(b, f"({REMOTE_FRAMES})().then(f => f['{a_id}:screen'] > 5)", 15)
        except AssertionError:
            print("B:", await b.evaluate("[...chorus.remoteTracks.values()].map(t => [t.source, t.trackId, "
                                         "t.track.readyState, t.track.muted])"), await frames(b))
            print("A:", await a.evaluate("[chorus.localTracks.map(t => [t.source, t.id, t.mid]), "
                                         "Object.keys(chorus.sources), document.getElementById('error').textContent]"))
            raise
        await a.click("#screen-button")
        await b.wait_for_function(gone, polling=50, timeout=3000)

        # Must show 4: B switches camera mid-call; A and C keep decoding it, no gap over 1 s.
        await b.click("#devices-button")
        options = await b.eval_on_selector_all("#camera-select option", "os => os.map(o => [o.value, o.text])")
        assert [label for _, label in options] == ["fake_device_0", "fake_device_1", "fake_device_2"], options
        current = await b.evaluate("chorus.sources.camera.getSettings().deviceId")
        assert current == options[0][0]
        other = options[2][0]
        samples: dict[int, list[tuple[float, int]]] = {0: [], 1: []}

        async def watch(index: int, page: Any, seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                samples[index].append((time.monotonic(), (await frames(page)).get(f"{b_id}:camera", 0)))
                await asyncio.sleep(0.05)

        async def switch() -> None:
            await asyncio.sleep(1.0)
            await b.select_option("#camera-select", other)

        await asyncio.gather(watch(0, a, 4.0), watch(1, c, 4.0), switch())
        assert await b.evaluate("chorus.sources.camera.getSettings().deviceId") == other
        for index, series in samples.items():
            last_rise = series[0][0]
            longest = 0.0
            for (_, previous), (t, n) in zip(series, series[1:], strict=False):
                if n > previous:
                    longest = max(longest, t - last_rise)
                    last_rise = t
            longest = max(longest, series[-1][0] - last_rise)
            print(f"receiver {index}: {series[-1][1] - series[0][1]} frames of B's camera in 4 s across the "
                  f"switch, longest gap {longest * 1000:.0f} ms")
            assert longest < 1.0
            assert series[-1][1] - series[0][1] > 40
        # A camera whose frames cannot be sent (the depth camera): the page goes back to the previous one.
        await b.select_option("#camera-select", options[1][0])
        await b.wait_for_function(f"chorus.sources.camera.getSettings().deviceId === '{other}' && "
                                  "document.getElementById('error').textContent.includes('back to the previous')",
                                  timeout=8000)
        for page in (a, b, c):
            assert not page.errors, page.errors


async def test_chat_and_active_speaker(server: ServerProcess, room_name: str, tmp_path: Path) -> None:
    wav = speech_wav(str(tmp_path / "speech.wav"))
    async with chromium(f"--use-file-for-fake-audio-capture={wav}") as browser:
        a, b, c = [await open_page(browser, url(server, room_name, n)) for n in "abc"]
        await asyncio.gather(*(ready(p, 2) for p in (a, b, c)))
        ids = [await p.evaluate("chorus.peerId") for p in (a, b, c)]

        # Must show 3: only B has sound → every page marks B within 1 s; then only C → within 1 s.
        for page in (a, b, c):
            await page.evaluate("chorus.sources.microphone.enabled = false")
        for page in (a, b, c):
            await page.wait_for_function("chorus.activeSpeakers.length === 0 && !document.querySelector("
                                         "'.tile.speaking')", polling=50, timeout=5000)

        def marked(page: Any, peer_id: str, alone: bool = False) -> Callable[[], Any]:
            return lambda: page.evaluate(
                f"""() => {{
                  const own = chorus.peerId === '{peer_id}';
                  const tile = document.querySelector(own ? '.tile.local' : '.tile[data-tile-id="{peer_id}"]');
                  return !!tile && tile.classList.contains('speaking')
                    && (!{'true' if alone else 'false'} || document.querySelectorAll('.tile.speaking').length === 1);
                }}""")

        for speaker, silent in ((b, None), (c, b)):
            if silent is not None:
                await silent.evaluate("chorus.sources.microphone.enabled = false")
            await speaker.evaluate("chorus.sources.microphone.enabled = true")
            peer = ids[[a, b, c].index(speaker)]
            try:
                delays = await asyncio.gather(*(timed(marked(p, peer), 3.0) for p in (a, b, c)))
            except AssertionError:
                seen = [await p.evaluate("[chorus.activeSpeakers, [...document.querySelectorAll('.tile.speaking')]"
                                         ".map((t) => t.dataset.tileId)]") for p in (a, b, c)]
                raise AssertionError(f"{peer} not marked alone on every page: {seen} (ids {ids})") from None
            # Its own level meter moves; the silent ones' do not.
            await speaker.wait_for_function("Number(document.getElementById('mic-button').dataset.level) > 0.2",
                                            timeout=3000)
            assert float(await a.evaluate("document.getElementById('mic-button').dataset.level")) == 0
            alone = await asyncio.gather(*(timed(marked(p, peer, alone=True), 3.0) for p in (a, b, c)))
            print(f"{'bc'[speaker is c]} marked as the speaker on every page after "
                  f"{', '.join(f'{d * 1000:.0f}' for d in delays)} ms (the only one after "
                  f"{', '.join(f'{(d + x) * 1000:.0f}' for d, x in zip(delays, alone, strict=True))} ms)")
            assert max(delays) < 1.0

        # Must show 2: chat among three pages, to everyone and to one.
        await a.click("#chat-button")
        await a.fill("#chat-input", "hello from a")
        await a.press("#chat-input", "Enter")
        for page in (b, c):
            await page.wait_for_function("[...document.querySelectorAll('#chat-log .chat-text')]"
                                         ".some((e) => e.textContent === 'hello from a')", timeout=3000)
            assert await page.text_content("#chat-unread") == "1"
        await b.click("#chat-button")
        await b.select_option("#chat-to", ids[2])
        await b.fill("#chat-input", "psst, c")
        await b.click("#chat-form button[type=submit]")
        await c.wait_for_function("[...document.querySelectorAll('#chat-log .private .chat-text')]"
                                  ".some((e) => e.textContent === 'psst, c')", timeout=3000)
        await asyncio.sleep(0.3)
        assert "psst, c" not in await a.text_content("#chat-log")

        # From a raw protocol client: a 1 MB message, 1000 messages a second, and HTML.
        baseline = [await frames(p) for p in (a, b)]
        started_baseline = time.monotonic()
        await asyncio.sleep(2.0)
        video_before = [await frames(p) for p in (a, b)]
        flood_started = time.monotonic()
        baseline_time = flood_started - started_baseline
        async with aiohttp.ClientSession() as http, http.ws_connect(server.ws_url, max_msg_size=0) as ws:
            async def request(request_id: int, method: str, data: dict[str, Any]) -> None:
                await ws.send_str(json.dumps({"type": "req", "id": request_id, "method": method, "data": data}))

            async def response(request_id: int) -> dict[str, Any]:
                while True:
                    msg = json.loads((await ws.receive(timeout=10)).data)
                    if msg["type"] == "res" and msg["id"] == request_id:
                        return msg

            await request(1, "join", {"v": 1, "room": room_name, "name": "raw"})
            assert (await response(1))["ok"]
            await request(2, "chat", {"text": "m" * 1_000_000})
            huge = await response(2)
            assert huge["error"]["code"] == "limit_exceeded"
            started = time.monotonic()
            for i in range(1000):
                await request(100 + i, "chat", {"text": f"flood {i}"})
            results = [await response(100 + i) for i in range(1000)]
            accepted = sum(1 for r in results if r["ok"])
            elapsed = time.monotonic() - started
            print(f"raw client: 1 MB refused; 1000 messages in {elapsed:.2f} s, {accepted} accepted, "
                  f"{1000 - accepted} limit_exceeded")
            assert all(r["ok"] or r["error"]["code"] == "limit_exceeded" for r in results)
            assert accepted <= 20 + 5 * elapsed + 2
            await asyncio.sleep(1.0)  # the bucket refills
            html = "<img src=x onerror=\"window.pwned=1\"><b>bold</b>"
            await request(3000, "chat", {"text": html})
            assert (await response(3000))["ok"]
            await request(3001, "ping", {})
            assert (await response(3001))["ok"]  # the sender is still connected
            for page in (a, b, c):
                await page.wait_for_function(
                    f"[...document.querySelectorAll('#chat-log .chat-text')].some((e) => e.textContent === "
                    f"{json.dumps(html)})", timeout=3000)
                assert await page.evaluate("document.querySelectorAll('#chat-log img, #chat-log b').length") == 0
                assert await page.evaluate("window.pwned") is None
                texts = await page.eval_on_selector_all("#chat-log .chat-text", "es => es.map(e => e.textContent)")
                assert len([t for t in texts if t.startswith("flood")]) == accepted
                assert not any(len(t) > 5000 for t in texts)
        video_after = [await frames(p) for p in (a, b)]
        flood_time = time.monotonic() - flood_started
        for zero, first, second in zip(baseline, video_before, video_after, strict=True):
            for key in second:  # the others unaffected: their videos decode as fast as before the flood
                before_rate = (first[key] - zero[key]) / baseline_time
                during_rate = (second[key] - first[key]) / flood_time
                print(f"{key}: {before_rate:.1f} fps before, {during_rate:.1f} fps during the raw client's flood")
                assert during_rate >= 0.6 * before_rate, (zero, first, second)
        for page in (a, b, c):
            assert await page.evaluate("chorus.state") == "connected"

        # A late joiner sees the last 100 messages.
        async with aiohttp.ClientSession() as http:
            for i in range(100):
                async with http.post(f"{server.http_url}/api/rooms/{room_name}/chat",
                                     json={"text": f"bulk {i}"}) as response:
                    assert response.status == 200
        d = await open_page(browser, url(server, room_name, "d", LIGHT + "&mic=0&cam=0"))  # joins muted
        await d.wait_for_function("window.chorusReady === true", timeout=15000)
        d_id = await d.evaluate("chorus.peerId")
        await a.wait_for_function(f"document.querySelector('.tile[data-tile-id=\"{d_id}\"]')?.classList"
                                  ".contains('video-muted') && document.querySelector('.tile[data-tile-id="
                                  f"\"{d_id}\"]').classList.contains('audio-muted')", timeout=5000)
        assert await d.evaluate("chorus.sources.microphone.enabled || chorus.sources.camera.enabled") is False
        texts = await d.eval_on_selector_all("#chat-log .chat-text", "es => es.map(e => e.textContent)")
        assert texts == [f"bulk {i}" for i in range(100)]
        assert await d.text_content("#chat-log .chat-from") == "Server"
        for page in (a, b, c, d):
            assert not page.errors, page.errors


@functools.lru_cache(maxsize=4)
def bot_clip(color: tuple[int, int, int]) -> list[bytes]:
    """One second of 640x360 VP8 in one colour with a moving bar, encoded once (the bot loops it)."""
    import fractions

    import av
    import numpy as np

    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = 640, 360, "yuv420p"
    codec.time_base = fractions.Fraction(1, 30)
    codec.bit_rate = 400_000
    codec.gop_size = 30
    codec.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    out: list[bytes] = []
    for i in range(30):
        image = np.empty((360, 640, 3), np.uint8)
        image[:] = color
        image[140:220, (i * 16) % 600:(i * 16) % 600 + 40] = 255
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        out += [bytes(p) for p in codec.encode(frame)]
    return out + [bytes(p) for p in codec.encode(None)]


async def test_layouts_at_desktop_and_phone_size(server: ServerProcess, clients: list[ChorusClient],
                                                 room_name: str) -> None:
    """Must show 5: one page (as shipped) and three bots; screenshots of the grid and the speaker view at
    1280x800 and 390x844; the pictures cover at least 60 % of the stage and nothing leaves the viewport."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    bots = []
    for i, color in enumerate([(200, 70, 60), (60, 140, 200), (90, 170, 90)]):
        bot = await connect(server, clients, decode=False)
        await bot.join(room_name, f"bot {i + 1}")
        video = EncodedVideoTrack(bot_clip(color))
        await bot.publish(*([SineTrack(220, amplitude=0.4), video] if i == 1 else [video]))  # only bot 2 speaks
        bots.append(bot)
    async with chromium() as browser:
        page = await open_page(browser, f"{server.http_url}/?room={room_name}&name=me", width=1280, height=800)
        await ready(page, 3)
        speaker = bots[1].peer_id
        await page.wait_for_function(f"document.querySelector('.tile[data-tile-id=\"{speaker}\"]')"
                                     ".classList.contains('speaking')", timeout=10000)
        results = {}
        for width, height in ((1280, 800), (390, 844)):
            await page.set_viewport_size({"width": width, "height": height})
            for view in ("grid", "speaker"):
                await page.evaluate(f"chorusPage.setLayout('{view}')")
                await asyncio.sleep(0.5)  # tiles move with a 0.15 s transition
                geometry = await page.evaluate(GEOMETRY)
                path = ARTIFACTS / f"{view}-{width}x{height}.png"
                await page.screenshot(path=str(path))
                results[path.name] = geometry
                print(f"{path}: pictures cover {geometry['coverage']:.0%} of the stage ({geometry['layout']}, "
                      f"{len(geometry['videos'])} videos)")
                assert geometry["layout"] == view
                if len(geometry["videos"]) != 4:
                    room = (await api(server, "GET", f"/rooms/{room_name}"))[1]
                    me = await page.evaluate("chorus.peerId")
                    print("consumers of the page:", [p["subscribe"] for p in room["participants"] if p["id"] == me])
                assert len(geometry["videos"]) == 4, geometry
                assert geometry["coverage"] >= 0.6, geometry
                assert not geometry["outside"] and not geometry["scrolls"], geometry
        # The speaker view shows the one with sound large.
        assert await page.evaluate("document.querySelector('.tile.main').dataset.tileId") == speaker
        # Each tile's size went to the server as set_preferences: the large one asks for the top layer, the
        # others their height in device pixels (within the 10 % the client allows before it sends again).
        await page.set_viewport_size({"width": 1280, "height": 800})
        await page.evaluate("chorusPage.setLayout('speaker')")
        heights = await page.evaluate("""() => Object.fromEntries([...chorusPage.tiles.values()]
          .filter((t) => !t.local).map((t) => [t.videoTrackId, t.el.clientHeight * devicePixelRatio]))""")
        main_track = await page.evaluate("document.querySelector('.tile.main') && "
                                         "chorusPage.tiles.get(document.querySelector('.tile.main').dataset.tileId)"
                                         ".videoTrackId")

        async def preferences() -> dict[str, Any]:
            me = await page.evaluate("chorus.peerId")
            room = (await api(server, "GET", f"/rooms/{room_name}"))[1]
            peer = next(p for p in room["participants"] if p["id"] == me)
            return {c["track_id"]: c for c in peer["subscribe"]["consumers"] if c["kind"] == "video"}

        deadline = time.monotonic() + 5
        while True:
            consumers = await preferences()
            wanted = {t: 2160 if t == main_track else h for t, h in heights.items()}
            if all(consumers[t]["max_height"] is not None and abs(consumers[t]["max_height"] - h) <= 0.1 * h + 1
                   for t, h in wanted.items()):
                break
            assert time.monotonic() < deadline, (wanted, consumers)
            await asyncio.sleep(0.2)
        print(f"set_preferences as the server holds them: {({t: c['max_height'] for t, c in consumers.items()})}")
        # Pinning a strip tile makes it the large one.
        pinned = bots[2].peer_id
        await page.click(f".tile[data-tile-id='{pinned}'] .pin")
        await page.wait_for_function(f"document.querySelector('.tile.main').dataset.tileId === '{pinned}'",
                                     timeout=2000)
        assert await page.evaluate("chorus.sources.camera.getSettings().height") == 720
        assert not page.errors, page.errors  # type: ignore[attr-defined]
        print(f"screenshots in {ARTIFACTS}")


async def test_mcu_rooms_from_the_page_and_the_api(server: ServerProcess, room_name: str) -> None:
    """Must show 6: an MCU room made from the join form, three pages see the composite; an MCU room made
    through POST /api/rooms before anyone joins, its metadata (set through the API) reaches every page."""
    form_room, api_room = f"{room_name}-form", f"{room_name}-api"
    async with chromium() as browser:
        a = await open_page(browser, f"{server.http_url}/?video=640x360")
        await a.fill("#room-input", form_room)
        await a.fill("#name-input", "alice")
        await a.check("input[name=mode][value=mcu]")
        await a.click("#join-button")
        await a.wait_for_function("window.chorusReady === true", timeout=15000)
        assert await a.evaluate("chorus.mode") == "mcu"
        b = await open_page(browser, url(server, form_room, "bob"))
        c = await open_page(browser, url(server, form_room, "carol"))
        pages = (a, b, c)

        async def composite(page: Any) -> None:
            await wait_until(page, f"({REMOTE_FRAMES})().then(f => f['mcu:camera'] > 10)", 20)
            assert await page.evaluate("document.querySelector('.tile.mcu').classList.contains('main')")

        await asyncio.gather(*(composite(p) for p in pages))
        status, described = await api(server, "GET", f"/rooms/{form_room}")
        assert status == 200 and described["mode"] == "mcu"
        await asyncio.sleep(1.0)
        described = (await api(server, "GET", f"/rooms/{form_room}"))[1]
        assert described["mcu"]["video"]["sources"] == 3
        assert described["mcu"]["video"]["subscribers"] == 3
        sizes = [await p.evaluate("document.querySelector('.tile.mcu video').videoWidth") for p in pages]
        assert sizes == [640, 640, 640]

        # A room made ahead of time, with metadata; everyone moves to it through the join form.
        status, created = await api(server, "POST", "/rooms", {"name": api_room, "mode": "mcu",
                                                               "metadata": {"title": "Weekly review"}})
        assert status == 201 and created["participants"] == []
        for page, name in zip(pages, ("alice", "bob", "carol"), strict=True):
            await page.click("#leave-button")
            await page.wait_for_selector("#join-form:not([hidden])")
            await page.fill("#room-input", api_room)
            await page.fill("#name-input", name)
            await page.check("input[name=mode][value=sfu]")  # an existing room keeps its own mode
            await page.click("#join-button")
        await asyncio.gather(*(p.wait_for_function("window.chorusReady === true", timeout=15000) for p in pages))
        await asyncio.gather(*(composite(p) for p in pages))
        for page in pages:
            assert await page.evaluate("chorus.mode") == "mcu"
            assert await page.text_content("#room-topic") == "Weekly review"

        started = time.monotonic()
        assert (await api(server, "POST", f"/rooms/{api_room}/metadata", {"metadata": {"title": "Retro"}}))[0] == 200
        bob = await b.evaluate("chorus.peerId")
        status, _ = await api(server, "POST", f"/rooms/{api_room}/participants/{bob}/metadata",
                              {"metadata": {"role": "host"}})
        assert status == 200
        for page in pages:
            await page.wait_for_function("document.getElementById('room-topic').textContent === 'Retro'",
                                         polling=50, timeout=3000)
        print(f"room metadata reached every page within {(time.monotonic() - started) * 1000:.0f} ms")
        for page in (a, c):
            assert await page.evaluate(f"chorus.peers.get('{bob}').metadata.role") == "host"
        assert await b.evaluate("chorus.metadata.role") == "host"
        assert (await b.text_content(".tile.local .label")) == "You · host"
        for page in pages:
            assert not page.errors, page.errors
