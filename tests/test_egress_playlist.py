"""HLS/DASH descriptions: syntax checked by hand, then FFmpeg (through PyAV) plays the master playlist and the MPD."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import av
import pytest
from egress_media import encode_video
from test_egress_fmp4 import aac_samples

from chorus.egress.errors import EgressError
from chorus.egress.fmp4 import Fragmenter, Part, Sample, Segment, Track
from chorus.egress.h264 import annexb_to_length_prefixed, nal_type, split_annexb
from chorus.egress.playlist import (
    Audio,
    BlockingReload,
    Rendition,
    Variant,
    cache_control,
    dash_manifest,
    master_playlist,
    parse_blocking_query,
    parse_media_name,
)

RUNGS = [("360p", 640, 360), ("180p", 320, 180), ("90p", 160, 90)]
ATTR = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^",]*)(?:,|$)')


def attributes(text: str) -> dict[str, str]:
    """An attribute list (RFC 8216 §4.2), strictly: every byte must belong to an attribute."""
    out: dict[str, str] = {}
    pos = 0
    for m in ATTR.finditer(text):
        assert m.start() == pos, f"junk in attribute list {text!r}"
        assert m.group(1) not in out, f"duplicate attribute in {text!r}"
        out[m.group(1)] = m.group(2).strip('"')
        pos = m.end()
    assert pos == len(text), f"junk at the end of {text!r}"
    return out


def check_media_playlist(text: str, *, live: bool, ll: bool) -> dict[str, object]:
    """The rules of RFC 8216 and rfc8216bis this writer must keep; returns what was found."""
    lines = text.splitlines()
    assert lines[0] == "#EXTM3U" and text.endswith("\n")
    target = part_target = None
    extinf: list[float] = []
    uris: list[str] = []
    parts: list[tuple[float, str]] = []
    pending_inf = None
    hint = None
    for line in lines[1:]:
        assert line, "no blank lines"
        if pending_inf is not None:
            assert not line.startswith("#"), "EXTINF must be followed by its URI"
            uris.append(line)
            extinf.append(pending_inf)
            pending_inf = None
            continue
        tag, _, value = line.partition(":")
        if tag == "#EXT-X-TARGETDURATION":
            target = int(value)
        elif tag == "#EXT-X-PART-INF":
            part_target = float(attributes(value)["PART-TARGET"])
        elif tag == "#EXT-X-SERVER-CONTROL":
            a = attributes(value)
            assert a["CAN-BLOCK-RELOAD"] == "YES"
            assert part_target is None or float(a["PART-HOLD-BACK"]) >= 2 * part_target
        elif tag == "#EXTINF":
            assert value.endswith(",")
            pending_inf = float(value[:-1])
        elif tag == "#EXT-X-PART":
            a = attributes(value)
            parts.append((float(a["DURATION"]), a["URI"]))
            assert set(a) <= {"DURATION", "URI", "INDEPENDENT"}
        elif tag == "#EXT-X-PRELOAD-HINT":
            a = attributes(value)
            assert a["TYPE"] == "PART"
            hint = a["URI"]
        elif tag == "#EXT-X-PROGRAM-DATE-TIME":
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", value)
        elif tag == "#EXT-X-MAP":
            assert attributes(value)["URI"] == "init.mp4"
        else:
            assert tag in {"#EXT-X-VERSION", "#EXT-X-MEDIA-SEQUENCE", "#EXT-X-INDEPENDENT-SEGMENTS",
                           "#EXT-X-ENDLIST"}, tag
    assert target is not None and all(round(d) <= target for d in extinf)
    assert ("#EXT-X-ENDLIST" in lines) == (not live)
    if ll:
        assert part_target is not None and all(d <= part_target + 1e-6 for d, _ in parts)
        assert (hint is not None) == live
    else:
        assert part_target is None and not parts and hint is None
    return {"extinf": extinf, "uris": uris, "parts": parts, "hint": hint,
            "sequence": int(next(x for x in lines if x.startswith("#EXT-X-MEDIA-SEQUENCE")).split(":")[1])}


def rung_samples(width: int, height: int) -> tuple[Track, list[Sample]]:
    frames = encode_video("libx264", 180, width=width, height=height, gop=30)
    nals = split_annexb(frames[0].data)
    track = Track.h264(next(n for n in nals if nal_type(n) == 7), next(n for n in nals if nal_type(n) == 8))
    return track, [Sample(annexb_to_length_prefixed(f.data), f.pts, f.keyframe) for f in frames]


def build(tmp: Path, *, ll: bool, live_checks: bool = False) -> tuple[list[tuple[Rendition, Variant]],
                                                                      tuple[Rendition, Audio]]:
    """Three rungs and AAC audio, 6 s, 2 s segments, written to ``tmp``; every rendition ended."""
    origin = 1_800_000_000.0
    part = 0.5 if ll else None
    video: list[Rendition] = []
    for name, w, h in RUNGS:
        track, samples = rung_samples(w, h)
        rendition = Rendition(name, track, segment_duration=2.0, part_duration=part, wall_clock_origin=origin,
                              directory=tmp, frame_rate=30.0)
        fragmenter = Fragmenter(track, segment_duration=2.0, part_duration=part)
        for i, s in enumerate(samples):
            rendition.add(fragmenter.push(s))
            if live_checks and i % 7 == 0:
                check_media_playlist(rendition.playlist(), live=True, ll=ll)
        rendition.add(fragmenter.finish())
        video.append(rendition)
    track, samples = aac_samples(6.0)
    audio = Rendition("audio", track, segment_duration=2.0, part_duration=part, wall_clock_origin=origin,
                      directory=tmp)
    fragmenter = Fragmenter(track, segment_duration=2.0, part_duration=part)
    for s in samples:
        audio.add(fragmenter.push(s))
    audio.add(fragmenter.finish())
    variants = [(r, Variant.of(r, nominal_bitrate=500_000)) for r in video]
    return variants, (audio, Audio.of(audio))


@pytest.mark.parametrize("ll", [False, True])
def test_live_playlists_keep_the_rules(tmp_path: Path, ll: bool) -> None:
    variants, _ = build(tmp_path, ll=ll, live_checks=True)
    rendition = variants[0][0]
    found = check_media_playlist(rendition.playlist(), live=True, ll=ll)
    assert found["uris"] == ["seg0.m4s", "seg1.m4s", "seg2.m4s"] and found["extinf"] == [2.0, 2.0, 2.0]
    if ll:
        assert found["hint"] == "seg3.0.m4s"
        assert [u for _, u in found["parts"]][:4] == ["seg0.0.m4s", "seg0.1.m4s", "seg0.2.m4s", "seg0.3.m4s"]
        text = rendition.playlist()
        assert text.count("INDEPENDENT=YES") == 6  # the parts that start at a key frame (one each second)
    rendition.end()
    check_media_playlist(rendition.playlist(), live=False, ll=ll)
    assert (tmp_path / "360p" / "index.m3u8").read_text() == rendition.playlist()


def test_sliding_window_evicts_old_files(tmp_path: Path) -> None:
    track, samples = rung_samples(160, 90)
    rendition = Rendition("low", track, segment_duration=1.0, window=2, keep_extra=1, directory=tmp_path)
    fragmenter = Fragmenter(track, segment_duration=1.0)
    for s in samples:
        rendition.add(fragmenter.push(s))
    found = check_media_playlist(rendition.playlist(), live=True, ll=False)
    # Segments 0..4 complete (5 is open): the window lists 3 and 4, the files of 2 are still served.
    assert found["sequence"] == 3 and found["uris"] == ["seg3.m4s", "seg4.m4s"]
    assert rendition.get("seg2.m4s") is not None and rendition.get("seg1.m4s") is None
    assert sorted(p.name for p in (tmp_path / "low").iterdir()) == [
        "index.m3u8", "init.mp4", "seg2.m4s", "seg3.m4s", "seg4.m4s"]


def test_master_playlist_attributes(tmp_path: Path) -> None:
    variants, (audio, audio_info) = build(tmp_path, ll=False)
    text = master_playlist([v for _, v in variants], audio_info)
    lines = text.splitlines()
    assert lines[0] == "#EXTM3U"
    media = [attributes(x.split(":", 1)[1]) for x in lines if x.startswith("#EXT-X-MEDIA:")]
    assert media == [{"TYPE": "AUDIO", "GROUP-ID": "audio", "NAME": "audio", "DEFAULT": "YES", "AUTOSELECT": "YES",
                      "CHANNELS": "2", "URI": "audio/index.m3u8"}]
    infs = [(attributes(x.split(":", 1)[1]), lines[i + 1]) for i, x in enumerate(lines)
            if x.startswith("#EXT-X-STREAM-INF:")]
    assert [uri for _, uri in infs] == ["360p/index.m3u8", "180p/index.m3u8", "90p/index.m3u8"]
    for (a, _), (_name, w, h) in zip(infs, RUNGS, strict=True):
        assert a["RESOLUTION"] == f"{w}x{h}" and a["AUDIO"] == "audio" and a["FRAME-RATE"] == "30.000"
        assert re.fullmatch(r"avc1\.[0-9a-f]{6},mp4a\.40\.2", a["CODECS"])
        assert int(a["BANDWIDTH"]) >= int(a["AVERAGE-BANDWIDTH"]) > audio_info.bandwidth
    bandwidths = [int(a["BANDWIDTH"]) for a, _ in infs]
    assert bandwidths == sorted(bandwidths, reverse=True)


def ended_build(tmp: Path) -> None:
    variants, audio = build(tmp, ll=True)
    for r, _ in variants:
        r.end()
    audio[0].end()
    (tmp / "index.m3u8").write_text(master_playlist([v for _, v in variants], audio[1]))
    (tmp / "index.mpd").write_text(dash_manifest(variants, audio))


def check_rungs(streams: dict[tuple[int, int], list[int]]) -> None:
    """Every rung decodes all 6 s, and the rungs carry the same timestamps (segment boundaries shared)."""
    assert sorted(streams) == sorted((w, h) for _, w, h in RUNGS)
    timelines = list(streams.values())
    assert all(len(t) == 180 for t in timelines), [len(t) for t in timelines]
    assert all(sorted(t) == sorted(timelines[0]) for t in timelines)


def test_ffmpeg_plays_the_master_playlist(tmp_path: Path) -> None:
    ended_build(tmp_path)
    with av.open(str(tmp_path / "index.m3u8")) as container:
        assert container.streams.audio and container.streams.audio[0].codec_context.name == "aac"
        streams: dict[tuple[int, int], list[int]] = {}
        audio_frames = 0
        for packet in container.demux():
            if packet.stream.type == "video" and packet.size:
                assert packet.pts is not None
                key = (packet.stream.codec_context.width, packet.stream.codec_context.height)
                streams.setdefault(key, []).extend([int(packet.pts)] * len(packet.decode()))
            elif packet.stream.type == "audio" and packet.size:
                audio_frames += len(packet.decode())
    check_rungs(streams)
    assert audio_frames >= 6 * 48000 // 1024 - 2


def test_mpd_names_the_same_files_and_they_decode(tmp_path: Path) -> None:
    """PyAV's FFmpeg has no DASH demuxer (built without libxml2): resolve the MPD here, decode with PyAV."""
    ended_build(tmp_path)
    ns = {"d": "urn:mpeg:dash:schema:mpd:2011"}
    root = ET.parse(tmp_path / "index.mpd").getroot()
    assert root.get("type") == "static" and root.get("mediaPresentationDuration") == "PT6.000S"
    streams: dict[tuple[int, int], list[int]] = {}
    for rep in root.iterfind("d:Period/d:AdaptationSet/d:Representation", ns):
        template = rep.find("d:SegmentTemplate", ns)
        assert template is not None
        number = int(template.get("startNumber", "1"))
        data = (tmp_path / str(template.get("initialization"))).read_bytes()
        for s in template.iterfind("d:SegmentTimeline/d:S", ns):
            for _ in range(int(s.get("r", "0")) + 1):
                data += (tmp_path / str(template.get("media")).replace("$Number$", str(number))).read_bytes()
                number += 1
        with av.open(io.BytesIO(data), format="mp4") as container:
            if container.streams.video:
                frames = list(container.decode(video=0))
                assert (frames[0].width, frames[0].height) == (int(str(rep.get("width"))), int(str(rep.get("height"))))
                streams[(frames[0].width, frames[0].height)] = [int(f.pts) for f in frames]  # type: ignore[arg-type]
            else:
                assert sum(f.samples for f in container.decode(audio=0)) >= 6 * 48000 - 2048
    check_rungs(streams)


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="Debian ffmpeg (with a DASH demuxer) not installed")
def test_ffprobe_reads_the_mpd(tmp_path: Path) -> None:
    ended_build(tmp_path)
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                          "stream=codec_type,width,height,nb_read_frames", "-of", "json", "index.mpd"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    streams = json.loads(out.stdout)["streams"]
    video = sorted((s["width"], s["height"], int(s["nb_read_frames"])) for s in streams if s["codec_type"] == "video")
    assert video == sorted((w, h, 180) for _, w, h in RUNGS)
    assert any(s["codec_type"] == "audio" and int(s["nb_read_frames"]) >= 280 for s in streams)


