"""Helpers for tests that set up calls: what a client received, and a two-person call with live video."""

from __future__ import annotations

import asyncio
from typing import Any

from aiortc import MediaStreamTrack
from conftest import ServerProcess, connect
from media import EncodedVideoTrack, SineTrack, count_frames, encode_vp8_clip

from chorus.signaling.client import ChorusClient


class Received:
    """Remote tracks a client got, by (peer_id, kind)."""

    def __init__(self, client: ChorusClient) -> None:
        self.tracks: dict[tuple[str, str], MediaStreamTrack] = {}
        self.arrived = asyncio.Event()
        client.on_track(self._on_track)

    def _on_track(self, track: MediaStreamTrack, info: dict[str, Any]) -> None:
        self.tracks[(info["peer_id"], track.kind)] = track
        self.arrived.set()

    async def wait(self, count: int, timeout: float = 10.0) -> None:
        async def enough() -> None:
            while len(self.tracks) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), timeout)


async def two_person_call(server: ServerProcess, clients: list[ChorusClient], room: str
                          ) -> tuple[ChorusClient, ChorusClient, MediaStreamTrack]:
    """A publisher (Opus + pre-encoded VP8, no encoding cost) and a watcher decoding its video, past the
    start-up. Returns (publisher, watcher, the watcher's video track)."""
    publisher = await connect(server, clients)
    await publisher.join(room, "pub")
    await publisher.publish(SineTrack(440), EncodedVideoTrack(encode_vp8_clip(frames=60)))
    watcher = await connect(server, clients)
    received = Received(watcher)
    await watcher.join(room, "watcher")
    await received.wait(2)
    video = received.tracks[(publisher.peer_id, "video")]  # type: ignore[index]
    await count_frames(video, 1.0)
    return publisher, watcher, video
