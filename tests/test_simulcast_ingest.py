"""
Simulcast ingest in-process: a publish transport answering a simulcast offer, fed raw RTP by an aiortc client
(which cannot send simulcast itself): layers are told apart by RID, garbage RIDs are ignored, redundant
retransmissions dropped, and transport-cc feedback comes back. Malformed simulcast offers are refused over the
wire with ``invalid_sdp`` and the session stays usable.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from conftest import ServerProcess, connect

from chorus.sfu import aiortc_adapter as adapter
from chorus.sfu.consumer import IdleTrack
from chorus.sfu.logs import PeerLogger
from chorus.sfu.producer import Producer
from chorus.sfu.publish import PublishTransport
from chorus.sfu.simulcast import MID_URI, REPAIRED_RID_URI, RID_URI
from chorus.sfu.source import PacketMeta
from chorus.sfu.twcc import TWCC_URI, FeedbackReader
from chorus.signaling.client import ChorusClient, RequestError

FIXTURE = Path(__file__).parent / "fixtures" / "chromium156_simulcast_offer.sdp"
IDS = {MID_URI: 1, RID_URI: 10, REPAIRED_RID_URI: 11, TWCC_URI: 4}


def simulcast_offer(sdp: str, rids: str = "a=rid:q send\r\na=rid:h send\r\na=rid:f send\r\n"
                                         "a=simulcast:send q;h;f\r\n") -> str:
    """aiortc's video offer with the RID, repaired-RID and transport-wide-cc extensions and simulcast lines."""
    lines = sdp.replace("\r\n", "\n").split("\n")
    out = []
    for line in lines:
        out.append(line)
        if line.startswith("a=extmap:1 "):
            out += [f"a=extmap:{IDS[RID_URI]} {RID_URI}", f"a=extmap:{IDS[REPAIRED_RID_URI]} {REPAIRED_RID_URI}",
                    f"a=extmap:{IDS[TWCC_URI]} {TWCC_URI}"]
        if line.startswith("a=rtcp-fb:") and line.endswith(" nack pli"):
            out.append(line.replace("nack pli", "transport-cc"))
    text = "\r\n".join(x for x in out if x) + "\r\n"
    return text + rids


class Recorder:
    """A sink that keeps (layer, sequence number) of what the producer forwards."""

    id = "recorder"
    wanted_layer = 2

    def __init__(self) -> None:
        self.got: list[tuple[int, int]] = []

    def deliver(self, packet: RtpPacket, meta: PacketMeta) -> None:
        self.got.append((meta.layer, packet.sequence_number))

    def restart(self) -> None: ...

    def source_closed(self) -> None: ...


async def test_layers_by_rid_garbage_ignored_rtx_deduplicated_feedback_sent() -> None:
    adapter.set_host_addresses(["127.0.0.1"])
    client = RTCPeerConnection()
    transceiver = client.addTransceiver(IdleTrack("video"), direction="sendonly")
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                     if c.mimeType in ("video/VP8", "video/rtx")][:2])
    added: list[Producer] = []
    transport = PublishTransport("p-test", log=PeerLogger("chorus.test"), on_failed=lambda reason: None,
                                 on_source_added=added.append, on_source_closed=lambda p: None)
    feedback: list[tuple[int, int | None]] = []
    try:
        await client.setLocalDescription(await client.createOffer())
        answer, producers = await transport.negotiate(simulcast_offer(client.localDescription.sdp))
        assert "a=simulcast:recv q;h;f" in answer and f"a=extmap:4 {TWCC_URI}" in answer
        assert "transport-cc" in answer and "goog-remb" not in answer
        await client.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        (producer,) = producers
        assert [layer.rid for layer in producer.layers] == ["q", "h", "f"]
        recorder = Recorder()
        producer.attach(recorder)  # type: ignore[arg-type]
        for _ in range(200):
            if adapter.sender_started(transceiver.sender):
                break
            await asyncio.sleep(0.02)
        reader = FeedbackReader()
        dtls = transceiver.sender.transport
        original = adapter.hook_transport_rtcp(dtls, lambda data: record_feedback(data))

        async def record_feedback(data: bytes) -> None:
            feedback.extend(reader.read(data))
            await original(data)

        extensions = HeaderExtensionsMap()
        extensions.configure(RTCRtpParameters(headerExtensions=[
            RTCRtpHeaderExtensionParameters(id=i, uri=u) for u, i in IDS.items()]))
        codecs = adapter.transceiver_codecs(transceiver)
        vp8, rtx = codecs[0].payloadType, codecs[1].payloadType
        rng = random.Random(3)
        ssrcs = {"q": 1001, "h": 1002, "f": 1003, "zz": 1004}
        seqs = {rid: rng.randrange(60000) for rid in ssrcs}
        tseq = 0

        async def send(rid: str | None, ssrc: int, seq: int, payload_type: int, payload: bytes,
                       repaired: str | None = None) -> None:
            nonlocal tseq
            packet = RtpPacket(payload_type=payload_type, sequence_number=seq & 0xFFFF, timestamp=1000 + seq * 3000,
                               ssrc=ssrc, payload=payload)
            packet.extensions.mid = transceiver.mid
            packet.extensions.rtp_stream_id = rid
            packet.extensions.repaired_rtp_stream_id = repaired
            packet.extensions.transport_sequence_number = tseq
            tseq += 1
            await adapter.send_rtp(transceiver.sender, packet.serialize(extensions))

        keyframe = b"\x90\xe0\x80\x01\x00\x20" + b"\x00\x00\x00\x9d\x01\x2a\x40\x01\xb4\x00" + bytes(50)
        for i in range(20):
            for rid in ("q", "h", "f", "zz"):
                await send(rid if rid != "zz" else "\x00garbage"[: 1 + i % 8], ssrcs[rid], seqs[rid] + i, vp8,
                           keyframe)
            await asyncio.sleep(0.01)
        # A retransmission of a packet already forwarded (as Chromium pads while probing) and one of a packet
        # that was lost on the way.
        await send(None, 2001, 1, rtx, (seqs["q"] + 5).to_bytes(2, "big") + keyframe, repaired="q")
        await send(None, 2001, 2, rtx, (seqs["q"] + 20).to_bytes(2, "big") + keyframe, repaired="q")
        await asyncio.sleep(0.5)

        by_layer = {layer: [s for lay, s in recorder.got if lay == layer] for layer in range(3)}
        assert [len(by_layer[i]) for i in range(3)] == [21, 20, 20], {k: len(v) for k, v in by_layer.items()}
        assert by_layer[0][-1] == (seqs["q"] + 20) & 0xFFFF  # the lost one, recovered by RTX
        assert producer.layers[0].redundant_rtx == 1
        assert {layer.ssrc for layer in producer.layers} == {1001, 1002, 1003}
        assert feedback and {seq for seq, at in feedback if at is not None} >= set(range(20)), feedback[:10]
    finally:
        await transport.close()
        await client.close()


