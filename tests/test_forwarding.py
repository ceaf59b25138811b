"""What the SFU does to media: nothing to the payload, a quick keyframe for late joiners, mute."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import aiortc.rtcrtpreceiver
import pytest
from aiortc import MediaStreamTrack
from calls import Received
from conftest import ServerProcess, connect
from media import ColorTrack, EncodedVideoTrack, SineTrack, count_frames, encode_vp8_clip

from chorus.sfu import aiortc_adapter
from chorus.sfu.tasks import Tasks
from chorus.signaling.client import ChorusClient


@pytest.fixture
def recorded_frames(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every encoded frame that aiortc receivers in *this* (client) process assemble from RTP."""
    frames: list[bytes] = []
    original = aiortc.rtcrtpreceiver.decoder_worker

    def worker(loop: Any, input_q: Any, output_q: Any, *args: Any) -> None:
        def tapped() -> Any:
            task = input_q.get()
            if task is not None and task[0].mimeType.lower() == "video/vp8":
                frames.append(bytes(task[1].data))
            return task

        class Tap:
            get = staticmethod(tapped)

            def put(self, item: Any) -> None:
                input_q.put(item)

        original(loop, Tap(), output_q, *args)

    monkeypatch.setattr(aiortc.rtcrtpreceiver, "decoder_worker", worker)
    return frames


async def test_payload_bytes_arrive_unchanged(server: ServerProcess, clients: list[ChorusClient], room_name: str,
                                              recorded_frames: list[bytes]) -> None:
    """The SFU forwards the publisher's VP8 bitstream byte for byte: it neither decodes nor re-encodes."""
    clip = encode_vp8_clip(frames=60)
    publisher = await connect(server, clients)
    await publisher.join(room_name, "pub")
    track = EncodedVideoTrack(clip)
    await publisher.publish(track)

    subscriber = await connect(server, clients)
    received = Received(subscriber)
    await subscriber.join(room_name, "sub")
    await received.wait(1)
    decoded = await count_frames(next(iter(received.tracks.values())), 3.0)

    assert decoded >= 20
    sent = {hashlib.sha256(f).digest() for f in clip}
    got = [hashlib.sha256(f).digest() for f in recorded_frames]
    assert len(got) >= 20
    # Every frame the subscriber assembled is one of the publisher's encoded frames, bit-exact.
    assert all(g in sent for g in got), f"{sum(g not in sent for g in got)} of {len(got)} frames were altered"


async def test_h264_is_forwarded(server: ServerProcess, clients: list[ChorusClient], room_name: str) -> None:
    publisher = await connect(server, clients)
    await publisher.join(room_name, "pub")
    await publisher.publish(ColorTrack(), video_codec="video/H264")

    subscriber = await connect(server, clients)
    received = Received(subscriber)
    await subscriber.join(room_name, "sub")
    await received.wait(1)
    assert subscriber.subscribe_pc is not None
    codecs = [t.receiver.track and aiortc_adapter.transceiver_codecs(t)[0].mimeType
              for t in subscriber.subscribe_pc.getTransceivers()]
    assert codecs == ["video/H264"]
    assert await count_frames(received.tracks[(publisher.peer_id, "video")], 5.0) >= 20  # type: ignore[index]


async def test_late_joiner_gets_a_keyframe_quickly(server: ServerProcess, clients: list[ChorusClient],
                                                   room_name: str) -> None:
    """A subscriber joining mid-stream decodes its first frame within 1 s of its connection being up,
    although the publisher's own keyframe interval is much longer (aiortc: ~every 3000 frames)."""
    publisher = await connect(server, clients)
    await publisher.join(room_name, "pub")
    await publisher.publish(ColorTrack())
    await asyncio.sleep(2.0)  # the stream is well past its first keyframe

    late = await connect(server, clients)
    first_frame: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    connected_at: list[float] = []
    readers = Tasks("first frame")

    def on_track(track: MediaStreamTrack, info: dict[str, Any]) -> None:
        async def first() -> None:
            await track.recv()
            first_frame.set_result(time.monotonic())

        readers.spawn(first())
        assert late.subscribe_pc is not None
        pc = late.subscribe_pc

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected" and not connected_at:
                connected_at.append(time.monotonic())

    late.on_track(on_track)
    await late.join(room_name, "late")
    frame_at = await asyncio.wait_for(first_frame, 5.0)
    await readers.close()
    assert connected_at, "subscribe connection never reported connected"
    latency = frame_at - connected_at[0]
    print(f"first decoded frame {latency * 1000:.0f} ms after the subscribe connection connected")
    assert latency <= 1.0


async def test_mute_pauses_forwarding_and_notifies(server: ServerProcess, clients: list[ChorusClient],
                                                   room_name: str) -> None:
    publisher = await connect(server, clients)
    await publisher.join(room_name, "pub")
    tracks = await publisher.publish(SineTrack(440), ColorTrack())
    video_id = next(t["id"] for t in tracks if t["kind"] == "video")

    subscriber = await connect(server, clients)
    received = Received(subscriber)
    await subscriber.join(room_name, "sub")
    await received.wait(2)
    video = received.tracks[(publisher.peer_id, "video")]  # type: ignore[index]
    assert await count_frames(video, 1.0) > 10

    muted = subscriber.expect_event("track_muted")
    await publisher.set_muted(video_id, True)
    event = await muted
    assert event == {"peer_id": publisher.peer_id, "track_id": video_id, "muted": True}
    await count_frames(video, 0.3)  # drain what was in flight
    assert await count_frames(video, 1.0) == 0

    unmuted = subscriber.expect_event("track_muted", lambda d: d["muted"] is False)
    await publisher.set_muted(video_id, False)
    await unmuted
    assert await count_frames(video, 2.0) > 20
