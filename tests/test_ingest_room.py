"""
Ingest into the media plane, in one process: the bridge's sources (passthrough byte for byte, re-encoding when
pictures turn out reordered), external participants and what a viewer watches, H.264 profiles in SDP, the
ingress store surviving a restart, the manager's limits and drain.
"""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket
from conftest import free_port
from ingest_util import Collector, ffmpeg_source_args, needs_ffmpeg, run_ffmpeg, start_ffmpeg
from media import dominant_frequency

from chorus.ingest import h264
from chorus.ingest.bridge import StreamBridge
from chorus.ingest.errors import LimitError, RoomUnavailableError
from chorus.ingest.manager import IngestSettings, IngressManager, IngressMember
from chorus.ingest.media import EndReason, MediaItem, PublishSession, VideoAccessUnit, VideoConfig
from chorus.ingest.rtmp import RtmpServer
from chorus.ingest.store import FileStore
from chorus.sfu import aiortc_adapter as adapter
from chorus.sfu.external import ExternalPeer
from chorus.sfu.logs import PeerLogger
from chorus.sfu.observer import SubscribeOffer, TrackInfo
from chorus.sfu.router import Router
from chorus.sfu.rtp import advertise_h264_levels, same_codec
from chorus.sfu.source import PacketMeta, Source

LOG = PeerLogger("test")


class Observer:
    """A RouterObserver that remembers what it was told."""

    def __init__(self) -> None:
        self.added: list[TrackInfo] = []
        self.removed: list[TrackInfo] = []
        self.on_added: list[Any] = []

    def send_offer(self, peer_id: str, offer: SubscribeOffer) -> None: ...

    def peer_failed(self, peer_id: str, reason: str) -> None: ...

    def source_added(self, track: TrackInfo) -> None:
        self.added.append(track)
        for callback in self.on_added:
            callback(track)

    def source_removed(self, track: TrackInfo) -> None:
        self.removed.append(track)

    def viewer_closed(self, viewer_id: str, reason: str) -> None: ...


@dataclass
class Recorder:
    """A Sink keeping every packet with its keyframe flag."""

    id: str
    packets: list[tuple[RtpPacket, bool]] = field(default_factory=list)
    closed: bool = False

    def deliver(self, packet: RtpPacket, meta: PacketMeta) -> None:
        self.packets.append((packet, meta.keyframe))

    def restart(self) -> None: ...

    def source_closed(self) -> None:
        self.closed = True


