"""ingest/rtmp.py against Debian's ffmpeg publishing testsrc2 + sine, and against a hostile raw client."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from ingest_util import (
    Collector,
    RawRtmpClient,
    decodable_frames,
    ffmpeg_encode_args,
    ffmpeg_source_args,
    needs_ffmpeg,
    run_ffmpeg,
    start_ffmpeg,
)

from chorus.ingest import amf0, h264
from chorus.ingest.errors import IngestError, LimitError, ProtocolError, UnauthorizedError
from chorus.ingest.media import PublishSession, RefusedConnection
from chorus.ingest.rtmp import RtmpLimits, RtmpServer

KEY = "sk_live_7f3a9c"
AAC_ASC = bytes([0x11, 0x90])  # AAC LC, 48 kHz, stereo


@dataclass
class Harness:
    server: RtmpServer
    sinks: list[Collector] = field(default_factory=list)
    sessions: list[PublishSession] = field(default_factory=list)
    refused: list[RefusedConnection] = field(default_factory=list)
    authorize_calls: list[tuple[str, str, tuple[str, int]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"rtmp://127.0.0.1:{self.server.port}/live"

    async def wait_sink(self, timeout: float = 10.0) -> Collector:
        async with asyncio.timeout(timeout):
            while not self.sinks:
                await asyncio.sleep(0.02)
        return self.sinks[0]

    async def wait_refused(self, timeout: float = 5.0) -> RefusedConnection:
        async with asyncio.timeout(timeout):
            while not self.refused:
                await asyncio.sleep(0.02)
        return self.refused[0]


async def make_harness(limits: RtmpLimits | None = None) -> Harness:
    harness: Harness

    async def authorize(app: str, name: str, remote: tuple[str, int]) -> Any:
        harness.authorize_calls.append((app, name, remote))
        return {"ingress": "in-1"} if (app, name) == ("live", KEY) else None

    async def on_publish(session: PublishSession) -> Collector:
        harness.sessions.append(session)
        sink = Collector()
        harness.sinks.append(sink)
        return sink

    server = RtmpServer(authorize=authorize, on_publish=on_publish, port=0, limits=limits,
                        on_refused=lambda r: harness.refused.append(r))
    harness = Harness(server)
    await server.start()
    return harness


@pytest.fixture
async def rtmp() -> AsyncIterator[Harness]:
    harness = await make_harness(RtmpLimits(handshake_timeout=3, idle_timeout=3))
    yield harness
    await harness.server.close()


@needs_ffmpeg
async def test_ffmpeg_publishes_h264_with_bframes_and_aac(rtmp: Harness) -> None:
    code, err = await run_ffmpeg(*ffmpeg_source_args(3), *ffmpeg_encode_args(), "-f", "flv", f"{rtmp.url}/{KEY}")
    assert code == 0, err
    sink = await rtmp.wait_sink()
    await sink.wait(lambda: sink.reason is not None)
    assert sink.reason is not None and sink.reason.code == "unpublished" and sink.ended_count == 1
    session = rtmp.sessions[0]
    assert (session.app, session.stream_name, session.grant) == ("live", KEY, {"ingress": "in-1"})
    assert rtmp.authorize_calls[0][2][0] == "127.0.0.1"

    (config,) = sink.video_configs
    assert (config.width, config.height) == (320, 240) and config.may_reorder
    assert h264.webrtc_profile(config.profile_level_id) == "high"
    assert len(sink.video) == 90 and sink.video[0].keyframe and sum(u.keyframe for u in sink.video) == 3
    assert any(u.composition_offset_ms > 0 for u in sink.video)  # B-frames, visible at run time
    dts = [u.dts_ms for u in sink.video]
    assert dts == sorted(dts)
    assert decodable_frames(config, sink.video) == 90

    (audio_config,) = sink.audio_configs
    assert (audio_config.sample_rate, audio_config.channels, audio_config.object_type) == (48000, 2, 2)
    assert 135 <= len(sink.audio) <= 145  # 3 s of 1024-sample frames at 48 kHz ≈ 141
    assert sink.metadata and sink.metadata[0].values.get("width") == 320.0
    # configs precede the media they describe
    kinds = [type(i).__name__ for i in sink.items]
    assert kinds.index("VideoConfig") < kinds.index("VideoAccessUnit")
    assert kinds.index("AudioConfig") < kinds.index("AudioFrame")


@needs_ffmpeg
async def test_ffmpeg_baseline_without_bframes_needs_no_reordering(rtmp: Harness) -> None:
    code, err = await run_ffmpeg(*ffmpeg_source_args(1), *ffmpeg_encode_args(baseline=True), "-f", "flv",
                                 f"{rtmp.url}/{KEY}")
    assert code == 0, err
    sink = await rtmp.wait_sink()
    await sink.wait(lambda: sink.reason is not None)
    (config,) = sink.video_configs
    assert not config.may_reorder and config.profile_level_id.startswith("42")
    assert h264.webrtc_profile(config.profile_level_id) == "constrained-baseline"
    assert all(u.composition_offset_ms == 0 for u in sink.video) and len(sink.video) == 30


@needs_ffmpeg
async def test_wrong_key_is_refused_and_nothing_is_delivered(rtmp: Harness) -> None:
    code, err = await run_ffmpeg(*ffmpeg_source_args(1), *ffmpeg_encode_args(), "-f", "flv",
                                 f"{rtmp.url}/WRONG-KEY", timeout=15)
    assert code != 0
    assert not rtmp.sinks and not rtmp.sessions
    refused = await rtmp.wait_refused()
    assert isinstance(refused.error, UnauthorizedError) and refused.stream_name == "WRONG-KEY"
    # The server keeps serving: the right key works right after.
    code, err = await run_ffmpeg(*ffmpeg_source_args(0.5), *ffmpeg_encode_args(), "-f", "flv", f"{rtmp.url}/{KEY}")
    assert code == 0, err
    assert len(rtmp.sinks) == 1


async def test_wrong_key_gets_badname_on_status_then_close(rtmp: Harness) -> None:
    client = await RawRtmpClient.connect(rtmp.server.port)
    status = await client.publish("live", "nope")
    assert status[0] == "onStatus"
    assert status[3]["level"] == "error" and status[3]["code"] == "NetStream.Publish.BadName"
    assert await client.closed_by_server()
    assert not rtmp.sinks


async def test_command_replies_carry_transaction_ids(rtmp: Harness) -> None:
    client = await RawRtmpClient.connect(rtmp.server.port)
    await client.handshake()
    client.command("connect", {"app": "live"})
    control = []
    while True:
        type_id, _, body = await client.read_message()
        if type_id == 20:
            break
        control.append(type_id)
    assert control == [5, 6, 1]  # Window Ack Size, Set Peer Bandwidth, Set Chunk Size
    values = amf0.decode(body)
    assert values[:2] == ["_result", 1.0]
    for name in ("releaseStream", "FCPublish"):
        txn = client.command(name, None, KEY)
        assert (await client.until_command("_result"))[1] == txn
    txn = client.command("createStream", None)
    reply = await client.until_command("_result")
    assert reply[1] == txn and reply[3] == 1.0
    txn = client.command("whatIsThis", None)
    assert (await client.until_command("_error"))[1] == txn
    client.command("publish", None, KEY, "live", stream_id=1)
    status = await client.until_command("onStatus")
    assert status[3]["code"] == "NetStream.Publish.Start"
    sink = await rtmp.wait_sink()
    client.command("FCUnpublish", None, KEY)
    client.command("deleteStream", None, 1)
    await sink.wait(lambda: sink.reason is not None)
    assert sink.reason is not None and sink.reason.code == "unpublished"
    client.close()


async def test_chunk_formats_and_extended_timestamps(rtmp: Harness) -> None:
    client = await RawRtmpClient.connect(rtmp.server.port)
    await client.publish("live", KEY)
    sink = await rtmp.wait_sink()
    client.message(4, 8, 1, b"\xaf\x00" + AAC_ASC, timestamp=0)
    frame = b"\xaf\x01" + bytes(range(200))  # 202 bytes: two chunks at the default size of 128
    big = 0x1000000 + 5
    w = client.writer
    # type 0 with an extended timestamp, continued by a type 3 chunk that repeats it (as ffmpeg/librtmp do)
    w.write(client.chunk(0, 4, timestamp=big, type_id=8, stream_id=1, length=202, payload=frame[:128],
                         extended=True) + client.chunk(3, 4, timestamp=big, payload=frame[128:], extended=True))
    # type 3 starting a new message: same length/type, delta = the previous header's timestamp field (extended)
    w.write(client.chunk(3, 4, timestamp=big, payload=frame[:128], extended=True)
            + client.chunk(3, 4, timestamp=big, payload=frame[128:], extended=True))
    # type 1 (delta 20, new length), type 2 (delta 21), type 3 (delta 21 again)
    w.write(client.chunk(1, 4, timestamp=20, type_id=8, length=10, payload=b"\xaf\x01" + bytes(8)))
    w.write(client.chunk(2, 4, timestamp=21, payload=b"\xaf\x01" + bytes(8)))
    w.write(client.chunk(3, 4, payload=b"\xaf\x01" + bytes(8)))
    # Set Chunk Size 4096, then a message in one chunk
    client.message(2, 1, 0, (4096).to_bytes(4, "big"))
    client.out_chunk = 4096
    client.message(4, 8, 1, frame, timestamp=(2 * big + 62) & 0xFFFFFFFF)
    await sink.wait(lambda: len(sink.audio) == 6)
    stamps = [f.pts_ms for f in sink.audio]
    assert stamps == [big, 2 * big, 2 * big + 20, 2 * big + 41, 2 * big + 62, 2 * big + 62]
    assert [len(f.aac) for f in sink.audio] == [200, 200, 8, 8, 8, 200]
    client.close()


async def test_aggregate_message_is_unpacked(rtmp: Harness) -> None:
    client = await RawRtmpClient.connect(rtmp.server.port)
    await client.publish("live", KEY)
    sink = await rtmp.wait_sink()
    client.message(4, 8, 1, b"\xaf\x00" + AAC_ASC)
    tags = b""
    for i, stamp in enumerate((1000, 1021, 1042)):
        body = b"\xaf\x01" + bytes([i]) * 5
        tags += bytes([8]) + len(body).to_bytes(3, "big") + stamp.to_bytes(3, "big") + b"\x00" + bytes(3) + body
        tags += (11 + len(body)).to_bytes(4, "big")
    client.message(4, 22, 1, tags, timestamp=5000)
    await sink.wait(lambda: len(sink.audio) == 3)
    assert [f.pts_ms for f in sink.audio] == [5000, 5021, 5042]
    client.close()


@pytest.mark.parametrize("seed", range(4))
async def test_garbage_closes_the_connection_and_the_server_survives(rtmp: Harness, seed: int) -> None:
    rng = random.Random(seed)
    reader, writer = await asyncio.open_connection("127.0.0.1", rtmp.server.port)
    payload = rng.randbytes(5000)
    if seed % 2:
        payload = b"\x03" + payload  # looks like RTMP for one byte
    writer.write(payload)
    async with asyncio.timeout(5):
        while await reader.read(65536):
            pass
    writer.close()
    refused = await rtmp.wait_refused()
    assert isinstance(refused.error, IngestError)
    # garbage after a valid publish: the sink ends with a typed error
    client = await RawRtmpClient.connect(rtmp.server.port)
    await client.publish("live", KEY)
    sink = await rtmp.wait_sink()
    client.writer.write(bytes([0x04]) + rng.randbytes(3000))  # type 0 header of chunk stream 4, then noise
    await sink.wait(lambda: sink.reason is not None)
    assert sink.reason is not None and sink.reason.error is not None
    assert sink.reason.code in ("protocol_error", "limit_exceeded", "unsupported_codec", "timeout")
    assert await client.closed_by_server()
    assert rtmp.server.connections == 0


async def test_stream_cut_mid_tag_is_a_protocol_error(rtmp: Harness) -> None:
    client = await RawRtmpClient.connect(rtmp.server.port)
    await client.publish("live", KEY)
    sink = await rtmp.wait_sink()
    client.message(2, 1, 0, (4096).to_bytes(4, "big"))
    client.out_chunk = 4096
    client.message(4, 8, 1, b"\xaf\x00" + AAC_ASC)
    header = client.chunk(0, 4, timestamp=40, type_id=9, stream_id=1, length=10_000)
    client.writer.write(header + b"\x17\x01\x00\x00\x00" + bytes(995))  # 1000 of 10000 bytes, then gone
    await client.writer.drain()
    client.writer.close()
    await sink.wait(lambda: sink.reason is not None)
    assert sink.reason is not None and isinstance(sink.reason.error, ProtocolError)
    assert "middle of a message" in sink.reason.detail
    client.close()


async def test_handshake_timeout_and_idle_timeout() -> None:
    harness = await make_harness(RtmpLimits(handshake_timeout=0.5, idle_timeout=0.5))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.server.port)
        writer.write(b"\x03" + bytes(100))  # a slow loris: never completes C1
        refused = await harness.wait_refused()
        assert refused.error.code == "timeout"
        assert await reader.read() == b""
        writer.close()
        client = await RawRtmpClient.connect(harness.server.port)
        await client.publish("live", KEY)
        sink = await harness.wait_sink()
        await sink.wait(lambda: sink.reason is not None, timeout=3)  # publishes, then says nothing
        assert sink.reason is not None and sink.reason.code == "timeout"
        client.close()
    finally:
        await harness.server.close()


async def test_connection_caps_per_address_and_total() -> None:
    harness = await make_harness(RtmpLimits(max_connections=3, max_connections_per_address=2))
    try:
        first = [await asyncio.open_connection("127.0.0.1", harness.server.port) for _ in range(2)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.server.port)
        assert await reader.read() == b""  # closed at once
        refused = await harness.wait_refused()
        assert isinstance(refused.error, LimitError)
        assert harness.server.connections == 2
        writer.close()
        for _, w in first:
            w.close()
        await asyncio.sleep(0.2)
        assert harness.server.connections == 0
    finally:
        await harness.server.close()


async def test_oversized_message_is_refused() -> None:
    harness = await make_harness(RtmpLimits(max_message_size=64 * 1024))
    try:
        client = await RawRtmpClient.connect(harness.server.port)
        await client.publish("live", KEY)
        sink = await harness.wait_sink()
        client.writer.write(client.chunk(0, 4, timestamp=0, type_id=9, stream_id=1, length=1 << 20))
        await sink.wait(lambda: sink.reason is not None)
        assert sink.reason is not None and sink.reason.code == "limit_exceeded"
        client.close()
    finally:
        await harness.server.close()


@needs_ffmpeg
async def test_publisher_killed_mid_stream_ends_the_sink(rtmp: Harness) -> None:
    proc = await start_ffmpeg("-re", *ffmpeg_source_args(20), *ffmpeg_encode_args(), "-f", "flv",
                              f"{rtmp.url}/{KEY}")
    try:
        sink = await rtmp.wait_sink()
        await sink.wait(lambda: len(sink.video) >= 10)
        proc.kill()
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        await sink.wait(lambda: sink.reason is not None, timeout=5)
        assert loop.time() - killed_at < 1.0
        assert sink.reason is not None and sink.reason.code in ("disconnected", "protocol_error")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@needs_ffmpeg
async def test_server_close_ends_publishers_with_stopped() -> None:
    harness = await make_harness()
    proc = await start_ffmpeg("-re", *ffmpeg_source_args(20), *ffmpeg_encode_args(), "-f", "flv",
                              f"{harness.url}/{KEY}")
    try:
        sink = await harness.wait_sink()
        await sink.wait(lambda: len(sink.video) >= 5)
        await harness.server.close()
        assert sink.reason is not None and sink.reason.code == "stopped" and sink.ended_count == 1
        async with asyncio.timeout(10):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_amf0_round_trip_and_bounds() -> None:
    values = ["connect", 1.0, {"app": "live", "n": 2.5, "ok": True, "nested": {"x": None}}, None, [1.0, "a"]]
    assert amf0.decode(amf0.encode(*values)) == values
    with pytest.raises(ProtocolError):
        amf0.decode(bytes([3]) * 40 + b"\x00")  # objects nested past the depth limit
    with pytest.raises(ProtocolError):
        amf0.decode(bytes([10, 0xFF, 0xFF, 0xFF, 0xFF]))  # strict array claiming 4 billion values
    for _ in range(300):
        try:
            amf0.decode(os.urandom(random.randrange(1, 64)))
        except ProtocolError:
            pass


def avcc_record(sps: bytes, pps: bytes) -> bytes:
    """An AVCDecoderConfigurationRecord (ISO/IEC 14496-15 §5.3.3.1) for one SPS and one PPS."""
    return (bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]) + len(sps).to_bytes(2, "big") + sps
            + bytes([1]) + len(pps).to_bytes(2, "big") + pps)


async def test_obs_style_session_with_type_1_headers(rtmp: Harness) -> None:
    """What librtmp (OBS) sends: Set Chunk Size 4096 first, FMLE connect, releaseStream/FCPublish/createStream,
    publish, @setDataFrame, then media on chunk streams 4 (audio) and 6 (video) with type 1 headers (deltas)."""
    import fractions

    import av
    import numpy as np

    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 160, 96, "yuv420p"
    encoder.time_base = fractions.Fraction(1, 30)
    encoder.options = {"preset": "ultrafast", "threads": "1", "profile": "baseline"}
    packets = []
    for i in range(10):
        frame = av.VideoFrame.from_ndarray(np.full((144, 160), i * 20, np.uint8), format="yuv420p")
        frame.pts = i
        packets += encoder.encode(frame)
    packets += encoder.encode(None)
    nal_lists = [h264.split_annexb(bytes(p)) for p in packets]
    sps = next(n for n in nal_lists[0] if h264.nal_type(n) == h264.NAL_SPS)
    pps = next(n for n in nal_lists[0] if h264.nal_type(n) == h264.NAL_PPS)

    client = await RawRtmpClient.connect(rtmp.server.port)
    await client.handshake()
    client.message(2, 1, 0, (4096).to_bytes(4, "big"))
    client.out_chunk = 4096
    client.command("connect", {"app": "live", "type": "nonprivate", "flashVer": "FMLE/3.0 (compatible; FMSc/1.0)",
                               "swfUrl": "rtmp://127.0.0.1/live", "tcUrl": "rtmp://127.0.0.1/live"})
    await client.until_command("_result")
    client.command("releaseStream", None, KEY)
    client.command("FCPublish", None, KEY)
    client.command("createStream", None)
    assert (await client.until_command("_result"))[1] == 2.0  # releaseStream's reply comes first, in order
    while (reply := await client.until_command("_result"))[1] != 4.0:
        pass
    assert reply[3] == 1.0
    client.command("publish", None, KEY, "live", stream_id=1)
    assert (await client.until_command("onStatus"))[3]["code"] == "NetStream.Publish.Start"
    client.message(4, 18, 1, amf0.encode("@setDataFrame", "onMetaData", {"width": 160.0, "encoder": "obs-output"}))
    client.message(6, 9, 1, b"\x17\x00\x00\x00\x00" + avcc_record(sps, pps))
    client.message(4, 8, 1, b"\xaf\x00" + AAC_ASC)
    for i, nalus in enumerate(nal_lists):
        body = bytes([0x17 if i == 0 else 0x27, 1, 0, 0, 0]) + h264.join_avcc(
            n for n in nalus if h264.nal_type(n) not in (h264.NAL_SPS, h264.NAL_PPS))
        if i == 0:
            client.message(6, 9, 1, body, timestamp=0)
        else:  # type 1: delta 33, new length; (csid 6 already has stream id 1)
            client.writer.write(client.chunk(1, 6, timestamp=33, type_id=9, length=len(body), payload=body))
    sink = await rtmp.wait_sink()
    await sink.wait(lambda: len(sink.video) == len(nal_lists))
    assert [u.dts_ms for u in sink.video] == [33 * i for i in range(len(nal_lists))]
    assert sink.metadata[0].values == {"width": 160.0, "encoder": "obs-output"}
    (config,) = sink.video_configs
    assert config.sps == (sps,) and config.pps == (pps,) and not config.may_reorder
    assert decodable_frames(config, sink.video) == len(nal_lists)
    client.command("FCUnpublish", None, KEY)
    client.command("deleteStream", None, 1.0)
    await sink.wait(lambda: sink.reason is not None)
    assert sink.reason is not None and sink.reason.code == "unpublished"
    client.close()


async def test_hevc_over_enhanced_rtmp_is_refused_as_unsupported(rtmp: Harness) -> None:
    client = await RawRtmpClient.connect(rtmp.server.port)
    await client.publish("live", KEY)
    sink = await rtmp.wait_sink()
    client.message(6, 9, 1, bytes([0x90]) + b"hvc1" + bytes(20))  # IsExHeader, key frame, SequenceStart, HEVC
    await sink.wait(lambda: sink.reason is not None)
    assert sink.reason is not None and sink.reason.code == "unsupported_codec"
    client.close()


async def test_acknowledgements_follow_the_peers_window(rtmp: Harness) -> None:
    client = await RawRtmpClient.connect(rtmp.server.port)
    await client.publish("live", KEY)
    await rtmp.wait_sink()
    client.message(2, 5, 0, (5000).to_bytes(4, "big"))  # Window Acknowledgement Size: ack every 5000 bytes
    client.message(4, 8, 1, b"\xaf\x00" + AAC_ASC)
    for i in range(40):
        client.message(4, 8, 1, b"\xaf\x01" + bytes(500), timestamp=i * 21)
    acks = []
    async with asyncio.timeout(5):
        while len(acks) < 3:
            type_id, _, body = await client.read_message()
            if type_id == 3:
                acks.append(int.from_bytes(body, "big"))
    assert acks == sorted(acks) and acks[1] - acks[0] >= 5000
    client.close()