def test_dash_manifest_live_shape(tmp_path: Path) -> None:
    variants, audio = build(tmp_path, ll=False)
    mpd = dash_manifest(variants, audio, now=lambda: 1_800_000_010.0)
    root = ET.fromstring(mpd)
    ns = {"d": "urn:mpeg:dash:schema:mpd:2011"}
    assert root.get("type") == "dynamic"
    assert root.get("availabilityStartTime") == "2027-01-15T08:00:00.000Z"
    assert root.get("publishTime") == "2027-01-15T08:00:10.000Z"
    sets = root.findall("d:Period/d:AdaptationSet", ns)
    assert [s.get("contentType") for s in sets] == ["video", "audio"]
    reps = sets[0].findall("d:Representation", ns)
    assert [(r.get("id"), r.get("width"), r.get("height")) for r in reps] == [
        (n, str(w), str(h)) for n, w, h in RUNGS]
    for rep in reps:
        template = rep.find("d:SegmentTemplate", ns)
        assert template is not None and template.get("media") == f"{rep.get('id')}/seg$Number$.m4s"
        assert template.get("startNumber") == "0" and template.get("timescale") == "90000"
        s = template.findall("d:SegmentTimeline/d:S", ns)
        assert [(x.get("t"), x.get("d"), x.get("r")) for x in s] == [("0", "180000", "2")]