class Tee:
    """A MediaSink handing everything to two sinks."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks

    def media(self, item: MediaItem) -> None:
        for sink in self.sinks:
            sink.media(item)

    def ended(self, reason: EndReason) -> None:
        for sink in self.sinks:
            sink.ended(reason)


def expected_nalus(collector: Collector) -> list[list[bytes]]:
    """What the packetizer must send for each unit: the unit's NAL units but AUD and filler, with the current
    SPS and PPS first in an IDR unit that lacks them."""
    out, config = [], None
    for item in collector.items:
        if isinstance(item, VideoConfig):
            config = item
        elif isinstance(item, VideoAccessUnit):
            nalus = [n for n in item.nalus if h264.nal_type(n) not in (h264.NAL_AUD, h264.NAL_FILLER)]
            types = {h264.nal_type(n) for n in nalus}
            if h264.NAL_IDR in types and h264.NAL_SPS not in types and config is not None:
                nalus = [*config.sps, *config.pps, *nalus]
            out.append(nalus)
    return out


def units_of(recorder: Recorder) -> list[tuple[int, list[bytes], bool]]:
    """RTP packets back to (timestamp, NAL units, starts with a keyframe flag), split at marker bits."""
    units, payloads, keyframe = [], [], False
    for packet, key in recorder.packets:
        if not payloads:
            keyframe = key
        payloads.append(packet.payload)
        if packet.marker:
            units.append((packet.timestamp, h264.depacketize(payloads), keyframe))
            payloads = []
    return units


@needs_ffmpeg
async def test_passthrough_is_the_encoders_bytes_and_aac_becomes_opus() -> None:
    """A baseline stream over RTMP into an external participant: the RTP payloads carry exactly the encoder's NAL
    units (no encoder is ever built), keyframes are flagged, timestamps are the stream's; the AAC arrives as Opus
    of the same tone."""
    router = Router("r", observer := Observer(), log=LOG)
    peer = router.add_external_peer("p-enc", "encoder")
    recorders: dict[str, Recorder] = {}
    observer.on_added.append(lambda track: peer.producers[track.id].attach(
        recorders.setdefault(track.kind, Recorder(f"rec-{track.kind}"))))
    collector = Collector()
    bridges: list[StreamBridge] = []
    ended: list[EndReason] = []

    async def on_publish(session: PublishSession) -> Tee:
        bridge = StreamBridge(peer, log=LOG, on_ended=ended.append, on_failed=lambda e: None)
        bridges.append(bridge)
        return Tee(collector, bridge)

    async def authorize(app: str, name: str, remote: tuple[str, int]) -> Any:
        return "in_test" if name == "key" else None

    server = RtmpServer(authorize=authorize, on_publish=on_publish, port=0)
    await server.start()
    try:
        code, err = await run_ffmpeg(*ffmpeg_source_args(3), "-c:v", "libx264", "-preset", "veryfast", "-g", "30",
                                     "-profile:v", "baseline", "-bf", "0", "-pix_fmt", "yuv420p", "-c:a", "aac",
                                     "-ar", "48000", "-ac", "2", "-f", "flv", f"rtmp://127.0.0.1:{server.port}/live/key")
        assert code == 0, err
        await collector.wait(lambda: collector.reason is not None)
        await asyncio.sleep(0.3)  # the last Opus packets and forwarded units
        bridge = bridges[0]
        assert bridge.reencoder is None and bridge.video_mode == "passthrough"
        assert bridge.describe()["video"]["mode"] == "passthrough" and ended[0].code == "unpublished"
        sent = units_of(recorders["video"])
        expected = expected_nalus(collector)
        assert len(sent) == len(expected) >= 85
        assert [nalus for _, nalus, _ in sent] == expected  # byte for byte
        assert [key for _, _, key in sent] == [u.keyframe for u in collector.video]
        assert [ts for ts, _, _ in sent] == [h264.rtp_timestamp(u.pts_ms) for u in collector.video]
        video_track = next(t for t in observer.added if t.kind == "video")
        assert bridge.video is not None and bridge.video.id == video_track.id
        assert bridge.video.codec.parameters["profile-level-id"] == collector.video_configs[0].profile_level_id

        decoder = av.CodecContext.create("opus", "r")
        pcm = []
        for packet, _ in recorders["audio"].packets:
            for frame in decoder.decode(av.Packet(packet.payload)):
                array = frame.to_ndarray()
                pcm.append(array[0] if frame.format.is_planar else array.reshape(-1, 2)[:, 0])
        samples = np.concatenate(pcm).astype(np.float64)
        assert len(samples) > 48000 * 2.5
        assert abs(dominant_frequency(samples[4800:], 48000) - 440) < 5
    finally:
        await server.close()
        for bridge in bridges:
            await bridge.close()
        await router.close()


async def test_pictures_out_of_order_switch_to_reencoding_at_the_next_keyframe() -> None:
    """An SPS that does not announce reordering, then a composition offset: the stream is re-encoded from its
    next keyframe on (and the re-encoder is asked for IDRs when subscribers need one)."""
    router = Router("r", Observer(), log=LOG)
    peer = router.add_external_peer("p-1", "enc")
    failures: list[Any] = []
    bridge = StreamBridge(peer, log=LOG, on_ended=lambda r: None, on_failed=failures.append)
    sps = bytes.fromhex("6742c01e95a0a0fd01")  # a constrained-baseline SPS (what x264 writes, trimmed)
    config = VideoConfig(sps=(sps,), pps=(b"\x68\xce\x3c\x80",), profile_level_id="42c01e", width=320,
                         height=240, may_reorder=False)
    bridge.media(config)
    assert bridge.video_mode == "passthrough" and bridge.video is not None
    source = bridge.video
    bridge.media(VideoAccessUnit(0, 0, True, [b"\x65\x88\x80"]))
    bridge.media(VideoAccessUnit(66, 33, False, [b"\x41\x9a"]))  # pts ≠ dts: reordering
    assert bridge.video_mode == "reencode" and bridge.reencoder is not None
    assert "out of order" in bridge.reencode_reason
    assert bridge.video is source  # subscribers keep their negotiated track
    await bridge.close()
    await router.close()
    assert not failures


def plain_source(source_id: str, peer_id: str, kind: str) -> Source:
    codec = RTCRtpCodecParameters(mimeType="video/VP8" if kind == "video" else "audio/opus",
                                  clockRate=90000 if kind == "video" else 48000, payloadType=96)
    return Source(source_id, peer_id, kind, codec)


async def test_external_participants_and_what_a_viewer_watches() -> None:
    observer = Observer()
    router = Router("r", observer, log=LOG)
    a = router.add_external_peer("p-a", "alice")
    b = router.add_external_peer("p-b", "bob")
    assert router.playback_tracks() == []
    a.publish(plain_source("a-v", "p-a", "video"))
    a.publish(plain_source("a-a", "p-a", "audio"))
    b.publish(plain_source("b-a", "p-b", "audio"))
    assert [t.id for t in router.playback_tracks()] == ["a-v", "a-a"]
    b.publish(plain_source("b-v", "p-b", "video"))
    assert [t.id for t in router.playback_tracks()] == ["b-v", "b-a"]  # the most recent video
    assert [t.id for t in router.playback_tracks("alice")] == ["a-v", "a-a"]  # by name
    assert [t.id for t in router.playback_tracks("p-a")] == ["a-v", "a-a"]  # by id
    b.set_muted("b-v", True)
    assert [t.id for t in router.playback_tracks()] == ["a-v", "a-a"]  # unmuted first
    with pytest.raises(Exception, match="no participant"):
        router.playback_tracks("carol")
    assert [t.id for t in observer.added] == ["a-v", "a-a", "b-a", "b-v"]
    assert {p["name"]: len(p["tracks"]) for p in router.describe_peers()} == {"alice": 2, "bob": 2}
    assert router.counts().producers == {"video": 2, "audio": 2}
    await router.remove_peer("p-a")
    assert {t.id for t in observer.removed} == {"a-v", "a-a"}
    assert [t.id for t in router.playback_tracks()] == ["b-v", "b-a"]
    await router.close()
    assert b.closed and not b.producers


def test_h264_profiles_are_offered_with_the_streams_own_level() -> None:
    def h264_codec(plid: str) -> RTCRtpCodecParameters:
        return RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102,
                                     parameters={"packetization-mode": "1", "profile-level-id": plid})

    cb = adapter.offerable_codec(h264_codec("42c01e"))  # x264 "baseline" = constrained baseline, level 3.0
    assert cb.parameters["profile-level-id"] == "42e01f"  # aiortc's entry of that profile
    assert not same_codec(adapter.offerable_codec(h264_codec("42001f")), h264_codec("42e01f"))  # two profiles
    main = adapter.offerable_codec(h264_codec("4d401f"))  # not in aiortc's list: added once
    assert main.parameters["profile-level-id"] == "4d401f"
    assert adapter.offerable_codec(h264_codec("4d0028")) == main  # one entry per profile
    with pytest.raises(Exception, match="cannot be offered"):
        adapter.offerable_codec(h264_codec("6e0028"))  # High 10: no WebRTC profile

    sdp = ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=fmtp:111 minptime=10\r\n"
           "m=video 9 UDP/TLS/RTP/SAVPF 103\r\na=mid:1\r\n"
           "a=fmtp:103 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d401f\r\n")
    rewritten = advertise_h264_levels(sdp, {"1": h264_codec("4d0028"), "0": h264_codec("42c01e")})
    assert "profile-level-id=4d0028" in rewritten and "4d401f" not in rewritten
    assert rewritten.split("m=video")[0] == sdp.split("m=video")[0]


class Rooms:
    """A RoomAccess over one in-process router."""

    def __init__(self) -> None:
        self.router = Router("r", Observer(), log=LOG)
        self.left: list[str] = []
        self.full = False

    async def join(self, room: str, name: str, member: IngressMember) -> ExternalPeer:
        if self.full:
            raise RoomUnavailableError("room full")
        return self.router.add_external_peer(f"p-{name}-{len(self.left)}", name)

    async def leave(self, room: str, peer_id: str, reason: str) -> None:
        self.left.append(reason)
        await self.router.remove_peer(peer_id)


async def test_keys_survive_a_restart_and_are_never_stored(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ingresses.json"
    first = IngressManager(IngestSettings(), Rooms(), store=FileStore(path))
    await first.start()
    created = await first.create("rtmp", "r", "obs")
    whip = await first.create("whip", "r", "studio")
    key = created["stream_key"]
    await first.close()
    text = path.read_text()
    assert key not in text and whip["stream_key"] not in text  # digests only
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    second = IngressManager(IngestSettings(), Rooms(), store=FileStore(path))
    await second.start()
    assert second.keys.check(key) == created["id"]
    assert second.authorize_key(whip["stream_key"], "whip") is not None
    assert second.authorize_key(whip["stream_key"], "rtmp") is None  # a key is for one kind
    assert await second.revoke(created["id"])
    assert second.keys.check(key) is None
    await second.close()
    third = IngressManager(IngestSettings(), Rooms(), store=FileStore(path))
    await third.start()
    assert third.keys.check(key) is None and [i["id"] for i in third.list()] == [whip["id"]]
    await third.close()


@needs_ffmpeg
async def test_limits_and_drain(tmp_path: Path) -> None:
    """At most max_live streams at once; while the node drains the running one ends with the reason and a new
    publisher is refused."""
    rooms = Rooms()
    events: list[tuple[str, dict[str, Any]]] = []
    manager = IngressManager(IngestSettings(rtmp_port=free_port(), max_live=1), rooms,
                             on_event=lambda e, d: events.append((e, d)))
    await manager.start()
    assert manager.rtmp is not None
    server = manager.rtmp
    one = await manager.create("rtmp", "r", "one")
    two = await manager.create("rtmp", "r", "two")
    args = [*ffmpeg_source_args(20, size="160x120"), "-c:v", "libx264", "-preset", "ultrafast", "-bf", "0",
            "-c:a", "aac", "-f", "flv"]
    first = await start_ffmpeg("-re", *args, f"rtmp://127.0.0.1:{server.port}/live/{one['stream_key']}")
    try:
        async with asyncio.timeout(10):
            while manager.describe(one["id"])["state"] != "publishing":
                await asyncio.sleep(0.05)
        code, _ = await run_ffmpeg(*ffmpeg_source_args(1, size="160x120"), "-c:v", "libx264", "-f", "flv",
                                   f"rtmp://127.0.0.1:{server.port}/live/{two['stream_key']}")
        assert code != 0
        assert manager.describe(two["id"])["last_error"]["code"] == "limit_exceeded"
        with pytest.raises(LimitError):
            manager.reserve(manager.records[two["id"]], "rtmp", ("", 0), lambda: None)
        await manager.close("draining: moving to another node")
        described = manager.describe(one["id"])
        assert described["state"] == "idle"
        assert described["last_end"]["code"] == "stopped" and "draining" in described["last_end"]["reason"]
        assert [e for e, _ in events] == ["ingress_started", "ingress_ended"]
        assert events[-1][1]["reason"] == "stopped" and rooms.left
        with pytest.raises(LimitError):
            await manager.create("rtmp", "r", "three")
    finally:
        if first.returncode is None:  # the drain or the refusal may have ended it already
            first.kill()
        await first.wait()
        await manager.close()
        await rooms.router.close()

