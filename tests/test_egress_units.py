"""
Egress pieces without a server: the HLS output's cuts (aligned rungs and audio, gaps), the composite worker,
request checking, the recordings folder's path safety and retention.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import av
import pytest
from egress_media import VP8_CODEC, encode_opus, encode_video, packetize

from chorus.egress.depacketize import AccessUnit
from chorus.egress.errors import EgressError
from chorus.egress.fmp4 import Track
from chorus.egress.hls import HlsOutput, HlsSettings
from chorus.egress.ladder import Composite, EncodedFrame, Ladder, Rung
from chorus.egress.manager import EgressRequest, parse_rungs
from chorus.egress.playlist import parse_media_name
from chorus.egress.recordings import RecordingStore
from chorus.egress.sink import TrackSink
from chorus.sfu.rtp import vp8_is_keyframe_start
from chorus.sfu.source import PacketMeta, Source


def segment_starts(output: HlsOutput, name: str) -> dict[int, int]:
    rendition = output.rendition(name)
    assert rendition is not None
    return {number: start for number, start, _ in rendition.segments}


def first_pts(output: HlsOutput, name: str, number: int) -> int:
    rendition = output.rendition(name)
    assert rendition is not None
    data = (rendition.get("init.mp4") or b"") + (rendition.get(f"seg{number}.m4s") or b"")
    with av.open(io.BytesIO(data), format="mp4") as container:
        return int(next(p for p in container.demux() if p.size).pts)


async def test_passthrough_rungs_and_audio_cut_on_the_same_instants() -> None:
    """An H.264 source with key frames every second and 1 s segments: the 90p rung (from the ladder) and the
    AAC audio are cut where the top rung was, with the same numbers; a 3 s pause makes a discontinuity."""
    video = encode_video("libx264", 150, width=320, height=180, gop=30)
    opus = encode_opus(5.0)
    frames: list[EncodedFrame] = []
    ladder = Ladder(rungs=(Rung("source", None, 500_000), Rung("90p", 90, 100_000)), on_frame=frames.append,
                    max_backlog=64 << 20)
    output = HlsOutput(HlsSettings(segment=1.0, rungs=(Rung("90p", 90, 100_000),)), origin=time.time(),
                       ladder=ladder)
    await ladder.start()
    pause = 3 * 90000  # after frame 90, the publisher is muted for 3 s
    ai = 0
    for i, f in enumerate(video):
        pts = 9000 + f.pts + (pause if i >= 90 else 0)
        output.video_unit(AccessUnit(f.data, pts, 0, f.keyframe), "h264")
        while ai < len(opus) and opus[ai].pts * 90000 // 48000 <= f.pts:
            a = opus[ai]
            output.audio_unit(AccessUnit(a.data, 4800 + a.pts + (pause * 48000 // 90000 if i >= 90 else 0), 0, True))
            ai += 1
        if i % 10 == 0:
            await asyncio.sleep(0)  # let the ladder's output come back as it would live
    await ladder.close(timeout=60)
    for frame in frames:
        output.encoded(frame)
    output.end()
    assert output.error is None
    top, low, audio = (segment_starts(output, n) for n in ("source", "90p", "audio"))
    assert sorted(top) == [0, 1, 2, 3, 4] and low == top, (top, low)
    # Every segment of every video rung starts on the same picture (tfdt and first sample).
    for number in top:
        assert first_pts(output, "source", number) == first_pts(output, "90p", number) == top[number]
    # Audio segments: same numbers, each starting at the first AAC frame at or after the video cut.
    assert sorted(audio) == sorted(top)
    for number, start in audio.items():
        assert 0 <= start - top[number] * 48000 // 90000 < 1024 + 960, (number, start, top[number])
    playlist = output.rendition("source").playlist()  # type: ignore[union-attr]
    assert playlist.count("#EXT-X-DISCONTINUITY\n") == 1 and "#EXT-X-ENDLIST" in playlist
    master = output.master()
    assert master is not None and master.count("#EXT-X-STREAM-INF") == 2 and 'URI="audio/index.m3u8"' in master
    mpd = output.mpd()
    assert mpd is not None and 'type="static"' in mpd


async def test_composite_worker_lays_out_mixes_and_cuts_on_the_grid() -> None:
    """Two VP8 participants and one Opus voice for ~3 s in real time: every rung has IDRs exactly on the 1 s
    grid, the composite is at its size, the AAC mix covers the time."""
    a = encode_video("libvpx", 90, width=320, height=240, gop=30)
    b = encode_video("libvpx", 90, width=160, height=120, gop=30)
    opus = encode_opus(3.0)
    out: list[EncodedFrame] = []
    origin = time.time()
    ladder = Ladder(rungs=(Rung("source", None, 600_000), Rung("90p", 90, 100_000)), on_frame=out.append,
                    composite=Composite(320, 180, 15, 1.0, origin, delay=0.2))
    await ladder.start()
    await ladder.wait_ready()
    began = time.time()  # feeding starts once the worker is ready, on the same timeline
    for i in range(90):
        due = began + i / 30
        await asyncio.sleep(max(0.0, due - time.time()))
        pts = round((due - origin) * 90000)
        ladder.push_video(a[i].data, pts, keyframe=a[i].keyframe, codec="vp8", source_index=0)
        ladder.push_video(b[i].data, pts, keyframe=b[i].keyframe, codec="vp8", source_index=1)
        for p in opus[int(i * 50 / 30):int((i + 1) * 50 / 30)]:
            ladder.push_audio(p.data, round((due - origin) * 48000), source_index=1)
    ladder.source_ended(1)
    await asyncio.sleep(0.4)
    await ladder.close(timeout=30)
    assert ladder.error is None
    top = [f for f in out if f.rung == "source"]
    low = [f for f in out if f.rung == "90p"]
    assert len(top) >= 35 and len(low) == len(top)  # 15 fps for ~3 s
    keys = [f.pts for f in top if f.keyframe]
    assert keys == [f.pts for f in low if f.keyframe]
    assert all(k // 90000 != j // 90000 for k, j in zip(keys, keys[1:], strict=False))  # one per grid second
    assert all(k % 90000 < 90000 // 15 + 1 for k in keys[1:])  # the first tick of each second
    ctx = av.CodecContext.create("h264", "r")
    sizes = {(d.width, d.height) for f in top for d in ctx.decode(av.Packet(f.data))}
    assert sizes == {(320, 180)}
    aac = [f for f in out if f.rung == "audio"]
    assert aac and (aac[-1].pts - aac[0].pts) / 48000 > 2.0
    print(f"\ncomposite worker CPU (% of one core): "
          f"{ {k: round(ladder.stats.percent_of_core(k), 1) for k in ladder.stats.cpu} }")


def test_requests_are_checked() -> None:
    ok = EgressRequest.parse({"room": "r1", "kind": "hls", "participant": "alice", "low_latency": True,
                              "ladder": ["360:800", "180:250"], "segment": 1})
    assert ok.participant == "alice" and not ok.composite and ok.rungs is not None and ok.segment == 1.0
    assert EgressRequest.parse({"room": "r1", "kind": "hls"}).composite  # a room's HLS is its composite
    assert not EgressRequest.parse({"room": "r1", "kind": "record"}).composite  # per-track files
    for body in ({"room": "..", "kind": "hls"}, {"room": "../etc", "kind": "hls"}, {"room": "%2e%2e"},
                 {"room": ".x"}, {"room": "a/b"}, {"room": "r", "kind": "rtmp"}, {"room": "r", "segment": 0.1},
                 {"room": "r", "ladder": ["abc"]}, {"room": "r", "participant": "a", "composite": True},
                 {"room": "r", "low_latency": "yes"}, {"room": "r", "surprise": 1}, ["r"], None):
        with pytest.raises(EgressError) as error:
            EgressRequest.parse(body)
        assert error.value.code == "bad_input", body
    assert [r.name for r in parse_rungs(["720:2500", "360:800"])] == ["720p", "360p"]
    assert parse_media_name("seg3.1.m4s") == (3, 1) and parse_media_name("../seg3.m4s") is None


def test_recordings_folder_refuses_paths_outside_it(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path / "rec", retention_days=1)
    folder = store.folder_for("room1", "eg-0123456789ab", time.time())
    folder.mkdir(parents=True)
    (folder / "alice-video-1.webm").write_bytes(b"\x1a\x45\xdf\xa3")
    (tmp_path / "secret.webm").write_bytes(b"secret")
    assert store.resolve("room1", folder.name, "alice-video-1.webm").is_file()
    for room, sub, name in (("..", folder.name, "x.webm"), ("room1", "..", "secret.webm"),
                            ("room1", folder.name, "../../secret.webm"), ("room1", "%2e%2e", "secret.webm"),
                            ("room1", folder.name, ".hidden.webm"), ("/tmp", folder.name, "x.webm")):
        with pytest.raises(EgressError) as error:
            store.resolve(room, sub, name)
        assert error.value.code == "bad_input", (room, sub, name)
    with pytest.raises(EgressError) as error:
        store.resolve("room1", folder.name, "missing.webm")
    assert error.value.code == "not_found"
    listed = store.listing()
    assert [(r.room, r.name) for r in listed] == [("room1", "alice-video-1.webm")]
    # Retention: a file two days old goes (with its empty folders); a busy folder is kept.
    old = time.time() - 2 * 86400
    os.utime(folder / "alice-video-1.webm", (old, old))
    assert store.sweep(busy={folder}) == []
    assert store.sweep() == [f"room1/{folder.name}/alice-video-1.webm"]
    assert not folder.exists() and not (tmp_path / "rec" / "room1").exists()
    assert (tmp_path / "secret.webm").exists()


def test_track_h264_from_parameter_sets() -> None:
    """The rendition of a passed-through source is described from its own SPS (size, profile)."""
    from chorus.egress.hls import parameter_sets

    frames = encode_video("libx264", 1, width=320, height=180)
    sets = parameter_sets(frames[0].data)
    assert sets is not None
    track = Track.h264(*sets)
    assert (track.width, track.height) == (320, 180) and track.codec.startswith("avc1.42")


class _Simulcast(Source):
    """A three-layer source whose layers can be turned off, as a simulcast producer presents them."""

    def __init__(self) -> None:
        super().__init__("t-sim", "p-sim", "video", VP8_CODEC)
        self.active = [True, True, True]
        self.requests: list[int | None] = []

    @property
    def layer_count(self) -> int:
        return 3

    def layer_active(self, layer: int) -> bool:
        return self.active[layer]

    def request_keyframe(self, layer: int | None = None) -> None:
        self.requests.append(layer)


async def test_an_egress_sink_takes_the_top_simulcast_layer_and_follows_it() -> None:
    """The sink wants the top layer (so the publisher keeps sending it), takes only its packets, moves to the
    best layer still sent when the top stops, at that layer's key frame, and keeps its timeline monotonic."""
    source = _Simulcast()
    units: list[AccessUnit] = []
    sink = TrackSink("eg-test", source, origin=time.time() - 1, on_unit=units.append, settle=0.0)
    sink.attach()
    assert sink.wanted_layer == 2 and source.requests == [2]
    frames = encode_video("libvpx", 60, width=160, height=120, gop=15)
    layers = [packetize(VP8_CODEC, frames, seq0=1000 * i, ts0=123456 * (i + 1), ssrc=i + 1) for i in range(3)]
    now = time.time()

    by_frame = [[[p for p in layer if p.timestamp == (123456 * (i + 1) + f.pts) & 0xFFFFFFFF] for f in frames]
                for i, layer in enumerate(layers)]
    for n in range(35):
        now = time.time() + n / 30
        for i in range(3):
            for p in by_frame[i][n]:
                sink.deliver(p, PacketMeta(vp8_is_keyframe_start(p.payload), 0, b"\0\0\0", now, layer=i))
    assert sink.layer == 2 and len(units) == 35
    source.active[2] = False  # the publisher stopped sending the top layer
    for n in range(35, 60):
        now = time.time() + n / 30 + 1.0
        for i in range(2):
            for p in by_frame[i][n]:
                sink.deliver(p, PacketMeta(vp8_is_keyframe_start(p.payload), 0, b"\0\0\0", now, layer=i))
    assert sink.layer == 1 and sink.layer_switches == 1 and 1 in source.requests
    assert len(units) == 35 + 15 and units[35].keyframe  # layer 1 from its next key frame on (frame 45)
    assert all(b.pts > a.pts for a, b in zip(units, units[1:], strict=False))