async def test_blocking_reload_waits_times_out_and_refuses() -> None:
    reload = BlockingReload()
    reload.published(0, 0)
    await reload.wait(0, 0, timeout=0.01)  # already there
    waiter = asyncio.get_running_loop().create_task(reload.wait(0, 2, timeout=2))
    await asyncio.sleep(0.01)
    reload.published(0, 1)
    await asyncio.sleep(0.01)
    assert not waiter.done()
    reload.published(0, 2)
    await asyncio.wait_for(waiter, 1)
    # A part index past the end of a completed segment: satisfied by the next segment's first part.
    reload.published(0, None)
    waiter = asyncio.get_running_loop().create_task(reload.wait(0, 5, timeout=2))
    await asyncio.sleep(0.01)
    assert waiter.done()  # segment 0 is complete: everything of it is available
    waiter = asyncio.get_running_loop().create_task(reload.wait(1, None, timeout=2))
    await asyncio.sleep(0.01)
    reload.published(1, 0)
    await asyncio.sleep(0.01)
    assert not waiter.done()
    reload.published(1, None)
    await asyncio.wait_for(waiter, 1)
    with pytest.raises(EgressError) as e:
        await reload.wait(2, 0, timeout=0.05)
    assert e.value.code == "timeout"
    with pytest.raises(EgressError) as e:
        await reload.wait(9, None, timeout=1)
    assert e.value.code == "bad_request"
    with pytest.raises(EgressError) as e:
        await reload.wait(1, 9, timeout=1)
    assert e.value.code == "bad_request"
    waiter = asyncio.get_running_loop().create_task(reload.wait(3, 0, timeout=5))
    await asyncio.sleep(0.01)
    reload.end()
    await asyncio.wait_for(waiter, 1)


