"""A participant in its own process (so a test can SIGKILL it): joins, publishes, prints 'ready'."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from media import ColorTrack, SineTrack  # noqa: E402

from chorus.sfu import aiortc_adapter  # noqa: E402
from chorus.sfu.tasks import Tasks  # noqa: E402
from chorus.signaling.client import ChorusClient  # noqa: E402


async def main(url: str, room: str, name: str, mode: str = "publish") -> None:
    """``mode``: "publish" (audio + video), or "subscribe" (receive and decode everyone, publish nothing)."""
    aiortc_adapter.set_host_addresses(["127.0.0.1"])
    client = ChorusClient(url)
    await client.connect()
    receiving = asyncio.Event()
    readers = Tasks("peer process readers")

    def on_track(track: object, info: object) -> None:
        async def drain() -> None:
            while True:
                await track.recv()  # type: ignore[attr-defined]
                receiving.set()

        readers.spawn(drain())

    client.on_track(on_track)
    joined = await client.join(room, name)
    if mode == "publish":
        await client.publish(SineTrack(440), ColorTrack())
    else:
        await asyncio.wait_for(receiving.wait(), 15)
    print("ready", joined["peer_id"], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
