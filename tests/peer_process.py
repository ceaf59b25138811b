"""A participant in its own process (so a test can SIGKILL it): joins, publishes, prints 'ready'."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from media import ColorTrack, SineTrack  # noqa: E402

from sfu import aiortc_adapter  # noqa: E402
from signaling.client import ChorusClient  # noqa: E402


async def main(url: str, room: str, name: str) -> None:
    aiortc_adapter.set_host_addresses(["127.0.0.1"])
    client = ChorusClient(url)
    await client.connect()
    joined = await client.join(room, name)
    await client.publish(SineTrack(440), ColorTrack())
    print("ready", joined["peer_id"], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
