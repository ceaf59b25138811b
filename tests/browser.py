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


def speech_wav(path: str, seconds: float = 8.0, rate: int = 48000) -> str:
    """
    Write a WAV of speech-like sound for ``--use-file-for-fake-audio-capture``: a voiced buzz (140 Hz with
    falling harmonics and a little vibrato) in syllables of about 4 a second with short pauses, so Chromium's
    noise suppression, which removes steady tones, keeps it. Chromium loops the file.
    """
    import wave

    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 3.7 * t) + 0.3, 0, None) ** 0.6
    rng = np.random.default_rng(1)
    samples = 0.25 * voice * syllables + 0.01 * rng.standard_normal(len(t))
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(path, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path