async def test_rendition_serves_the_preload_hint_when_it_exists() -> None:
    track, samples = rung_samples(160, 90)
    rendition = Rendition("low", track, segment_duration=1.0, part_duration=0.2)
    fragmenter = Fragmenter(track, segment_duration=1.0, part_duration=0.2)
    events: list[Part | Segment] = []
    for s in samples[:40]:
        events += fragmenter.push(s)
    rendition.add(events)
    hint = check_media_playlist(rendition.playlist(), live=True, ll=True)["hint"]
    assert isinstance(hint, str) and rendition.get(hint) is None
    pending = asyncio.get_running_loop().create_task(rendition.get_blocking(hint, timeout=2))
    await asyncio.sleep(0.01)
    assert not pending.done()
    for s in samples[40:50]:
        rendition.add(fragmenter.push(s))
    data = await asyncio.wait_for(pending, 1)
    assert data is not None and data == rendition.get(hint)
    assert await rendition.get_blocking("seg0.0.m4s", timeout=0.1) == rendition.get("seg0.0.m4s")
    assert await rendition.get_blocking("nothing.m4s", timeout=0.1) is None
    with pytest.raises(EgressError):
        await rendition.get_blocking("seg99.m4s", timeout=0.1)


def test_query_names_and_headers() -> None:
    assert parse_blocking_query({}) == (None, None)
    assert parse_blocking_query({"_HLS_msn": "12", "_HLS_part": "3"}) == (12, 3)
    for bad in ({"_HLS_part": "1"}, {"_HLS_msn": "-1"}, {"_HLS_msn": "x"}, {"_HLS_msn": "1", "_HLS_part": "1.5"}):
        with pytest.raises(EgressError) as e:
            parse_blocking_query(bad)
        assert e.value.code == "bad_request"
    assert parse_media_name("seg12.m4s") == (12, None) and parse_media_name("seg12.3.m4s") == (12, 3)
    assert parse_media_name("../seg1.m4s") is None and parse_media_name("seg1.m4s.tmp") is None
    assert "immutable" in cache_control("seg1.m4s") and "max-age=1" in cache_control("index.m3u8")
    with pytest.raises(EgressError):
        Rendition("../x", Track.opus())
