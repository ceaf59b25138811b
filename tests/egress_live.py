"""
Helpers for the egress tests that run a real server: publisher tracks with known content (a clock drawn into
the pixels, a flash and a beep at the same instant), the admin API, a webhook receiver, HLS/DASH readers.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
from aiohttp import web
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

VIDEO_RATE = 90000
AUDIO_RATE = 48000

# The clock drawn into the pixels: BITS bits of the capture time in milliseconds, row-major in ROWS rows of
# blocks of BLOCK pixels from (X0, Y0); white = 1. A reader samples the centre of each block.
BLOCK = 24
BITS = 48
ROWS = 2
X0, Y0 = 16, 16


class PacedTrack(MediaStreamTrack):
    """A track whose frames are produced in real time from a shared wall-clock start ``t0``."""

    def __init__(self, t0: float, period: float) -> None:
        super().__init__()
        self.t0 = t0
        self.period = period
        self.n = 0

    async def _next(self) -> tuple[int, float]:
        if self.readyState != "live":
            raise MediaStreamError
        due = self.t0 + self.n * self.period
        wait = due - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        n = self.n
        self.n += 1
        return n, due


def texture(width: int, height: int, n: int) -> np.ndarray:
    """A moving gradient with some noise: content an encoder has to spend bits on."""
    y = (np.add.outer(np.arange(height), np.arange(width) + 3 * n) % 220 + 16).astype(np.uint8)
    return np.dstack([y, np.roll(y, n, axis=0), y[::-1]])


def draw_clock(image: np.ndarray, ms: int) -> None:
    """Draw ``ms`` as BITS black/white blocks (see module constants)."""
    per_row = BITS // ROWS
    for bit in range(BITS):
        row, col = divmod(bit, per_row)
        value = 255 if (ms >> (BITS - 1 - bit)) & 1 else 0
        y, x = Y0 + row * BLOCK, X0 + col * BLOCK
        image[y:y + BLOCK, x:x + BLOCK] = value


class ClockTrack(PacedTrack):
    """Video whose every frame carries its capture time (Unix ms) drawn as blocks (:func:`draw_clock`)."""

    kind = "video"

    def __init__(self, t0: float, width: int = 640, height: int = 480, fps: int = 30) -> None:
        super().__init__(t0, 1 / fps)
        self.width, self.height = width, height

    async def recv(self) -> av.VideoFrame:
        n, _ = await self._next()
        # Like a camera: the picture and its timestamp are the capture instant (a late frame is late in both),
        # and frames that could not be made in time are skipped rather than queued.
        now = time.time()
        self.n = max(self.n, int((now - self.t0) / self.period) + 1)
        image = texture(self.width, self.height, n)
        draw_clock(image, int(now * 1000))
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = round((now - self.t0) * VIDEO_RATE)
        frame.time_base = fractions.Fraction(1, VIDEO_RATE)
        return frame


#: The flash and the beep: once a second, at 0.5 s past each second after ``t0``, lasting FLASH_FRAMES frames
#: and BEEP_MS milliseconds.
FLASH_FRAMES = 2
BEEP_MS = 100


class FlashTrack(PacedTrack):
    """Video, 30 fps: textured, and flat white for two frames at ``t0 + k + 0.5``."""

    kind = "video"

    def __init__(self, t0: float, width: int = 320, height: int = 240) -> None:
        super().__init__(t0, 1 / 30)
        self.width, self.height = width, height

    async def recv(self) -> av.VideoFrame:
        n, due = await self._next()
        image = texture(self.width, self.height, n) // 2  # dark: the flash stands out
        if n % 30 in range(15, 15 + FLASH_FRAMES):
            image[:] = 255
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = n * 3000
        frame.time_base = fractions.Fraction(1, VIDEO_RATE)
        return frame


class BeepTrack(PacedTrack):
    """Audio, 20 ms frames: silence, and a 1 kHz beep of BEEP_MS at ``t0 + k + 0.5``."""

    kind = "audio"

    def __init__(self, t0: float) -> None:
        super().__init__(t0, 0.02)

    async def recv(self) -> av.AudioFrame:
        n, _ = await self._next()
        start = n * 960
        t = (np.arange(960) + start) / AUDIO_RATE
        phase = t % 1.0
        on = (phase >= 0.5) & (phase < 0.5 + BEEP_MS / 1000)
        samples = (np.sin(2 * math.pi * 1000 * t) * 12000 * on).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = start
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        return frame


# -- HTTP


def http(url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """One request (blocking: call through ``asyncio.to_thread`` from a test's event loop)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def api(base: str, method: str, path: str, body: Any = None, token: str | None = None
              ) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, _, data = await asyncio.to_thread(http, base + path, method, body, headers)
    return status, json.loads(data) if data else None


async def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> Any:
    """Await ``predicate()`` (sync or async) until truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(interval)


@dataclass
class WebhookReceiver:
    """An HTTP endpoint on loopback that keeps every webhook delivery."""

    events: list[dict[str, Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> WebhookReceiver:
        async def receive(request: web.Request) -> web.Response:
            self.events.append(json.loads(await request.read()))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", receive)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


# -- reading the clock back in a browser

#: Installs a per-frame reader on the live page's <video>: each presented frame's drawn capture time is read
#: from a canvas and ``window.clockSamples`` gets {latency (ms, capture to display), height, t}.
CLOCK_READER = """(cfg) => {
  const video = document.getElementById('player');
  const canvas = document.createElement('canvas');
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  window.clockSamples = [];
  window.clockUnreadable = 0;
  const perRow = cfg.bits / cfg.rows;
  const onFrame = (now, meta) => {
    const w = video.videoWidth, h = video.videoHeight;
    if (w && h) {
      if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
      ctx.drawImage(video, 0, 0, w, h);
      const scale = w / cfg.width;
      const rowsHigh = Math.ceil((cfg.y0 + cfg.rows * cfg.block) * scale) + 1;
      const pixels = ctx.getImageData(0, 0, w, Math.min(h, rowsHigh)).data;
      let value = 0;
      for (let bit = 0; bit < cfg.bits; bit++) {
        const row = Math.floor(bit / perRow), col = bit % perRow;
        const x = Math.round((cfg.x0 + col * cfg.block + cfg.block / 2) * scale);
        const y = Math.round((cfg.y0 + row * cfg.block + cfg.block / 2) * scale);
        const i = (y * w + x) * 4;
        const luma = (pixels[i] + pixels[i + 1] + pixels[i + 2]) / 3;
        value = value * 2 + (luma > 128 ? 1 : 0);
      }
      const shown = performance.timeOrigin + meta.expectedDisplayTime;
      const latency = shown - value;
      if (latency > 0 && latency < 60000) {
        window.clockSamples.push({latency, height: h, t: Date.now()});
      } else {
        window.clockUnreadable++;
      }
    }
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}"""


def clock_config(width: int) -> dict[str, int]:
    return {"block": BLOCK, "bits": BITS, "rows": ROWS, "x0": X0, "y0": Y0, "width": width}
