"""The NACK packet cache keeps the last packets in fixed memory."""

from __future__ import annotations

from chorus.sfu.packetcache import PacketCache


def test_keeps_the_last_packets_by_sequence_number() -> None:
    cache = PacketCache(4, slot_bytes=8)
    assert cache.get(1) is None
    for seq in range(65533, 65536):
        cache.put(seq, bytes([seq % 256]) * (seq % 5 + 1), mark=seq % 3)
    cache.put(0, b"zero", -1)  # wrapped
    assert cache.get(65535) == (bytes([255]) * 1, 65535 % 3)
    assert cache.get(0) == (b"zero", -1)
    cache.put(4, b"four")  # takes slot 0 from packet 0
    assert cache.get(0) is None and cache.get(4) == (b"four", -1)
    cache.put(5, b"x" * 9)  # longer than a slot: not kept, and the slot's old packet is gone too
    assert cache.get(5) is None and cache.get(65533) is None
    cache.clear()
    assert cache.get(4) is None


def test_buffer_is_allocated_once() -> None:
    cache = PacketCache(1024)
    assert cache.get(0) is None
    cache.put(0, b"a" * 1200)
    buffer = cache._buffer  # noqa: SLF001 — white-box: the same buffer, whatever goes through
    for seq in range(1, 5000):
        cache.put(seq, bytes(seq % 1300 + 1))
    assert cache._buffer is buffer and len(buffer) == 1024 * 1500  # type: ignore[arg-type]  # noqa: SLF001
    assert cache.get(4999) == (bytes(4999 % 1300 + 1), -1)
