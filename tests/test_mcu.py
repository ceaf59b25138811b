"""MCU rooms: N-1 audio mixes, a shared grid composite, membership changes, and the page in Chromium."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from browser import CHROMIUM, FLAGS, INBOUND_STATS, PER_STREAM_FRAMES
from calls import Received
from conftest import ServerProcess, connect
from media import ColorTrack, SineTrack

from chorus.sfu.mcu import McuOptions
from chorus.sfu.mixer import FRAME_SAMPLES, JITTER_MAX, JITTER_TARGET, AudioSource, fit, grid, mix_minus_one
from chorus.sfu.tasks import Tasks
from chorus.signaling.client import ChorusClient, RequestError

#: Small composite for tests: cheap to encode on the server and to decode in the clients.
SMALL = {"width": 320, "height": 240, "fps": 15}
RED, GREEN, BLUE, YELLOW = (200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)
BLACK = (0, 0, 0)


# --- helpers -------------------------------------------------------------------------------------------------


async def join(client: ChorusClient, room: str, name: str, **fields: Any) -> dict[str, Any]:
    """``client.join`` with the MCU fields (``mode``, ``mcu``)."""
    return await client.join(room, name, **fields)


async def mcu_participant(server: ServerProcess, clients: list[ChorusClient], room: str, name: str,
                          *tracks: MediaStreamTrack) -> tuple[ChorusClient, Received]:
    client = await connect(server, clients)
    received = Received(client)
    joined = await join(client, room, name, mode="mcu", mcu=SMALL)
    assert joined["mode"] == "mcu"
    if tracks:
        await client.publish(*tracks)
    return client, received


class AudioTap:
    """Reads a received audio track all the time (so nothing queues up) and keeps the last seconds."""

    def __init__(self, track: MediaStreamTrack, keep: float = 3.0) -> None:
        self.rate = 48000
        self._chunks: list[np.ndarray] = []
        self._keep = keep
        self._tasks = Tasks("audio tap")
        self._tasks.spawn(self._read(track))

    async def _read(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.rate = frame.sample_rate
            data = frame.to_ndarray().astype(np.float64).reshape(-1, len(frame.layout.channels)).mean(axis=1)
            self._chunks.append(data)
            while sum(len(c) for c in self._chunks) > self._keep * self.rate:
                self._chunks.pop(0)

    def recent(self, seconds: float) -> np.ndarray:
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0)
        return samples[-int(seconds * self.rate):]

    async def close(self) -> None:
        await self._tasks.close()


class VideoTap:
    """Reads a received video track all the time; keeps the latest picture (RGB) and counts frames."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.latest: np.ndarray | None = None
        self.frames = 0
        self._tasks = Tasks("video tap")
        self._tasks.spawn(self._read(track))

    async def _read(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.latest = frame.to_ndarray(format="rgb24")
            self.frames += 1

    async def close(self) -> None:
        await self._tasks.close()


def tone_levels(samples: np.ndarray, rate: int, tones: list[float]) -> dict[float, float]:
    """Level (dB, arbitrary reference) of each tone: the strongest FFT bin within 10 Hz of it."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples)))) + 1e-9
    freqs = np.fft.rfftfreq(len(samples), 1 / rate)
    return {f: 20 * float(np.log10(spectrum[np.abs(freqs - f) <= 10].max())) for f in tones}


def colour_at(picture: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Median colour of a region (robust to the test tracks' moving white bar)."""
    return np.median(picture[y0:y1, x0:x1].reshape(-1, 3), axis=0)


def close_to(colour: np.ndarray, expected: tuple[int, int, int], tolerance: int = 45) -> bool:
    return bool(np.all(np.abs(colour - np.array(expected)) <= tolerance))


def quadrants(picture: np.ndarray) -> list[np.ndarray]:
    """Median colour inside each quadrant of a 2x2 grid: top-left, top-right, bottom-left, bottom-right."""
    h, w = picture.shape[:2]
    return [
        colour_at(picture, x + w // 8, y + h // 8, x + w * 3 // 8, y + h * 3 // 8)
        for y in (0, h // 2)
        for x in (0, w // 2)
    ]


def side_by_side(picture: np.ndarray) -> list[np.ndarray]:
    """Median colour at the centre of the left and right halves, and of the (letterbox) top strip."""
    h, w = picture.shape[:2]
    return [
        colour_at(picture, w // 8, h * 3 // 8, w * 3 // 8, h * 5 // 8),
        colour_at(picture, w * 5 // 8, h * 3 // 8, w * 7 // 8, h * 5 // 8),
        colour_at(picture, 0, 0, w, h // 8),
    ]


async def until(condition: Callable[[], bool], timeout: float, poll: float = 0.05) -> float:
    """Wait until ``condition()`` holds; returns the seconds it took (raises TimeoutError after ``timeout``)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError
        await asyncio.sleep(poll)
    return time.monotonic() - started


async def room_info(server: ServerProcess, room: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{server.http_url}/api/rooms/{room}") as response:
        assert response.status == 200
        return dict(await response.json())


# --- unit level ----------------------------------------------------------------------------------------------


def test_grid_layouts() -> None:
    assert [(r.x, r.y, r.width, r.height) for r in grid(1, 640, 480)] == [(0, 0, 640, 480)]
    assert [(r.x, r.y, r.width, r.height) for r in grid(2, 640, 480)] == [(0, 0, 320, 480), (320, 0, 320, 480)]
    assert [(r.x, r.y) for r in grid(4, 640, 480)] == [(0, 0), (320, 0), (0, 240), (320, 240)]
    assert len(grid(3, 640, 480)) == 3 and grid(3, 640, 480)[2].y == 240
    nine = grid(9, 640, 480)
    assert len(nine) == 9 and {r.width for r in nine} == {212} and {r.height for r in nine} == {160}
    assert grid(5, 640, 480)[4] == nine[4]  # 5-9 share the 3x3 layout
    assert fit(640, 480, 320, 480) == (320, 240)  # aspect kept, letterboxed
    assert fit(1280, 720, 320, 240) == (320, 180)


def test_mix_minus_one_removes_own_voice_and_clips() -> None:
    a = np.full(FRAME_SAMPLES, 30000, np.int32)
    b = np.full(FRAME_SAMPLES, 20000, np.int32)
    c = np.full(FRAME_SAMPLES, -5000, np.int32)
    mixes = mix_minus_one({"a": a, "b": b, "c": c}, ["a", "b", "c", "listener"])
    assert mixes["a"][0] == 15000
    assert mixes["b"][0] == 25000
    assert mixes["c"][0] == 32767  # 50000 clipped, not wrapped around
    assert mixes["listener"][0] == 32767
    assert all(m.dtype == np.int16 for m in mixes.values())


def test_audio_source_jitter_queue() -> None:
    class FakeProducer:
        id = "t-1"
        peer_id = "p-1"
        paused = False

    def frame(samples: int) -> av.AudioFrame:
        f = av.AudioFrame.from_ndarray(np.ones((1, samples * 2), np.int16), format="s16", layout="stereo")
        f.sample_rate = 48000
        return f

    source = AudioSource(FakeProducer(), None)  # type: ignore[arg-type]
    source.push(frame(FRAME_SAMPLES))
    assert source.take() is None  # not primed: a late or new source is left out, the mix goes on
    source.push(frame(FRAME_SAMPLES))
    assert source.take() is not None and source.take() is not None
    assert source.take() is None and source.underruns == 1  # ran dry: re-primes
    for _ in range(20):  # a burst: trimmed, so at most JITTER_MAX of delay builds up
        source.push(frame(FRAME_SAMPLES))
    assert source.dropped_samples > 0
    taken = 0
    while source.take() is not None:
        taken += 1
    assert JITTER_TARGET <= taken * FRAME_SAMPLES <= JITTER_MAX


def test_mcu_options_validation() -> None:
    assert McuOptions() == McuOptions(640, 480, 15)
    assert McuOptions.from_dict(SMALL) == McuOptions(320, 240, 15)
    for bad in ({"width": 321}, {"fps": 0}, {"height": "240"}, {"depth": 8}, [320]):
        with pytest.raises(ValueError):
            McuOptions.from_dict(bad)


# --- through a real server -----------------------------------------------------------------------------------


async def test_mode_in_join_and_admin_api(server: ServerProcess, clients: list[ChorusClient], room_name: str) -> None:
    first = await connect(server, clients)
    assert (await join(first, room_name, "a", mode="mcu", mcu=SMALL))["mode"] == "mcu"
    second = await connect(server, clients)
    with pytest.raises(RequestError) as error:
        await join(second, room_name, "b", mode="sfu")
    assert error.value.code == "invalid_state" and f"room {room_name} is in mcu mode" in error.value.reason
    for bad in ({"mode": "mixer"}, {"mode": "mcu", "mcu": {"width": 99999}}):
        with pytest.raises(RequestError) as error:
            await join(second, f"{room_name}-x", "b", **bad)
        assert error.value.code == "bad_request"
    assert (await second.join(room_name, "b"))["mode"] == "mcu"  # no mode asked: whatever the room is
    info = await room_info(server, room_name)
    assert info["mode"] == "mcu" and info["mcu"]["width"] == 320 and info["mcu"]["video"]["subscribers"] == 2
    sfu = await connect(server, clients)
    assert (await sfu.join(f"{room_name}-sfu", "c"))["mode"] == "sfu"


async def test_each_participant_hears_the_others_but_not_itself(
    server: ServerProcess, clients: list[ChorusClient], room_name: str
) -> None:
    tones = [440.0, 660.0, 880.0]
    participants = [
        await mcu_participant(server, clients, room_name, f"p{i}", SineTrack(tone, amplitude=0.3))
        for i, tone in enumerate(tones)
    ]
    taps = []
    for _, received in participants:
        await received.wait(2)  # exactly one audio and one video, whatever the number of others
        assert set(received.tracks) == {("mcu", "audio"), ("mcu", "video")}
        taps.append(AudioTap(received.tracks[("mcu", "audio")]))
    try:
        await asyncio.sleep(2.0)  # connections up, jitter queues primed
        for tone, tap in zip(tones, taps, strict=True):
            levels = tone_levels(tap.recent(1.0), tap.rate, tones)
            others = [levels[t] for t in tones if t != tone]
            print(f"participant sending {tone:.0f} Hz hears (dB): {({int(k): round(v, 1) for k, v in levels.items()})}")
            assert max(others) - min(others) < 6, levels  # both others, at similar levels
            assert levels[tone] <= min(others) - 20, levels  # its own tone is at least 20 dB below
    finally:
        for tap in taps:
            await tap.close()


async def test_grid_has_each_colour_in_its_quadrant_and_is_encoded_once(
    server: ServerProcess, clients: list[ChorusClient], room_name: str
) -> None:
    colours = [RED, GREEN, BLUE, YELLOW]
    participants = [
        await mcu_participant(server, clients, room_name, f"p{i}", ColorTrack(colour, width=160, height=120))
        for i, colour in enumerate(colours)
    ]
    taps = []
    for _, received in participants:
        await received.wait(2)
        assert set(received.tracks) == {("mcu", "audio"), ("mcu", "video")}
        taps.append(VideoTap(received.tracks[("mcu", "video")]))
    try:
        def all_quadrants_right() -> bool:
            return all(
                tap.latest is not None
                and all(close_to(c, e) for c, e in zip(quadrants(tap.latest), colours, strict=True))
                for tap in taps
            )

        await until(all_quadrants_right, timeout=10)
        for tap in taps:
            assert tap.latest is not None and tap.latest.shape == (240, 320, 3)

        # One encode per composite frame, shared by all four subscribers.
        before = (await room_info(server, room_name))["mcu"]["video"]
        frames_before = [tap.frames for tap in taps]
        await asyncio.sleep(2.0)
        after = (await room_info(server, room_name))["mcu"]["video"]
        encoded = after["frames"] - before["frames"]
        received_frames = [tap.frames - n for tap, n in zip(taps, frames_before, strict=True)]
        print(f"2 s: {encoded} composites encoded, frames received per subscriber {received_frames}")
        assert after["subscribers"] == 4 and after["sources"] == 4
        assert 20 <= encoded <= 2 * SMALL["fps"] + 2  # about 15/s, not 4 x 15/s
        assert min(received_frames) >= 20
        assert max(received_frames) <= encoded + 2  # every subscriber gets the same frames
    finally:
        for tap in taps:
            await tap.close()


async def test_late_joiner_appears_and_leaver_disappears_within_2s(
    server: ServerProcess, clients: list[ChorusClient], room_name: str
) -> None:
    a, a_received = await mcu_participant(server, clients, room_name, "a",
                                          SineTrack(440, 0.3), ColorTrack(RED, width=160, height=120))
    await mcu_participant(server, clients, room_name, "b",
                          SineTrack(660, 0.3), ColorTrack(GREEN, width=160, height=120))
    await a_received.wait(2)
    audio = AudioTap(a_received.tracks[("mcu", "audio")])
    video = VideoTap(a_received.tracks[("mcu", "video")])
    tones = [440.0, 660.0, 880.0]

    def hears(tone: float) -> bool:
        levels = tone_levels(audio.recent(0.3), audio.rate, tones)
        return levels[tone] >= levels[660.0] - 10

    def does_not_hear(tone: float) -> bool:
        levels = tone_levels(audio.recent(0.3), audio.rate, tones)
        return levels[tone] <= levels[660.0] - 25

    def two_side_by_side() -> bool:
        if video.latest is None:
            return False
        left, right, top = side_by_side(video.latest)
        return close_to(left, RED) and close_to(right, GREEN) and close_to(top, BLACK)

    def three_in_grid() -> bool:
        if video.latest is None:
            return False
        tl, tr, bl, br = quadrants(video.latest)
        return close_to(tl, RED) and close_to(tr, GREEN) and close_to(bl, BLUE) and close_to(br, BLACK)

    try:
        await until(lambda: two_side_by_side() and hears(660) and does_not_hear(440), timeout=10)

        c, _ = await mcu_participant(server, clients, room_name, "c")
        started = time.monotonic()
        await c.publish(SineTrack(880, 0.3), ColorTrack(BLUE, width=160, height=120))
        await until(lambda: three_in_grid() and hears(880), timeout=5)
        joined_after = time.monotonic() - started

        started = time.monotonic()
        await c.leave()
        await until(lambda: two_side_by_side() and does_not_hear(880), timeout=5)
        left_after = time.monotonic() - started
        print(f"late joiner seen and heard {joined_after:.2f} s after publishing; leaver gone after {left_after:.2f} s")
        assert joined_after < 2.0
        assert left_after < 2.0
    finally:
        await audio.close()
        await video.close()


# --- the page in Chromium ------------------------------------------------------------------------------------

requires_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as p:
        instance = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield instance
        await instance.close()


@requires_chromium
async def test_page_in_an_mcu_room_decodes_one_video(
    server: ServerProcess, clients: list[ChorusClient], browser: Any, room_name: str
) -> None:
    # The page has no mode of its own: a first participant creates the room in MCU mode.
    await mcu_participant(server, clients, room_name, "host")
    pages = []
    for i in range(2):
        page = await (await browser.new_context()).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        await page.goto(f"{server.http_url}/?room={room_name}&name=p{i}")
        pages.append((page, errors))

    for page, errors in pages:
        # (Polled here: Playwright's wait_for_function does not await a predicate's promise.)
        stats: dict[str, int] = {}

        async def stats_now(page: Any = page) -> dict[str, int]:
            nonlocal stats
            stats = await page.evaluate(INBOUND_STATS)
            return stats

        deadline = time.monotonic() + 15
        while (await stats_now())["video_streams"] < 1 or stats["audio_streams"] < 1:
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.25)
        first = await page.evaluate(PER_STREAM_FRAMES)
        await asyncio.sleep(1.0)
        second = await page.evaluate(PER_STREAM_FRAMES)
        await stats_now()
        print(f"page: {stats}, frames decoded {first} -> {second}")
        assert stats["video_streams"] == 1 and stats["audio_streams"] == 1
        assert len(second) == 1  # exactly one inbound video, whatever the number of participants
        (key,) = second
        assert second[key] - first.get(key, 0) >= 5  # rising, at about the composite frame rate
        assert not errors, errors
