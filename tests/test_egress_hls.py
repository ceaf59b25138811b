"""
HLS and DASH egress of a room on a real server, read by FFmpeg (through PyAV, and Debian's ffprobe): the ladder,
aligned segment boundaries, H.264 passed through, HTTP headers a CDN and a player need, metrics.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET

import av
import pytest
from conftest import ServerProcess, connect
from egress_live import BeepTrack, ClockTrack, api, http, wait_for

from chorus.signaling.client import ChorusClient

NS = {"d": "urn:mpeg:dash:schema:mpd:2011"}
SIZES = {(640, 480), (480, 360), (240, 180)}  # the 640x480 source and the default 360p and 180p rungs


async def get(url: str) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(http, url)


def first_frame_pts(data: bytes) -> int:
    with av.open(io.BytesIO(data), format="mp4") as container:
        return int(next(p for p in container.demux(video=0) if p.size).pts)


@pytest.mark.timeout(120)
async def test_ladder_read_by_ffmpeg_through_hls_and_dash(server: ServerProcess, clients: list[ChorusClient],
                                                          room_name: str) -> None:
    base = server.http_url
    identity = f"pub-{room_name}"[:60]
    # Started before anyone is in the room: it waits, and the publisher who comes is answered with H.264 first.
    status, egress = await api(base, "POST", "/api/egress", {"room": room_name, "kind": "hls",
                                                             "participant": identity})
    assert status == 201 and egress["state"] == "waiting", egress
    publisher = await connect(server, clients)
    await publisher.join(room_name, "pub", identity=identity)
    t0 = time.time() + 0.2
    await publisher.publish(BeepTrack(t0), ClockTrack(t0, 640, 480))  # no codec preference of its own

    async def segments() -> int:
        _, described = await api(base, "GET", f"/api/egress/{egress['id']}")
        counts = [r["segments"] for r in described["renditions"] if r["kind"] == "video"]
        return min(counts) if len(counts) == 3 else 0

    async def enough() -> bool:
        return await segments() >= 4  # after the stop, the window holds them all: >= 5 s per rung

    await wait_for(enough, 40, interval=0.5)

    # Live: headers a player and a CDN rely on.
    status, headers, master = await get(f"{base}/hls/{room_name}/index.m3u8")
    assert status == 200 and headers["Content-Type"] == "application/vnd.apple.mpegurl"
    assert headers["Access-Control-Allow-Origin"] == "*" and headers["Cache-Control"] == "public, max-age=1"
    variants = re.findall(r"RESOLUTION=(\d+)x(\d+)", master.decode())
    assert {(int(w), int(h)) for w, h in variants} == SIZES
    status, headers, media = await get(f"{base}/hls/{room_name}/360p/index.m3u8")
    assert status == 200 and "#EXT-X-ENDLIST" not in media.decode()
    newest = re.findall(r"seg(\d+)\.m4s", media.decode())[-1]
    status, headers, _ = await get(f"{base}/hls/{room_name}/360p/seg{newest}.m4s")
    assert status == 200 and headers["Content-Type"] == "video/iso.segment"
    assert headers["Cache-Control"] == "public, max-age=86400, immutable"
    status, headers, _ = await get(f"{base}/hls/{room_name}/360p/seg{int(newest) + 50}.m4s")
    assert status == 404 and headers["Cache-Control"] == "no-store"
    status, headers, mpd = await get(f"{base}/dash/{room_name}/index.mpd")
    assert status == 200 and headers["Content-Type"] == "application/dash+xml" and b'type="dynamic"' in mpd

    _, described = await api(base, "GET", f"/api/egress/{egress['id']}")
    assert described["state"] == "active" and described["mode"] == "passthrough"
    # The top rung is the publisher's own H.264: the worker decodes it for the lower rungs, encodes no top rung.
    assert "source" not in described["worker"]["cpu_percent"] and "360p" in described["worker"]["cpu_percent"]
    _, _, metrics = await get(f"{base}/metrics")
    assert re.search(rb'chorus_egresses\{kind="hls",state="active"\} [1-9]', metrics)
    assert re.search(rb"chorus_egress_bytes_total [1-9]", metrics)

    # Stopped: the playlists end (EXT-X-ENDLIST), the MPD turns static; files stay served.
    status, stopped = await api(base, "DELETE", f"/api/egress/{egress['id']}")
    assert status == 200 and stopped["state"] == "ended" and stopped["reason"] == "stopped"
    _, _, media = await get(f"{base}/hls/{room_name}/360p/index.m3u8")
    assert media.decode().rstrip().endswith("#EXT-X-ENDLIST")

    # FFmpeg reads the master playlist: three video rungs at the configured sizes, each decodes >= 5 s.
    frames: dict[tuple[int, int], int] = {}
    audio = 0
    with av.open(f"{base}/hls/{room_name}/index.m3u8") as container:
        for packet in container.demux():
            if packet.stream.type == "video" and packet.size:
                for frame in packet.decode():
                    frames[(frame.width, frame.height)] = frames.get((frame.width, frame.height), 0) + 1
            elif packet.stream.type == "audio" and packet.size:
                audio += len(packet.decode())
    assert set(frames) == SIZES and min(frames.values()) >= 150, frames
    assert audio >= 5 * 48000 // 1024, audio

    # The DASH manifest of the same files: resolve it, decode each representation, compare the boundaries.
    _, _, mpd = await get(f"{base}/dash/{room_name}/index.mpd")
    root = ET.fromstring(mpd)
    assert root.get("type") == "static"
    base_url = root.findtext("d:BaseURL", namespaces=NS)
    assert base_url == f"/hls/{room_name}/{egress['id']}/"
    timelines: dict[str, list[tuple[int, int]]] = {}
    firsts: dict[str, list[int]] = {}
    for rep in root.iterfind("d:Period/d:AdaptationSet[@contentType='video']/d:Representation", NS):
        template = rep.find("d:SegmentTemplate", NS)
        assert template is not None
        number = int(template.get("startNumber", "0"))
        starts: list[tuple[int, int]] = []
        for s in template.iterfind("d:SegmentTimeline/d:S", NS):
            t = int(s.get("t", "0"))
            for k in range(int(s.get("r", "0")) + 1):
                starts.append((number, t + k * int(s.get("d", "0"))))
                number += 1
        rid = str(rep.get("id"))
        timelines[rid] = starts
        _, _, init = await get(f"{base}{base_url}{template.get('initialization')}")
        data = init
        firsts[rid] = []
        for n, _ in starts:
            _, _, segment = await get(f"{base}{base_url}{str(template.get('media')).replace('$Number$', str(n))}")
            firsts[rid].append(first_frame_pts(init + segment))
            data += segment
        with av.open(io.BytesIO(data), format="mp4") as container:
            decoded = [f for f in container.decode(video=0)]
        assert (decoded[0].width, decoded[0].height) == (int(str(rep.get("width"))), int(str(rep.get("height"))))
        assert len(decoded) >= 150, (rid, len(decoded))
    assert len(timelines) == 3
    reference = timelines["source"]
    assert all(t == reference for t in timelines.values()), timelines
    # ...and each segment of every rung really starts with the same picture time.
    assert all(f == [t for _, t in reference] for f in firsts.values()), firsts

    if shutil.which("ffprobe"):  # Debian's FFmpeg has a DASH demuxer (PyAV's is built without libxml2)
        out = await asyncio.to_thread(subprocess.run, [
            "ffprobe", "-v", "error", "-show_entries", "stream=codec_type,width,height", "-of", "json",
            f"{base}/dash/{room_name}/index.mpd"], capture_output=True, text=True, timeout=60)
        streams = json.loads(out.stdout)["streams"]
        assert {(s["width"], s["height"]) for s in streams if s["codec_type"] == "video"} == SIZES
        assert any(s["codec_type"] == "audio" for s in streams)
