"""
ingest/pull.py: pulling RTSP (Debian ffmpeg as the camera, see rtsp_camera.py), RTMP (ffmpeg's RTMP server
mode), HLS (ffmpeg's segments served by aiohttp) and files; reconnection, refusal of paths outside the media
folder.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from ingest_util import (
    Collector,
    decodable_frames,
    ffmpeg_encode_args,
    ffmpeg_source_args,
    needs_ffmpeg,
    run_ffmpeg,
    start_ffmpeg,
)
from rtsp_camera import RtspRelay, start_camera, stop_camera

from chorus.ingest.errors import ForbiddenPathError, IngestError, SourceError
from chorus.ingest.pull import PullSettings, PullSource, resolve_source

pytestmark = needs_ffmpeg

FAST = PullSettings(open_timeout=3, read_timeout=2, backoff_base=0.2, backoff_cap=1.0)


def states_recorder() -> tuple[list[tuple[str, IngestError | None]], Callable[[str, IngestError | None], None]]:
    states: list[tuple[str, IngestError | None]] = []
    return states, lambda state, error: states.append((state, error))


async def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def test_sources_outside_the_media_folder_are_refused(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(b"x")
    (tmp_path / "secret.mp4").write_bytes(b"x")
    (media / "escape.mp4").symlink_to(tmp_path / "secret.mp4")
    assert resolve_source("clip.mp4", media).url == str(media / "clip.mp4")
    assert resolve_source(f"file://{media}/clip.mp4", media).is_file
    for bad in ("../secret.mp4", str(tmp_path / "secret.mp4"), f"file://{tmp_path}/secret.mp4", "escape.mp4",
                "sub/../../secret.mp4", "missing.mp4", ".", "/etc/passwd"):
        with pytest.raises(ForbiddenPathError):
            resolve_source(bad, media)
    with pytest.raises(ForbiddenPathError):
        resolve_source("clip.mp4", None)
    for bad in ("concat:a.mp4|b.mp4", "tcp://127.0.0.1:1/", "https://example.invalid/video.mp4", "udp://x:1",
                "subfile,,start,0,end,10,,:clip.mp4", "rtsp:///nohost"):
        with pytest.raises((SourceError, ForbiddenPathError)):
            resolve_source(bad, media)
    source = resolve_source("https://cdn.example.invalid/live/index.m3u8", media)
    assert "file" not in source.options["protocol_whitelist"]


@pytest.fixture
async def relay() -> AsyncIterator[RtspRelay]:
    r = RtspRelay()
    await r.start()
    yield r
    await r.close()


async def test_rtsp_camera_pull_survives_the_camera_vanishing(relay: RtspRelay) -> None:
    camera = await start_camera(relay)
    sink = Collector()
    states, on_state = states_recorder()
    source = PullSource(relay.url, sink, settings=FAST, on_state=on_state)
    await source.start()
    try:
        await sink.wait(lambda: len(sink.video) >= 30 and len(sink.audio) >= 40, timeout=15)
        (config,) = sink.video_configs
        assert (config.width, config.height) == (320, 240)
        (audio_config,) = sink.audio_configs
        assert (audio_config.sample_rate, audio_config.channels) == (48000, 2)
        assert decodable_frames(config, sink.video[:30]) == 30
        # the camera vanishes: the puller notices, backs off, and comes back when the camera does
        await stop_camera(camera)
        await wait_until(lambda: any(s == "backoff" for s, _ in states), timeout=5)
        backoff_error = next(e for s, e in states if s == "backoff")
        assert isinstance(backoff_error, SourceError)
        before = len(sink.video)
        camera = await start_camera(relay)
        await sink.wait(lambda: len(sink.video) >= before + 30, timeout=20)
        assert source.connections >= 2 and sink.reason is None
        dts = [u.dts_ms for u in sink.video]
        assert dts == sorted(dts)  # time never goes backwards across reconnections
    finally:
        await source.stop()
        await stop_camera(camera)
    assert sink.reason is not None and sink.reason.code == "stopped" and sink.ended_count == 1
    assert states[-1][0] == "stopped"


async def test_unreachable_source_fails_after_max_attempts(relay: RtspRelay) -> None:
    sink = Collector()
    states, on_state = states_recorder()
    settings = PullSettings(open_timeout=2, read_timeout=2, backoff_base=0.1, backoff_cap=0.4, max_attempts=3)
    source = PullSource(relay.url, sink, settings=settings, on_state=on_state)  # no camera: DESCRIBE gets 404
    await source.start()
    try:
        await sink.wait(lambda: sink.reason is not None, timeout=15)
    finally:
        await source.stop()
    assert sink.reason is not None and sink.reason.code == "source_unavailable" and not sink.items
    assert [s for s, _ in states].count("backoff") == 3 and states[-1][0] == "failed"


async def test_file_is_played_in_real_time_and_loops(tmp_path: Path) -> None:
    code, err = await run_ffmpeg(*ffmpeg_source_args(1), *ffmpeg_encode_args(), "-movflags", "+faststart",
                                 str(tmp_path / "clip.mp4"))
    assert code == 0, err
    sink = Collector()
    source = PullSource("clip.mp4", sink, settings=PullSettings(media_root=tmp_path, read_timeout=2))
    await source.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await sink.wait(lambda: len(sink.video) >= 15, timeout=10)
        assert loop.time() - started >= 0.4  # paced, not dumped at disk speed
        await sink.wait(lambda: len(sink.video) >= 45, timeout=10)  # more than the file has: it looped
    finally:
        await source.stop()
    assert source.connections >= 2
    dts = [u.dts_ms for u in sink.video]
    assert dts == sorted(dts) and len(set(dts)) == len(dts)
    assert sink.video_configs[0].may_reorder  # B-frames from the file, handed on as they are
    assert sink.reason is not None and sink.reason.code == "stopped"


async def test_rtmp_pull_from_ffmpeg_server_mode() -> None:
    from conftest import free_port

    port = free_port()
    server = await start_ffmpeg("-re", *ffmpeg_source_args(30), *ffmpeg_encode_args(), "-f", "flv", "-listen", "1",
                                f"rtmp://127.0.0.1:{port}/live/cam")
    sink = Collector()
    source = PullSource(f"rtmp://127.0.0.1:{port}/live/cam", sink, settings=FAST)
    await asyncio.sleep(0.5)  # let ffmpeg listen (the puller would retry anyway)
    await source.start()
    try:
        await sink.wait(lambda: len(sink.video) >= 20 and len(sink.audio) >= 20, timeout=15)
        assert sink.video_configs and sink.audio_configs
    finally:
        await source.stop()
        server.kill()
        await server.wait()


async def test_hls_pull(tmp_path: Path) -> None:
    from conftest import free_port

    code, err = await run_ffmpeg(*ffmpeg_source_args(2), *ffmpeg_encode_args(baseline=True), "-f", "hls",
                                 "-hls_time", "1", "-hls_list_size", "0", str(tmp_path / "index.m3u8"))
    assert code == 0, err
    app = web.Application()
    app.router.add_static("/live", tmp_path)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    sink = Collector()
    source = PullSource(f"http://127.0.0.1:{port}/live/index.m3u8", sink, settings=FAST)
    await source.start()
    try:
        await sink.wait(lambda: len(sink.video) >= 30 and len(sink.audio) >= 30, timeout=15)
        assert not sink.video_configs[0].may_reorder
    finally:
        await source.stop()
        await runner.cleanup()
