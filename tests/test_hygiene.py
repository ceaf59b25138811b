"""Connection hygiene: per-address and total caps (HTTP 429 before the upgrade), the join timeout, trusted
proxies' X-Forwarded-For, and the media port range."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import statistics
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ServerProcess, connect
from media import EncodedVideoTrack, SineTrack, encode_vp8_clip

from chorus.signaling.client import ChorusClient

FLOOD = 5000
PER_ADDRESS = 100  # the default max_connections_per_ip


class RawSocket:
    """A websocket opened by hand (no client library: 5000 of them must stay cheap): status of the upgrade,
    then, if admitted, the server's close frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, took: float) -> None:
        self.reader, self.writer, self.status, self.took = reader, writer, status, took
        self.opened = time.monotonic()

    @classmethod
    async def open(cls, host: str, port: int, local: str, headers: dict[str, str] | None = None) -> RawSocket:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(host, port, local_addr=(local, 0))
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n".encode())
        status = int((await reader.readline()).split()[1])
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        return cls(reader, writer, status, time.monotonic() - started)

    async def wait_close(self) -> tuple[int, str, float]:
        """Wait for the server's close frame: (code, reason, seconds after the upgrade). Answers it."""
        while True:
            head = await self.reader.readexactly(2)
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            payload = await self.reader.readexactly(length)
            if head[0] & 0x0F == 0x8:
                self.writer.write(b"\x88\x80" + os.urandom(4))  # our (masked, empty) close
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                return code, payload[2:].decode(), time.monotonic() - self.opened

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture
def many_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, FLOOD * 2 + 1000)), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < FLOOD + 500:
        pytest.skip("cannot raise the open-file limit enough for the flood")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def rss(server: ServerProcess) -> int:
    return int(json.loads(server.get("/api/debug/process", timeout=30)[1])["rss_bytes"])


@pytest.mark.timeout(90)
async def test_idle_websocket_flood(tmp_path: Path, many_files: None, clients: list[ChorusClient]) -> None:
    """5000 websockets from one address that never join: those past the per-address cap get 429 at once,
    the admitted ones are closed after join_timeout (10 s by default); someone else joins throughout."""
    server = ServerProcess(tmp_path)
    try:
        # Warm up (imports, first room), then the baseline.
        warm = await connect(server, clients, local_address="127.0.0.2")
        await warm.join("warm-up", "w")
        await warm.leave()
        await asyncio.sleep(0.5)
        before = rss(server)

        # Someone in a call from another address, who must not notice anything.
        legit = ChorusClient(server.ws_url, local_address="127.0.0.2")
        clients.append(legit)
        await legit.connect()
        await legit.join("legit", "alice")
        ping_times: list[float] = []
        joins: list[float] = []
        stop = asyncio.Event()

        async def legitimate_traffic() -> None:
            n = 0
            while not stop.is_set():
                started = time.monotonic()
                await legit.request("ping", timeout=5)
                ping_times.append(time.monotonic() - started)
                if n % 5 == 0:  # and a fresh join now and then
                    started = time.monotonic()
                    newcomer = ChorusClient(server.ws_url, local_address="127.0.0.2")
                    await newcomer.connect()
                    await newcomer.join("legit", f"bob{n}")
                    joins.append(time.monotonic() - started)
                    await newcomer.close()
                n += 1
                await asyncio.sleep(0.2)

        traffic = asyncio.get_running_loop().create_task(legitimate_traffic())  # noqa: TID251 — awaited below
        started = time.monotonic()
        semaphore = asyncio.Semaphore(64)  # a client opening many at once, without queueing them all in the kernel

        async def one() -> RawSocket:
            async with semaphore:
                return await RawSocket.open("127.0.0.1", server.port, "127.0.0.1")

        sockets = await asyncio.gather(*[one() for _ in range(FLOOD)])
        flood_took = time.monotonic() - started
        admitted = [s for s in sockets if s.status == 101]
        refused = [s for s in sockets if s.status == 429]
        await asyncio.gather(*[s.close() for s in refused])
        refusal = sorted(s.took for s in refused)
        closes = await asyncio.wait_for(asyncio.gather(*[s.wait_close() for s in admitted]), 30)
        await asyncio.gather(*[s.close() for s in admitted])
        stop.set()
        await traffic
        await asyncio.sleep(1.0)
        open_after = json.loads(server.get("/api/debug/process")[1])["fds"]
        after = rss(server)
        metrics = server.get("/metrics")[1].decode()
        print(f"{FLOOD} upgrades from one address in {flood_took:.1f} s: {len(admitted)} admitted, {len(refused)} "
              f"refused with 429 (median {statistics.median(refusal) * 1000:.0f} ms, slowest "
              f"{refusal[-1] * 1000:.0f} ms); admitted ones closed after "
              f"{min(c[2] for c in closes):.1f}-{max(c[2] for c in closes):.1f} s; the other address: "
              f"{len(ping_times)} pings (slowest {max(ping_times) * 1000:.0f} ms), {len(joins)} joins (slowest "
              f"{max(joins) * 1000:.0f} ms); RSS {before / 1e6:.1f} -> {after / 1e6:.1f} MB; fds after {open_after}")
        # Never more than the cap open at once (slots freed by the join timeout are taken again while the
        # flood goes on), every other upgrade refused.
        spans = [(s.opened, s.opened + took) for s, (_, _, took) in zip(admitted, closes, strict=True)]
        most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
        assert most == PER_ADDRESS and len(admitted) + len(refused) == FLOOD
        assert refusal[int(len(refusal) * 0.99)] < 2.0  # at once, even while thousands queue up
        assert {(code, reason) for code, reason, _ in closes} == {(4008, "join timeout")}
        assert all(9.5 <= took <= 20.0 for _, _, took in closes), [c[2] for c in closes]
        assert max(ping_times) < 2.0 and len(joins) >= 3 and max(joins) < 3.0
        assert after <= before * 1.10, (before, after)
        assert re.search(rf'chorus_connections_refused_total{{reason="per_address"}} {len(refused)}\.0', metrics)
        timeouts = re.search(r"chorus_join_timeouts_total (\d+)", metrics)
        assert timeouts and int(timeouts.group(1)) >= len(admitted)  # (the warm-up client idles out too)
    finally:
        server.stop()


