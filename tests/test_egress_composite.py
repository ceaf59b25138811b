"""
The room composite of an SFU room: two publishers laid out in the MCU's grid with their voices mixed, as HLS
with a ladder and as one MP4 recording; their forwarding to each other goes on untouched.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import av
import numpy as np
import pytest
from calls import Received
from conftest import ServerProcess, connect
from egress_live import api, http, wait_for
from media import EncodedVideoTrack, SineTrack, count_frames, dominant_frequency, encode_vp8_clip

from chorus.signaling.client import ChorusClient


def peaks(samples: np.ndarray, rate: int) -> set[int]:
    """Frequencies (Hz, rounded to 10) of the two strongest spectral peaks."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    freqs = np.fft.rfftfreq(len(samples), 1 / rate)
    strongest = freqs[np.argsort(spectrum)[::-1]]
    out: list[float] = []
    for f in strongest:
        if all(abs(f - g) > 50 for g in out):
            out.append(float(f))
        if len(out) == 2:
            break
    return {round(f, -1) for f in out}


@pytest.mark.timeout(120)
async def test_room_composite_as_hls_and_as_a_recording(tmp_path: Path, room_name: str) -> None:
    server = ServerProcess(tmp_path, env={
        "CHORUS_RECORDINGS_DIR": str(tmp_path / "rec"), "CHORUS_EGRESS_LADDER": '["180:150"]',
        "CHORUS_EGRESS_OUTPUT_DIR": str(tmp_path / "www"),
        "CHORUS_EGRESS_COMPOSITE_WIDTH": "640", "CHORUS_EGRESS_COMPOSITE_HEIGHT": "360",
        "CHORUS_EGRESS_COMPOSITE_FPS": "15", "CHORUS_EGRESS_TOP_KBPS": "600"})
    clients: list[ChorusClient] = []
    try:
        base = server.http_url
        hls_status, hls = await api(base, "POST", "/api/egress", {"room": room_name, "kind": "hls", "public": True})
        rec_status, rec = await api(base, "POST", "/api/egress", {"room": room_name, "kind": "record",
                                                                  "composite": True})
        assert hls_status == 201 and rec_status == 201 and hls["composite"], (hls, rec)
        # A third one is left running: the server's shutdown must end it properly.
        _, running = await api(base, "POST", "/api/egress", {"room": room_name, "kind": "hls", "participant": "bob",
                                                             "ladder": []})
        clip = encode_vp8_clip(frames=60)
        watchers = []
        for name, tone in (("alice", 440), ("bob", 660)):
            client = await connect(server, clients)
            received = Received(client)
            await client.join(room_name, name, identity=name)
            await client.publish(SineTrack(tone), EncodedVideoTrack(clip), video_codec="video/VP8")
            watchers.append((client, received))

        async def segments() -> bool:
            status, _, _ = await asyncio.to_thread(http, f"{base}/hls/{room_name}/{hls['id']}/index.m3u8")
            return status == 200

        await wait_for(segments, 40, interval=0.5)
        # The publishers still see each other, decoded, while the composite runs.
        alice, bob = watchers
        await bob[1].wait(2)
        video = bob[1].tracks[(alice[0].peer_id, "video")]  # type: ignore[index]
        await count_frames(video, 0.5)
        assert await count_frames(video, 2.0) >= 30
        await asyncio.sleep(4.0)
        _, stopped_hls = await api(base, "DELETE", f"/api/egress/{hls['id']}")
        _, stopped_rec = await api(base, "DELETE", f"/api/egress/{rec['id']}")
        assert stopped_hls["error"] is None and stopped_rec["error"] is None, (stopped_hls, stopped_rec)

        # HLS: the composite at its size and the 180p rung, both decodable; the mix in the audio.
        sizes: dict[tuple[int, int], int] = {}
        pcm: list[np.ndarray] = []
        with av.open(f"{base}/hls/{room_name}/{hls['id']}/index.m3u8") as container:
            for packet in container.demux():
                for frame in packet.decode() if packet.size else []:
                    if packet.stream.type == "video":
                        sizes[(frame.width, frame.height)] = sizes.get((frame.width, frame.height), 0) + 1
                    else:
                        pcm.append(frame.to_ndarray()[0])
        assert set(sizes) == {(640, 360), (320, 180)} and min(sizes.values()) >= 5 * 15, sizes
        audio = np.concatenate(pcm)
        assert peaks(audio[-48000 * 2:], 48000) == {440, 660}, peaks(audio[-48000 * 2:], 48000)

        # The recording: one MP4, H.264 + AAC, two tiles side by side, both voices.
        [url] = stopped_rec["recordings"]
        assert url.endswith("/composite.mp4")
        status, _, data = await asyncio.to_thread(http, base + url)
        assert status == 200
        with av.open(io.BytesIO(data)) as container:
            assert container.streams.video[0].codec_context.name == "h264"
            assert container.streams.audio[0].codec_context.name == "aac"
            frames = list(container.decode(video=0))
        with av.open(io.BytesIO(data)) as container:
            sound = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
        assert len(frames) >= 5 * 15 and (frames[0].width, frames[0].height) == (640, 360)
        picture = frames[-1].to_ndarray(format="gray")
        left, right = picture[:, :320], picture[:, 320:]
        assert left.mean() > 40 and right.mean() > 40, (left.mean(), right.mean())  # a tile each, not black
        assert peaks(sound[-48000 * 2:], 48000) == {440, 660}
        assert dominant_frequency(sound[-4800:], 48000) in range(400, 700)
    finally:
        for client in clients:
            await client.close()
        server.stop()  # SIGTERM: a graceful shutdown
    assert "Traceback" not in server.log()
    # Shutdown ended the running egress: its files, written for a web server, are a finished stream.
    folder = tmp_path / "www" / room_name / running["id"]
    assert (folder / "source" / "index.m3u8").read_text().rstrip().endswith("#EXT-X-ENDLIST")
    assert 'type="static"' in (folder / "index.mpd").read_text()
    assert "#EXT-X-STREAM-INF" in (folder / "index.m3u8").read_text()