def test_opus_passed_through_without_a_worker() -> None:
    """``audio="opus"`` with no lower rungs: the publisher's H.264 and Opus go into CMAF untouched, no worker."""
    video = encode_video("libx264", 90, width=320, height=180, gop=30)
    opus = encode_opus(3.0)
    output = HlsOutput(HlsSettings(segment=1.0, audio="opus"), origin=time.time(), ladder=None)
    ai = 0
    for f in video:
        output.video_unit(AccessUnit(f.data, 9000 + f.pts, 0, f.keyframe), "h264")
        while ai < len(opus) and opus[ai].pts * 90000 // 48000 <= f.pts:
            output.audio_unit(AccessUnit(opus[ai].data, 4800 + opus[ai].pts, 0, True))
            ai += 1
    output.end()
    audio = output.rendition("audio")
    assert output.error is None and audio is not None and audio.track.codec == "opus"
    assert sorted(segment_starts(output, "audio")) == sorted(segment_starts(output, "source")) == [0, 1, 2]
    data = (audio.get("init.mp4") or b"") + b"".join(audio.get(f"seg{n}.m4s") or b"" for n in range(3))
    with av.open(io.BytesIO(data), format="mp4") as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
    assert samples >= 2.5 * 48000
    assert 'CODECS="avc1.' in (output.master() or "") and ',opus"' in (output.master() or "")