@pytest.mark.parametrize(("name", "lines"), [
    ("four layers", "a=rid:a send\r\na=rid:b send\r\na=rid:c send\r\na=rid:d send\r\na=simulcast:send a;b;c;d\r\n"),
    ("unknown rid", "a=rid:q send\r\na=simulcast:send q;x\r\n"),
    ("bad rid", "a=rid:q!! send\r\na=simulcast:send q\r\n"),
    ("garbage", "a=simulcast:\x00\x01\r\n"),
])
async def test_malformed_simulcast_is_refused_and_the_session_goes_on(server: ServerProcess,
                                                                     clients: list[ChorusClient], room_name: str,
                                                                     name: str, lines: str) -> None:
    client = await connect(server, clients)
    await client.join(room_name, "pub")
    pc = RTCPeerConnection()
    pc.addTransceiver(IdleTrack("video"), direction="sendonly")
    try:
        await pc.setLocalDescription(await pc.createOffer())
        with pytest.raises(RequestError) as refused:
            await client.request("publish", {"type": "offer", "sdp": simulcast_offer(pc.localDescription.sdp,
                                                                                      lines)})
        assert refused.value.code == "invalid_sdp", refused.value
        good: dict[str, Any] = await client.request("publish", {"type": "offer", "sdp": simulcast_offer(
            pc.localDescription.sdp)})
        assert "a=simulcast:recv q;h;f" in good["sdp"]
    finally:
        await pc.close()


async def test_camera_and_screen_both_simulcast_route_to_their_own_tracks() -> None:
    """Two simulcast video m-sections with the same payload types: packets are told apart by MID, then RID."""
    adapter.set_host_addresses(["127.0.0.1"])
    client = RTCPeerConnection()
    transceivers = [client.addTransceiver(IdleTrack("video"), direction="sendonly") for _ in range(2)]
    for transceiver in transceivers:
        transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                         if c.mimeType == "video/VP8"])
    transport = PublishTransport("p-test", log=PeerLogger("chorus.test"), on_failed=lambda reason: None,
                                 on_source_added=lambda p: None, on_source_closed=lambda p: None)
    try:
        await client.setLocalDescription(await client.createOffer())
        offer = client.localDescription.sdp.replace("\r\n", "\n").split("\nm=")
        rids = "a=rid:q send\na=rid:h send\na=rid:f send\na=simulcast:send q;h;f"
        munged = offer[0] + "".join("\nm=" + section.rstrip("\n") + "\n" + rids for section in offer[1:])
        answer, producers = await transport.negotiate(simulcast_offer(munged, rids=""))
        assert answer.count("a=simulcast:recv q;h;f") == 2
        await client.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        recorders = [Recorder(), Recorder()]
        for producer, recorder in zip(producers, recorders, strict=True):
            producer.attach(recorder)  # type: ignore[arg-type]
        for _ in range(200):
            if all(adapter.sender_started(t.sender) for t in transceivers):
                break
            await asyncio.sleep(0.02)
        extensions = HeaderExtensionsMap()
        extensions.configure(RTCRtpParameters(headerExtensions=[
            RTCRtpHeaderExtensionParameters(id=i, uri=u) for u, i in IDS.items()]))
        payload_type = adapter.transceiver_codecs(transceivers[0])[0].payloadType
        keyframe = b"\x90\xe0\x80\x01\x00\x20" + b"\x00\x00\x00\x9d\x01\x2a\x40\x01\xb4\x00" + bytes(50)
        for i in range(10):
            for n, transceiver in enumerate(transceivers):
                for layer, rid in enumerate("qhf"):
                    packet = RtpPacket(payload_type=payload_type, sequence_number=100 * layer + i,
                                       timestamp=3000 * i, ssrc=5000 + 10 * n + layer, payload=keyframe)
                    packet.extensions.mid = transceiver.mid
                    packet.extensions.rtp_stream_id = rid
                    await adapter.send_rtp(transceivers[0].sender, packet.serialize(extensions))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        for recorder in recorders:
            assert sorted({layer for layer, _ in recorder.got}) == [0, 1, 2]
            assert len(recorder.got) == 30
        assert {layer.ssrc for layer in producers[0].layers} == {5000, 5001, 5002}
        assert {layer.ssrc for layer in producers[1].layers} == {5010, 5011, 5012}
    finally:
        await transport.close()
        await client.close()
