"""
Switching between simulcast layers, in-process: a synthetic three-layer VP8 source (each layer with random
sequence, timestamp, picture-id and TL0PICIDX bases, L1T3 temporal layers, keyframes at different times) is
forwarded by a real Consumer over a real aiortc connection while its target layer and temporal layer change at
random. What the subscriber receives must be one continuous stream: every switch at a keyframe, sequence
numbers contiguous, picture ids continuous, timestamps monotonic.
"""

from __future__ import annotations

import asyncio
import random
import struct

from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from chorus.sfu import aiortc_adapter as adapter
from chorus.sfu.consumer import Consumer, IdleTrack
from chorus.sfu.logs import PeerLogger
from chorus.sfu.source import Source
from chorus.sfu.vp8 import parse_vp8

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
SIZES = [(320, 180), (640, 360), (1280, 720)]
TIDS = (0, 2, 1, 2)  # L1T3


class Layer:
    """One simulcast stream of the synthetic source."""

    def __init__(self, index: int, rng: random.Random) -> None:
        self.index = index
        self.seq = rng.randrange(0x10000)
        self.ts = rng.getrandbits(32)
        self.pid = rng.randrange(0x8000)
        self.tl0 = rng.randrange(0x100)
        self.keyidx = rng.randrange(0x20)
        self.frame = 0
        self.key_every = 40 + 7 * index

    def packets(self, payload_type: int, force_keyframe: bool = False) -> list[tuple[RtpPacket, bool]]:
        """The packets of this layer's next frame; the flag: it starts a keyframe."""
        keyframe = force_keyframe or self.frame % self.key_every == 0
        tid = 0 if keyframe else TIDS[self.frame % 4]
        if tid == 0 and self.frame:
            self.tl0 = (self.tl0 + 1) & 0xFF
        if keyframe:
            self.keyidx = (self.keyidx + 1) & 0x1F
        count = 3 if keyframe else 1 + self.index
        out = []
        for i in range(count):
            start = i == 0
            descriptor = bytes([0x80 | (0x10 if start else 0), 0xF0,  # X, S; I L T K
                                0x80 | (self.pid >> 8), self.pid & 0xFF, self.tl0,
                                (tid << 6) | (0x20 if tid > 0 else 0) | self.keyidx])
            if start:
                width, height = SIZES[self.index]
                vp8 = bytes([0x00 if keyframe else 0x01, 0, 0]) + (
                    b"\x9d\x01\x2a" + struct.pack("<HH", width, height) if keyframe else b"")
            else:
                vp8 = b""
            mark = struct.pack("!BHH", self.index, self.frame & 0xFFFF, self.pid)  # what the test reads back
            packet = RtpPacket(payload_type=payload_type, marker=int(i == count - 1), sequence_number=self.seq,
                               timestamp=self.ts, payload=descriptor + vp8 + mark + bytes(100))
            out.append((packet, keyframe and start))
            self.seq = (self.seq + 1) & 0xFFFF
        self.frame += 1
        self.ts = (self.ts + 3000) & 0xFFFFFFFF
        self.pid = (self.pid + 1) & 0x7FFF
        return out


class Synthetic(Source):
    """A three-layer simulcast source fed by the test; keyframe requests are honoured at the next frame."""

    requested: set[int]

    def request_keyframe(self, layer: int | None = None) -> None:
        self.requested.update(range(3) if layer is None else (layer,))

    @property
    def layer_count(self) -> int:
        return 3

    def layer_height(self, layer: int) -> int:
        return SIZES[layer][1]


async def connected_pair() -> tuple[RTCPeerConnection, RTCPeerConnection, object, list[RtpPacket]]:
    server, client = RTCPeerConnection(), RTCPeerConnection()
    transceiver = server.addTransceiver(IdleTrack("video"), direction="sendonly")
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                     if c.mimeType == "video/VP8"])
    received: list[RtpPacket] = []

    @client.on("track")
    def on_track(track: object) -> None:
        receiver = next(t.receiver for t in client.getTransceivers() if t.receiver.track is track)
        adapter.disable_decoding(receiver)

        async def record(packet: RtpPacket, arrival_time_ms: int) -> None:
            received.append(packet)

        adapter.hook_receiver_rtp(receiver, record)

    await server.setLocalDescription(await server.createOffer())
    await client.setRemoteDescription(server.localDescription)
    await client.setLocalDescription(await client.createAnswer())
    await server.setRemoteDescription(client.localDescription)
    for _ in range(200):
        if adapter.sender_started(transceiver.sender):
            break
        await asyncio.sleep(0.02)
    return server, client, transceiver, received


async def test_switches_are_seamless() -> None:
    adapter.set_host_addresses(["127.0.0.1"])
    rng = random.Random(7)
    server, client, transceiver, received = await connected_pair()
    try:
        source = Synthetic("t-syn", "p-pub", "video", VP8)
        source.requested = set()
        consumer = Consumer("c-test", source, "p-sub", transceiver,  # type: ignore[arg-type]
                            on_source_closed=lambda c: None, log=PeerLogger("chorus.test"))
        layers = [Layer(i, rng) for i in range(3)]
        targets = []
        for step in range(600):  # 20 s of 30 fps
            if step % 30 == 0:
                target = rng.randrange(3)
                temporal = rng.choice((0, 1, 2, 2))
                consumer.set_target(target, temporal)
                targets.append((target, temporal))
            for layer in layers:
                forced = layer.index in source.requested
                source.requested.discard(layer.index)
                for packet, keyframe in layer.packets(96, forced):
                    await source.forward(packet, keyframe, layer.index, parse_vp8(packet.payload))
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.3)
    finally:
        await client.close()
        await server.close()

    assert len(received) > 500
    seqs = [p.sequence_number for p in received]
    assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:], strict=False)), "sequence gap or reorder"
    stamps = [p.timestamp for p in received]
    assert all(0 <= (b - a) & 0xFFFFFFFF < 0x80000000 for a, b in zip(stamps, stamps[1:], strict=False))
    switches = 0
    previous_layer = None
    pids: list[int] = []
    for packet in received:
        d = parse_vp8(packet.payload)
        assert d is not None and d.picture_id is not None
        layer, _, _ = struct.unpack("!BHH", packet.payload[d.size + (10 if d.keyframe else 3 if d.start else 0):][:5])
        if layer != previous_layer:
            assert d.keyframe, f"switched to layer {layer} on a delta frame"
            switches += 1 if previous_layer is not None else 0
            previous_layer = layer
        if d.start:
            pids.append(d.picture_id)
    assert all((b - a) % 0x8000 == 1 for a, b in zip(pids, pids[1:], strict=False)), "picture-id gap"
    assert switches >= 8, (switches, targets)
    print(f"{len(received)} packets, {switches} switches, {len(pids)} pictures")
