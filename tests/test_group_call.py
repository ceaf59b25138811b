"""Group calls between real aiortc peers through a real Chorus process."""

from __future__ import annotations

import asyncio

from calls import Received
from conftest import ServerProcess, connect
from media import ColorTrack, SineTrack, collect_audio, count_frames, dominant_frequency

from chorus.signaling.client import ChorusClient


async def test_three_peers_see_and_hear_each_other(server: ServerProcess, clients: list[ChorusClient],
                                                    room_name: str) -> None:
    tones = [440.0, 660.0, 880.0]
    peers = []
    for i, tone in enumerate(tones):
        client = await connect(server, clients)
        received = Received(client)
        await client.join(room_name, f"p{i}")
        await client.publish(SineTrack(tone), ColorTrack())
        peers.append((client, received))

    for _, received in peers:
        await received.wait(4)  # audio + video from each of the two others

    # Every remote video decodes at least 20 frames within 10 s.
    counts = await asyncio.gather(*[
        count_frames(track, 10.0)
        for _, received in peers
        for (peer_id, kind), track in received.tracks.items()
        if kind == "video"
    ])
    assert len(counts) == 6
    assert min(counts) >= 20, counts

    # p0's 440 Hz tone arrives at p1 with its frequency intact (FFT peak within 2 %).
    p0_id = peers[0][0].peer_id
    assert p0_id is not None
    samples, rate = await collect_audio(peers[1][1].tracks[(p0_id, "audio")], seconds=1.0)
    peak = dominant_frequency(samples, rate)
    assert abs(peak - 440.0) / 440.0 < 0.02, peak
