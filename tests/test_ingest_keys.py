"""ingest/keys.py: the stream-key map that libsrt's thread and the event loop share."""

from __future__ import annotations

import threading

from chorus.ingest.keys import StreamKeys


async def test_check_add_revoke_replace() -> None:
    keys = StreamKeys({"k1": "ingress-1"})
    assert keys.check("k1") == "ingress-1" and keys.check("k2") is None and keys.check("") is None
    keys.add("k2", {"id": 2})
    assert keys.check("k2") == {"id": 2}
    assert keys.revoke("k1") and not keys.revoke("k1")
    assert keys.check("k1") is None
    keys.replace({"k3": 3})
    assert keys.check("k2") is None and keys.check("k3") == 3 and len(keys) == 1
    assert await keys.authorize_rtmp("live", "k3?token=x", ("127.0.0.1", 1)) == 3


def test_readers_in_threads_never_block_or_see_torn_state() -> None:
    keys = StreamKeys({"stable": "yes"})
    stop = threading.Event()
    seen: list[object] = []

    def reader() -> None:
        while not stop.is_set():
            if keys.check("stable") != "yes":
                seen.append("torn")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(3000):
        keys.add(f"k{i}", i)
        if i % 3 == 0:
            keys.revoke(f"k{i - 1}")
    stop.set()
    for t in threads:
        t.join()
    assert not seen and keys.check("k2999") == 2999