async def test_trusted_proxies_and_total_cap(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, env={"CHORUS_MAX_CONNECTIONS": "6", "CHORUS_MAX_CONNECTIONS_PER_IP": "2",
                                          "CHORUS_TRUSTED_PROXIES": '["127.0.0.1"]'})
    try:
        opened: list[RawSocket] = []

        async def status(local: str, forwarded: str | None = None) -> int:
            sock = await RawSocket.open("127.0.0.1", server.port, local,
                                        {"X-Forwarded-For": forwarded} if forwarded else None)
            opened.append(sock)
            return sock.status

        # Behind the trusted proxy (127.0.0.1), each forwarded client has its own allowance.
        assert [await status("127.0.0.1", "198.51.100.1") for _ in range(3)] == [101, 101, 429]
        # The client cannot choose its address: only the last hop (added by the proxy) counts.
        assert await status("127.0.0.1", "198.51.100.1, 198.51.100.2") == 101
        # From an untrusted peer the header means nothing: 127.0.0.3 is 127.0.0.3.
        assert [await status("127.0.0.3", f"203.0.113.{i}") for i in range(3)] == [101, 101, 429]
        # Six open: the total cap refuses a seventh, from anyone.
        assert await status("127.0.0.4") == 101
        assert await status("127.0.0.5") == 429
        await asyncio.gather(*[sock.close() for sock in opened])
        opened.clear()
        await asyncio.sleep(0.5)
        assert await status("127.0.0.5") == 101
        await asyncio.gather(*[sock.close() for sock in opened])
        log = server.log()
        assert "remote=198.51.100.1" in log and "remote=198.51.100.2" in log
        assert "remote=203.0.113" not in log
    finally:
        server.stop()


async def test_media_port_range(tmp_path: Path) -> None:
    low = 47100 + 200 * (os.getpid() % 20)  # a block of its own, so parallel runs do not share it
    high = low + 199
    server = ServerProcess(tmp_path, env={"CHORUS_RTC_MIN_PORT": str(low), "CHORUS_RTC_MAX_PORT": str(high)})
    made: list[ChorusClient] = []
    try:
        clip = encode_vp8_clip(frames=30)
        for name in ("a", "b", "c"):
            client = await connect(server, made)
            await client.join("ports", name)
            await client.publish(SineTrack(440), EncodedVideoTrack(clip))
        deadline = time.monotonic() + 30
        while not all(any(m == "offer" for m, _ in c.events) for c in made):
            assert time.monotonic() < deadline, "no subscribe offer"
            await asyncio.sleep(0.1)
        sdps = [c.publish_pc.remoteDescription.sdp for c in made]  # type: ignore[union-attr]
        sdps += [data["sdp"] for c in made for method, data in c.events if method == "offer"]
        ports = {int(m.group(1)) for sdp in sdps for m in re.finditer(r"a=candidate:\S+ \d+ udp \d+ \S+ (\d+)", sdp)}
        print(f"server candidate ports: {sorted(ports)}")
        assert ports and all(low <= p <= high for p in ports), ports
    finally:
        for client in made:
            await client.close()
        server.stop()
    log = server.log()
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000):][:6000]
