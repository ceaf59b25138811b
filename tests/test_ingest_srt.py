"""ingest/srt.py: Debian ffmpeg calling over SRT with MPEG-TS; keys checked in libsrt's handshake thread."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from ingest_util import (
    Collector,
    decodable_frames,
    ffmpeg_encode_args,
    ffmpeg_source_args,
    have_srt_library,
    needs_ffmpeg,
    run_ffmpeg,
    start_ffmpeg,
)

from chorus.ingest import h264
from chorus.ingest.errors import LimitError, ProtocolError, UnauthorizedError
from chorus.ingest.keys import StreamKeys
from chorus.ingest.media import PublishSession, RefusedConnection
from chorus.ingest.srt import SrtLimits, SrtServer, parse_streamid

pytestmark = [needs_ffmpeg, pytest.mark.skipif(not have_srt_library(), reason="libsrt1.5-gnutls is not installed")]

KEY = "srt_k_51f0e2d4"


@dataclass
class Harness:
    server: SrtServer
    keys: StreamKeys
    sinks: list[Collector] = field(default_factory=list)
    sessions: list[PublishSession] = field(default_factory=list)
    refused: list[RefusedConnection] = field(default_factory=list)

    def url(self, streamid: str) -> str:
        return f"srt://127.0.0.1:{self.server.port}?streamid={streamid}&mode=caller"

    async def wait_sink(self, timeout: float = 10.0) -> Collector:
        async with asyncio.timeout(timeout):
            while not self.sinks:
                await asyncio.sleep(0.02)
        return self.sinks[0]


async def make_harness(limits: SrtLimits | None = None) -> Harness:
    keys = StreamKeys({KEY: "ingress-srt-1"})
    harness: Harness

    async def on_publish(session: PublishSession) -> Collector:
        harness.sessions.append(session)
        sink = Collector()
        harness.sinks.append(sink)
        return sink

    server = SrtServer(authorize=lambda key, remote: keys.check(key), on_publish=on_publish, port=0,
                       limits=limits or SrtLimits(idle_timeout=2.0), on_refused=lambda r: harness.refused.append(r))
    harness = Harness(server, keys)
    await server.start()
    return harness


@pytest.fixture
async def srt() -> AsyncIterator[Harness]:
    harness = await make_harness()
    yield harness
    await harness.server.close()


def ts_args() -> list[str]:
    return ["-f", "mpegts"]


@pytest.mark.parametrize("streamid", [KEY, f"#!::r={KEY},m=publish", f"#!::u=obs,r={KEY},m=publish,s=1"])
async def test_ffmpeg_publishes_h264_and_aac_over_srt(srt: Harness, streamid: str) -> None:
    code, err = await run_ffmpeg("-re", *ffmpeg_source_args(3), *ffmpeg_encode_args(), *ts_args(),
                                 srt.url(streamid))
    assert code == 0, err
    sink = await srt.wait_sink()
    await sink.wait(lambda: sink.reason is not None, timeout=10)
    assert sink.reason is not None and sink.reason.code == "disconnected", sink.reason
    session = srt.sessions[0]
    assert (session.protocol, session.stream_name, session.grant) == ("srt", KEY, "ingress-srt-1")
    (config,) = sink.video_configs
    assert (config.width, config.height) == (320, 240) and config.may_reorder
    assert h264.webrtc_profile(config.profile_level_id) == "high"
    # A live-mode caller closes with SRTO_LINGER 0: what is still in flight (and the muxer's last PES) may be
    # lost, so only the start and the continuity are exact.
    assert len(sink.video) >= 60 and sink.video[0].keyframe and sink.video[0].dts_ms == 0
    assert all(32 <= b.dts_ms - a.dts_ms <= 34 for a, b in zip(sink.video, sink.video[1:], strict=False))
    assert any(u.composition_offset_ms > 0 for u in sink.video)
    assert decodable_frames(config, sink.video) == len(sink.video)
    (audio_config,) = sink.audio_configs
    assert (audio_config.sample_rate, audio_config.channels) == (48000, 2)
    assert len(sink.audio) >= 80
    # (the demuxer may drop part of the very first audio PES while it probes the live stream)
    assert all(20 <= b.pts_ms - a.pts_ms <= 23 for a, b in zip(sink.audio[1:], sink.audio[2:], strict=False))
    assert srt.server.connections == 0


async def test_wrong_key_is_refused_in_the_handshake(srt: Harness) -> None:
    for streamid in ("WRONG", "#!::r=WRONG,m=publish", f"#!::r={KEY},m=request", "#!::garbage"):
        code, _ = await run_ffmpeg(*ffmpeg_source_args(1), *ffmpeg_encode_args(), *ts_args(), srt.url(streamid),
                                   timeout=20)
        assert code != 0, streamid
    await asyncio.sleep(0.1)
    assert not srt.sinks and not srt.sessions
    errors = [type(r.error) for r in srt.refused]
    assert errors.count(UnauthorizedError) == 3 and errors.count(ProtocolError) == 1
    # a revoked key stops working for the next caller; an added one starts working
    srt.keys.revoke(KEY)
    srt.keys.add("fresh-key", "ingress-2")
    code, _ = await run_ffmpeg(*ffmpeg_source_args(0.5), *ffmpeg_encode_args(), *ts_args(), srt.url(KEY), timeout=20)
    assert code != 0 and not srt.sinks
    code, err = await run_ffmpeg("-re", *ffmpeg_source_args(1), *ffmpeg_encode_args(), *ts_args(),
                                 srt.url("fresh-key"))
    assert code == 0, err
    assert (await srt.wait_sink()) is not None and srt.sessions[0].grant == "ingress-2"


async def test_garbage_udp_harms_nothing(srt: Harness) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(300):
            size = 1 + (i * 97) % 1500
            s.sendto(os.urandom(size), ("127.0.0.1", srt.server.port))
            if i % 50 == 0:  # something shaped like an SRT control packet (handshake type) with junk
                s.sendto(b"\x80\x00\x00\x00" + os.urandom(60), ("127.0.0.1", srt.server.port))
    await asyncio.sleep(0.3)
    assert srt.server.connections == 0 and not srt.sinks
    code, err = await run_ffmpeg("-re", *ffmpeg_source_args(1), *ffmpeg_encode_args(), *ts_args(), srt.url(KEY))
    assert code == 0, err
    sink = await srt.wait_sink()
    await sink.wait(lambda: sink.reason is not None)
    assert sink.video


async def test_per_address_cap_refuses_the_extra_caller() -> None:
    harness = await make_harness(SrtLimits(max_connections_per_address=1, idle_timeout=2.0))
    first = await start_ffmpeg("-re", *ffmpeg_source_args(20), *ffmpeg_encode_args(), *ts_args(), harness.url(KEY))
    try:
        sink = await harness.wait_sink()
        await sink.wait(lambda: len(sink.video) > 5)
        code, _ = await run_ffmpeg(*ffmpeg_source_args(0.5), *ffmpeg_encode_args(), *ts_args(), harness.url(KEY),
                                   timeout=20)
        assert code != 0
        assert any(isinstance(r.error, LimitError) for r in harness.refused)
        assert len(harness.sinks) == 1
    finally:
        if first.returncode is None:  # the drain or the refusal may have ended it already
            first.kill()
        await first.wait()
        await harness.server.close()


async def test_killed_caller_and_close() -> None:
    harness = await make_harness(SrtLimits(idle_timeout=1.5))
    proc = await start_ffmpeg("-re", *ffmpeg_source_args(20), *ffmpeg_encode_args(), *ts_args(), harness.url(KEY))
    try:
        sink = await harness.wait_sink()
        await sink.wait(lambda: len(sink.video) > 5)
        proc.kill()
        loop = asyncio.get_running_loop()
        killed = loop.time()
        await sink.wait(lambda: sink.reason is not None, timeout=6)
        assert loop.time() - killed < 5
        assert sink.reason is not None and sink.reason.code in ("timeout", "disconnected")
        # a second publisher is ended with "stopped" when the server closes
        proc = await start_ffmpeg("-re", *ffmpeg_source_args(20), *ffmpeg_encode_args(), *ts_args(),
                                  harness.url(KEY))
        async with asyncio.timeout(10):
            while len(harness.sinks) < 2:
                await asyncio.sleep(0.05)
        second = harness.sinks[1]
        await second.wait(lambda: len(second.video) > 3)
        await harness.server.close()
        await asyncio.sleep(0)
        assert second.reason is not None and second.reason.code == "stopped" and second.ended_count == 1
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await harness.server.close()


def test_parse_streamid() -> None:
    assert parse_streamid("abc") == ("abc", "publish")
    assert parse_streamid("#!::r=abc,m=publish") == ("abc", "publish")
    assert parse_streamid("#!::m=publish,r=live/abc") == ("live/abc", "publish")
    assert parse_streamid("#!::r=abc") == ("abc", "publish")
    assert parse_streamid("#!::r=abc,m=request") == ("abc", "request")
    for bad in ("#!::", "#!::m=publish", "#!::r"):
        with pytest.raises(ProtocolError):
            parse_streamid(bad)
