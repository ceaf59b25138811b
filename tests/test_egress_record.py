"""
Recording on a real server: a 60 s call whose picture flashes when its sound beeps becomes per-track files that
decode end to end, last as long as the call and keep picture and sound together; a SIGKILL of the server loses
at most the last ~2 s; Chromium plays a recording from its download URL and seeks in it (HTTP 206).
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path

import av
import numpy as np
import pytest
from browser import CHROMIUM, FLAGS
from conftest import ServerProcess, connect
from egress_live import BEEP_MS, BeepTrack, FlashTrack, api, http, wait_for

from chorus.signaling.client import ChorusClient

playwright_api = pytest.importorskip("playwright.async_api")

CALL_SECONDS = 60.0


def wall_times(path: Path, kind: str) -> tuple[list[float], np.ndarray | None, int]:
    """Decode a whole recording: (wall time of each video frame, or of each audio frame start), the mono audio
    samples (audio only) and the number of frames. Wall time = ``chorus_start`` + time since the first packet."""
    with av.open(str(path)) as container:
        meta = {k.lower(): v for k, v in container.metadata.items()}
        start = datetime.fromisoformat(meta["chorus_start"]).timestamp()
        stream = container.streams.video[0] if kind == "video" else container.streams.audio[0]
        first: float | None = None
        times: list[float] = []
        chunks: list[np.ndarray] = []
        for packet in container.demux(stream):
            for frame in packet.decode():
                t = float(frame.pts * frame.time_base)
                first = t if first is None else first
                times.append(start + t - first)
                if kind == "video":
                    chunks.append(np.array([frame.to_ndarray(format="gray").mean()]))
                else:
                    data = frame.to_ndarray().astype(np.float64)
                    chunks.append(data.mean(axis=0) if data.shape[0] > 1 else data.reshape(-1))
        return times, np.concatenate(chunks) if chunks else None, len(times)


def flash_times(path: Path) -> list[float]:
    times, luma, _ = wall_times(path, "video")
    assert luma is not None
    return [t for i, t in enumerate(times) if luma[i] > 200 and (i == 0 or luma[i - 1] <= 200)]


def beep_times(path: Path) -> list[float]:
    times, samples, _ = wall_times(path, "audio")
    assert samples is not None
    rate = 48000
    window = rate // 200  # 5 ms
    energy = np.sqrt(np.convolve(samples ** 2, np.ones(window) / window, mode="same"))
    loud = energy > 0.25 * energy.max()
    onsets = np.flatnonzero(loud[1:] & ~loud[:-1]) + 1
    t0 = times[0]
    out: list[float] = []
    for i in onsets:
        t = t0 + i / rate
        if not out or t - out[-1] > BEEP_MS / 1000 * 3:
            out.append(t)
    return out


async def downloaded(base: str, url: str, folder: Path) -> Path:
    status, headers, data = await asyncio.to_thread(http, base + url)
    assert status == 200 and headers.get("Accept-Ranges") == "bytes", (status, headers)
    path = folder / url.rsplit("/", 1)[-1]
    path.write_bytes(data)
    return path


@pytest.mark.timeout(240)
async def test_a_sixty_second_call_recorded_per_track(server: ServerProcess, clients: list[ChorusClient],
                                                      room_name: str, tmp_path: Path) -> None:
    base = server.http_url
    identity = f"speaker-{time.monotonic_ns() % 10**8}"
    status, egress = await api(base, "POST", "/api/egress", {"room": room_name, "kind": "record",
                                                             "participant": identity})
    assert status == 201, egress
    publisher = await connect(server, clients)
    await publisher.join(room_name, "speaker", identity=identity)
    t0 = time.time() + 0.3
    await publisher.publish(BeepTrack(t0), FlashTrack(t0))
    await asyncio.sleep(t0 + CALL_SECONDS - time.time())
    published = time.time() - t0
    await publisher.leave()  # the tracks end: their files are finalized
    status, stopped = await api(base, "DELETE", f"/api/egress/{egress['id']}")
    assert status == 200 and stopped["state"] == "ended" and stopped["error"] is None, stopped
    urls = stopped["recordings"]
    assert sorted(u.rsplit("/", 1)[-1] for u in urls) == [f"{identity}-audio-1.webm", f"{identity}-video-1.webm"]

    status, listing = await api(base, "GET", f"/api/recordings?room={room_name}")
    listed = {r["name"]: r for r in listing["recordings"]}
    video = await downloaded(base, next(u for u in urls if "-video-" in u), tmp_path)
    audio = await downloaded(base, next(u for u in urls if "-audio-" in u), tmp_path)
    for path in (video, audio):
        entry = listed[path.name]
        assert entry["size"] == path.stat().st_size
        # Durations within 2 % of the call (the first key frame comes a moment after the call starts).
        assert abs(entry["duration"] - published) <= 0.02 * published, (entry, published)
    times, _, frames = wall_times(video, "video")
    assert frames >= 0.98 * 30 * published  # every frame decodes, end to end
    _, samples, _ = wall_times(audio, "audio")
    assert samples is not None and len(samples) >= 0.98 * 48000 * published

    # Picture and sound together: each flash against the beep captured at the same instant.
    flashes, beeps = flash_times(video), beep_times(audio)
    assert len(flashes) >= 55 and len(beeps) >= 55, (len(flashes), len(beeps))
    offsets = [min(beeps, key=lambda b, f=f: abs(b - f)) - f for f in flashes]
    median = float(np.median(offsets))
    print(f"\nA/V offset over {len(offsets)} flashes: median {median * 1000:.1f} ms, "
          f"max {max(map(abs, offsets)) * 1000:.1f} ms")
    assert abs(median) <= 0.080 and float(np.percentile(np.abs(offsets), 90)) <= 0.080, offsets

    # Chromium plays the recording from its download URL and seeks to the middle: range requests, 206.
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await browser.new_page()
            statuses: list[int] = []
            page.on("response", lambda r: statuses.append(r.status) if "/recordings/" in r.url else None)
            await page.goto(f"{base}/live")  # same origin as the download
            src = base + next(u for u in urls if "-video-" in u)
            await page.evaluate("""(src) => new Promise((resolve, reject) => {
                const v = document.createElement('video'); v.id = 'rec'; v.muted = true; v.src = src;
                document.body.append(v); v.onerror = () => reject(v.error && v.error.message);
                v.play().then(resolve, reject); })""", src)
            await wait_for(lambda: page.evaluate("document.getElementById('rec').currentTime > 1"), 20)
            duration = await page.evaluate("document.getElementById('rec').duration")
            assert abs(duration - published) < 0.03 * published, duration
            await page.evaluate("""() => new Promise(r => { const v = document.getElementById('rec');
                v.addEventListener('seeked', r, {once: true}); v.currentTime = v.duration / 2; })""")
            middle = duration / 2
            await wait_for(lambda: page.evaluate(f"document.getElementById('rec').currentTime > {middle + 1}"), 20)
            assert 206 in statuses, statuses
        finally:
            await browser.close()


@pytest.mark.timeout(120)
async def test_sigkill_loses_at_most_the_last_two_seconds(tmp_path: Path, room_name: str) -> None:
    server = ServerProcess(tmp_path, env={"CHORUS_RECORDINGS_DIR": str(tmp_path / "rec")})
    clients: list[ChorusClient] = []
    try:
        status, egress = await api(server.http_url, "POST", "/api/egress", {"room": room_name, "kind": "record"})
        assert status == 201, egress
        publisher = await connect(server, clients)
        await publisher.join(room_name, "speaker")
        t0 = time.time() + 0.3
        await publisher.publish(BeepTrack(t0), FlashTrack(t0))
        await asyncio.sleep(t0 + 8.0 - time.time())
        killed = time.time()
        server.kill()
    finally:
        for client in clients:
            await client.close()
        server.stop()
    files = sorted((tmp_path / "rec" / room_name).glob("*/*.webm"))
    assert sorted("audio" if "-audio-" in f.name else "video" for f in files) == ["audio", "video"], files
    for path in files:
        kind = "audio" if "-audio-" in path.name else "video"
        times, _, frames = wall_times(path, kind)
        lost = killed - times[-1]
        print(f"\n{path.name}: {frames} frames decoded, the last {lost:.2f} s before the kill lost")
        assert lost <= 2.0 and times[0] < killed - 6.0, (path.name, lost)


@pytest.mark.timeout(90)
async def test_a_publisher_who_reconnects_keeps_being_recorded(server: ServerProcess, clients: list[ChorusClient],
                                                              room_name: str, tmp_path: Path) -> None:
    """The recording follows the identity: the room empties (the publisher's connection is gone), the same
    identity comes back within the grace time, its new tracks go to new files on the same timeline."""
    base = server.http_url
    identity = f"back-{time.monotonic_ns() % 10**8}"
    status, egress = await api(base, "POST", "/api/egress", {"room": room_name, "kind": "record",
                                                             "participant": identity})
    assert status == 201
    for _ in range(2):
        publisher = await connect(server, clients)
        await publisher.join(room_name, "speaker", identity=identity)
        t0 = time.time() + 0.2
        await publisher.publish(BeepTrack(t0), FlashTrack(t0))
        await asyncio.sleep(4)
        await publisher.close()  # gone: the room closes, the egress waits for it

        async def waiting() -> bool:
            _, described = await api(base, "GET", f"/api/egress/{egress['id']}")
            return described["state"] == "waiting"

        await wait_for(waiting, 10)
    _, stopped = await api(base, "DELETE", f"/api/egress/{egress['id']}")
    names = sorted(u.rsplit("/", 1)[-1] for u in stopped["recordings"])
    assert names == [f"{identity}-{kind}-{n}.webm" for kind in ("audio", "video") for n in (1, 2)], names
    starts = {}
    for url in stopped["recordings"]:
        path = await downloaded(base, url, tmp_path)
        times, _, frames = wall_times(path, "video" if "-video-" in path.name else "audio")
        assert frames > 0 and times[-1] - times[0] > 2.5, (path.name, frames)
        with av.open(str(path)) as container:
            meta = {k.lower(): v for k, v in container.metadata.items()}
        starts[path.name] = (meta["chorus_origin"], times[0])
    assert len({origin for origin, _ in starts.values()}) == 1  # one timeline
    assert starts[f"{identity}-video-2.webm"][1] - starts[f"{identity}-video-1.webm"][1] > 4.0
