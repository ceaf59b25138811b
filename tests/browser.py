"""Headless Debian Chromium (never a downloaded browser) driven by Playwright, with fake camera and mic."""

from __future__ import annotations

import shutil

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--autoplay-policy=no-user-gesture-required",
]

#: Per kind, summed over the page's subscribe connection: video frames decoded, audio packets received,
#: and how many inbound streams carry media.
INBOUND_STATS = """async () => {
  const pc = window.chorus && window.chorus.subscribePc;
  const out = {video_frames: 0, audio_packets: 0, video_streams: 0, audio_streams: 0};
  if (!pc) return out;
  (await pc.getStats()).forEach(r => {
    if (r.type !== 'inbound-rtp') return;
    if (r.kind === 'video' && r.framesDecoded > 0) { out.video_streams++; out.video_frames += r.framesDecoded; }
    if (r.kind === 'audio' && r.packetsReceived > 0) { out.audio_streams++; out.audio_packets += r.packetsReceived; }
  });
  return out;
}"""

#: framesDecoded per inbound video stream, keyed by its track identifier.
PER_STREAM_FRAMES = """async () => {
  const pc = window.chorus && window.chorus.subscribePc;
  const out = {};
  if (!pc) return out;
  (await pc.getStats()).forEach(r => {
    if (r.type === 'inbound-rtp' && r.kind === 'video') out[r.trackIdentifier || r.id] = r.framesDecoded || 0;
  });
  return out;
}"""


async def wait_until(page: object, expression: str, timeout: float, interval: float = 0.2) -> object:
    """
    Poll ``expression`` in the page until it yields a truthy value (awaiting it if it is a promise).

    Playwright's ``wait_for_function`` must not be used with a promise: a Promise object is truthy, so it
    returns at once whatever the promise resolves to.

    :raises AssertionError: not true within ``timeout`` seconds.
    """
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = await page.evaluate(expression)  # type: ignore[attr-defined]
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {expression[:120]}")
        await asyncio.sleep(interval)
