"""
Fuzz targets for the entry points that take untrusted input: SDP (publish offers, subscribe answers),
signaling messages, and UDP datagrams reaching ICE. Each target states the one property that must hold:
only Chorus's typed errors come out, never another exception.

Used by ``tests/test_fuzz.py`` (a short run in ``make test``) and ``tests/fuzz.py`` (``make fuzz``: five
minutes per target; a failing input is saved to ``tests/fuzz_corpus/`` and replayed by the tests forever).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from chorus.sfu import ChorusError, Router
from chorus.sfu.logs import PeerLogger
from chorus.sfu.sdp import parse_sdp
from chorus.signaling.protocol import ProtocolError, parse_request

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
BASE_SDP = (CORPUS / "base-offer.sdp").read_text()
BASE_LINES = BASE_SDP.splitlines()

TOKENS = ["", "x", "0", "-1", "99999999999999999999", ":", "/", "=", "a=", " ", "\x00", "é", "96", "VP8/90000",
          "opus/48000/2", "H264/90000", "rtx/90000", "actpass", "active", "UDP/TLS/RTP/SAVPF", "candidate:1 1 udp"]


@st.composite
def mutated_sdp(draw: st.DrawFn) -> str:
    """A real aiortc offer with a few lines deleted, cut, duplicated or with a field replaced."""
    lines = list(BASE_LINES)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.integers(0, 4))
        if op == 0 and len(lines) > 1:
            del lines[i]
        elif op == 1:
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        elif op == 2:
            parts = lines[i].split(" ")
            parts[draw(st.integers(0, len(parts) - 1))] = draw(st.sampled_from(TOKENS) | st.text(max_size=12))
            lines[i] = " ".join(parts)
        elif op == 3:
            lines.insert(i, lines[draw(st.integers(0, len(lines) - 1))])
        else:
            lines.insert(i, draw(st.text(max_size=40)))
    return "\r\n".join(lines) + "\r\n"


def save_failure(kind: str, data: str | bytes) -> Path:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    path = CORPUS / f"{kind}-{hashlib.sha1(raw).hexdigest()[:12]}.{'sdp' if kind.startswith('sdp') else 'bin'}"
    path.write_bytes(raw)
    return path


def check_parse_sdp(sdp: str) -> None:
    try:
        parse_sdp(sdp)
    except ChorusError:
        pass


async def _publish(sdp: str) -> None:
    class Observer:
        def source_added(self, *args: Any) -> None: ...
        def source_removed(self, *args: Any) -> None: ...
        def peer_failed(self, *args: Any) -> None: ...
        def send_offer(self, *args: Any) -> None: ...

    router = Router("fuzz", Observer(), log=PeerLogger("chorus.fuzz"))
    peer = router.create_peer("p-fuzz", "fuzz")
    try:
        await peer.publish(sdp)
    except ChorusError:
        pass
    finally:
        await router.close()


def check_publish(sdp: str) -> None:
    """A whole publish: parse, setRemoteDescription, createAnswer, setLocalDescription, producers."""
    asyncio.run(_publish(sdp))


def check_parse_request(text: str) -> None:
    try:
        parse_request(text)
    except ProtocolError:
        pass


def check_datagram(data: bytes) -> None:
    """A datagram arriving at an ICE socket, through Chorus's guard."""
    import aioice.ice

    from chorus.sfu import aiortc_adapter

    aiortc_adapter.guard_stun_parsing()

    class Receiver:
        _check_list: list[Any] = []

        def data_received(self, data: bytes, component: int) -> None:
            assert data, "an empty datagram reached the data path"

        def request_received(self, *args: Any) -> None: ...

    async def deliver() -> None:  # aioice's protocol wants a running loop
        protocol = aioice.ice.StunProtocol(Receiver())
        protocol.datagram_received(data, ("127.0.0.1", 5000))

    asyncio.run(deliver())


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def signaling_message(draw: st.DrawFn) -> str:
    import json

    if draw(st.booleans()):
        return draw(st.text(max_size=200))
    message = draw(st.dictionaries(st.sampled_from(["type", "id", "method", "data", "x"]), json_like, max_size=5))
    return json.dumps(message)


@st.composite
def datagram(draw: st.DrawFn) -> bytes:
    import struct

    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    body = draw(st.binary(max_size=120))
    length = draw(st.sampled_from([len(body), len(body) + 4, 0, 65535]))
    return struct.pack("!HHI12s", draw(st.sampled_from([1, 0x101, 0x111, 0x11])), length & 0xFFFF, 0x2112A442,
                       b"\x00" * 12) + body


TARGETS = {
    "sdp-parse": (mutated_sdp(), check_parse_sdp),
    "sdp-publish": (mutated_sdp(), check_publish),
    "signaling": (signaling_message(), check_parse_request),
    "datagram": (datagram(), check_datagram),
}
