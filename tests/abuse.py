"""
Attack traffic, run in its own process so it does not share a CPU with the call being measured.

``python tests/abuse.py signaling WS_URL COUNT SOCKETS`` sends COUNT malformed or out-of-order messages
over SOCKETS parallel websockets and prints a JSON summary: how each was answered.
``python tests/abuse.py udp HOST:PORT[,HOST:PORT...] COUNT`` sends COUNT random datagrams (bytes that look
like STUN, DTLS, RTP/RTCP or nothing at all) and prints how many were sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct
import sys
from collections import Counter
from typing import Any

import aiohttp

BAD_SDP = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"


def malformed(i: int, rng: random.Random) -> tuple[str, bool]:
    """The i-th abusive message and whether it is expected to close the socket (too big)."""
    kind = i % 16
    rid = rng.randint(0, 2**53 - 1)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 200)).decode("latin-1"), False  # not JSON
    if kind == 1:
        return json.dumps([1, {"type": "req"}]), False
    if kind == 2:
        return json.dumps({"type": "req", "id": "seven", "method": "ping"}), False  # wrong id type
    if kind == 3:
        return json.dumps({"type": "req", "id": rid, "method": 12, "data": []}), False  # wrong types
    if kind == 4:
        depth = rng.randint(100, 5000)
        return "[" * depth + "]" * depth, False  # deep nesting
    if kind == 5:
        return json.dumps({"type": "req", "id": rid, "method": "join",
                           "data": {"room": "x" * 100_000, "name": "n"}}), False  # huge string
    if kind == 6:
        return json.dumps({"type": "req", "id": rid, "method": "m" * rng.randint(1, 5000)}), False
    if kind == 7:
        return json.dumps({"type": "req", "id": rid, "method": "answer",
                           "data": {"type": "answer", "sdp": BAD_SDP}}), False  # answer without offer
    if kind == 8:
        return json.dumps({"type": "req", "id": rid, "method": "trickle",
                           "data": {"target": "publish", "candidate": {"candidate": "candidate:garbage"}}}), False
    if kind == 9:
        return json.dumps({"type": "req", "id": rid, "method": "publish",
                           "data": {"type": "offer", "sdp": BAD_SDP * rng.randint(1, 3)}}), False
    if kind == 10:
        return json.dumps({"type": "req", "id": 5, "method": "ping"}), False  # duplicate ids
    if kind == 11:
        return json.dumps({"type": "req", "id": rid, "method": "mute",
                           "data": {"track_id": {"$ne": 1}, "muted": "yes"}}), False
    if kind == 12:
        return json.dumps({"type": "res", "id": rid, "ok": True}), False  # a response from a client
    if kind == 13:
        return json.dumps({"type": "req", "id": rid, "method": "leave"}), False  # leave before join
    if kind == 14:
        return json.dumps({"type": "req", "id": rid, "method": "join",
                           "data": {"v": 1, "room": "abuse-" + str(rng.randint(0, 3)), "name": "\u202e\x00"}}), False
    return "x" * (300 * 1024), False  # over max_message_bytes: limit_exceeded, the socket stays open


async def abuse_signaling(url: str, count: int, sockets: int) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()
    per_socket = count // sockets

    async def one(index: int) -> None:
        rng = random.Random(index)
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(url, max_msg_size=0)
            for n in range(per_socket):
                text, closes = malformed(index * per_socket + n, rng)
                await ws.send_str(text)
                while True:
                    msg = await asyncio.wait_for(ws.receive(), 30)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        outcomes[f"closed {ws.close_code}" if closes else f"unexpected close {ws.close_code}"] += 1
                        await ws.close()
                        ws = await http.ws_connect(url, max_msg_size=0)
                        break
                    reply = json.loads(msg.data)
                    if reply["type"] == "evt":
                        continue  # e.g. an offer after a successful join
                    if reply["ok"]:
                        outcomes["ok"] += 1  # e.g. the join with an odd name, ping with a duplicate id
                        if reply["data"].get("peer_id"):
                            await ws.send_str(json.dumps({"type": "req", "id": 1, "method": "leave"}))
                            while json.loads((await ws.receive()).data)["type"] != "res":
                                pass
                    else:
                        code = reply["error"]["code"]
                        outcomes[code if code in ("internal_error", "limit_exceeded") else "typed error"] += 1
                    break
            await ws.close()

    await asyncio.gather(*(one(i) for i in range(sockets)))
    return dict(outcomes)


def udp_garbage(targets: list[tuple[str, int]], count: int) -> dict[str, Any]:
    rng = random.Random(7)
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(count):
            kind = i % 5
            if kind == 0:  # STUN-looking: a real header, then broken attributes
                body = rng.randbytes(rng.randint(0, 120))
                data = struct.pack("!HHI12s", rng.choice([0x0001, 0x0101, 0x0111]), len(body), 0x2112A442,
                                   rng.randbytes(12)) + body
            elif kind == 1:  # DTLS-looking
                data = bytes([rng.randint(20, 63)]) + rng.randbytes(rng.randint(0, 300))
            elif kind == 2:  # RTP/RTCP-looking
                data = bytes([rng.randint(128, 191)]) + rng.randbytes(rng.randint(0, 1200))
            elif kind == 3:
                data = b""
            else:
                data = os.urandom(rng.randint(1, 1400))
            host, port = targets[i % len(targets)]
            assert host.startswith("127."), host  # loopback only, never anywhere else
            try:
                sock.sendto(data, (host, port))
                sent += 1
            except OSError:
                pass
    return {"sent": sent}


def main() -> None:
    mode = sys.argv[1]
    if mode == "signaling":
        result = asyncio.run(abuse_signaling(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in sys.argv[2].split(",")]
        result = udp_garbage(targets, int(sys.argv[3]))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
