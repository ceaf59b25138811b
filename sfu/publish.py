"""The publish connection of a peer: the client offers, Chorus answers; each received track becomes a Producer."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from aiortc import RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.rate import RemoteBitrateEstimator
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, RtpPacket, pack_remb_fci

from . import aiortc_adapter as adapter
from .errors import InvalidSdpError, InvalidStateError, LimitError, NotFoundError, UnsupportedCodecError
from .ids import new_id
from .logs import PeerLogger
from .producer import Producer, Route
from .rtp import is_forwardable
from .sdp import parse_sdp, strip_mdns_candidates
from .simulcast import MID_URI, REPAIRED_RID_URI, RID_URI, OfferedMedia, parse_offer, patch_answer
from .transport import Transport, close_peer_connection
from .twcc import TWCC_URI, FeedbackRecorder, read_transport_seq

#: Transport-cc feedback is sent this often (libwebrtc: 50-250 ms; fast feedback ramps the sender up sooner).
FEEDBACK_INTERVAL = 0.05
#: How often the layers simulcast publishers should send are reconsidered (seconds).
LAYERS_INTERVAL = 0.5


class PublishTransport(Transport):
    """
    Where a peer's tracks come in. Each offer may add m-sections; each new one the answer accepts becomes a
    :class:`~.producer.Producer`, announced with ``on_source_added``. Producers end with ``on_source_closed``:
    when the client closes its connection, or when the transport closes.

    **Congestion feedback.** When the client offers transport-wide congestion control (browsers do), the answer
    accepts it and Chorus sends transport-cc feedback every :data:`FEEDBACK_INTERVAL`: the arrival time of every
    packet, from which the browser's own estimator drives its encoder (and ramps up in a second or two). Other
    clients (aiortc) get REMB, computed from abs-send-time as aiortc would.

    **Simulcast.** A video m-section offered with ``a=rid``/``a=simulcast`` is answered with them (and the MID
    and RID header extensions), so the browser sends every layer; its producer has one layer per RID.

    **Routing.** Every RTP datagram of the connection comes here first (aiortc's single-stream receive path is
    not used): packets of a known SSRC go to their producer's layer; a new SSRC is placed by its MID header
    extension (and RID, for simulcast), else as aiortc would route it.

    Lifecycle: as :class:`~.transport.Transport`. A first offer that fails leaves no connection behind (the next
    offer starts afresh); once producers exist, a failed offer leaves them untouched.

    ``preferred_video_codec`` is asked at each offer: when it names a codec (``video/H264`` while the room has an
    HTTP egress that passes H.264 through), new video m-sections that offer it are answered with it first.
    """

    role = "publish"

    def __init__(
        self,
        peer_id: str,
        *,
        log: PeerLogger,
        on_failed: Callable[[str], None],
        on_source_added: Callable[[Producer], None],
        on_source_closed: Callable[[Producer], None],
        on_layers_wanted: Callable[[Producer, list[str]], None] = lambda producer, rids: None,
        preferred_video_codec: Callable[[], str | None] = lambda: None,
    ) -> None:
        super().__init__(peer_id, log=log, on_failed=on_failed)
        self.producers: dict[str, Producer] = {}
        self._preferred_video_codec = preferred_video_codec
        self._on_source_added = on_source_added
        self._on_source_closed = on_source_closed
        self._on_layers_wanted = on_layers_wanted
        self._layers_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._dtls: RTCDtlsTransport | None = None
        self._routes: dict[int, Route] = {}
        self._by_mid: dict[str, Producer] = {}
        self._twcc: FeedbackRecorder | None = None
        self._twcc_media_ssrc = 0
        self._twcc_id = 0
        self._kernel_times = False
        self._feedback_task: asyncio.Task[None] | None = None
        self._remb: RemoteBitrateEstimator | None = None

    @property
    def transport_cc(self) -> bool:
        """Whether the client gets transport-cc feedback (else REMB)."""
        return self._twcc is not None

    async def negotiate(self, offer_sdp: str, *, max_tracks: int = 4) -> tuple[str, list[Producer]]:
        """
        Apply the client's offer and answer it.

        :returns: the answer SDP and the producers created for new m-sections.
        :raises InvalidSdpError: the offer cannot be parsed or applied (malformed simulcast included).
        :raises UnsupportedCodecError: an m-section has no codec Chorus forwards.
        :raises LimitError: the peer would publish more than ``max_tracks`` tracks.
        :raises InvalidStateError: the transport is closed, or another offer is being negotiated.
        """
        if self.closed:
            raise InvalidStateError("peer is closed")
        offer_sdp = strip_mdns_candidates(offer_sdp)
        media = parse_sdp(offer_sdp).media
        if not any(m.kind in ("audio", "video") for m in media):
            raise InvalidSdpError("the offer has no audio or video m-section to publish")
        # m-sections the client stopped sending on (inactive, or rejected with port 0) are not tracks.
        tracks = sum(1 for m in media if m.kind in ("audio", "video") and m.port and m.direction != "inactive")
        if tracks > max_tracks:
            raise LimitError(f"at most {max_tracks} tracks may be published, the offer has {tracks}")
        offered = {m.mid: m for m in parse_offer(offer_sdp) if m.mid is not None}
        async with self._lock:
            if self.closed:
                raise InvalidStateError("peer is closed")
            if self._pc is None:
                self._pc = self._new_pc()
            pc = self._pc
            if pc.signalingState != "stable":
                raise InvalidStateError("a publish negotiation is already in progress")
            # Tracks the client stopped sending end at once, before aiortc's slow part: the others see them go.
            self._retire({m.rtp.muxId for m in media if m.kind in ("audio", "video")
                          and (not m.port or m.direction == "inactive")})
            known = set(pc.getTransceivers())
            try:
                await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
            except Exception as exc:  # aiortc raises many types on bad SDP (ValueError, KeyError, ...)
                await self._reset_if_unusable(pc)
                raise InvalidSdpError(f"cannot apply offer: {type(exc).__name__}: {exc}") from exc

            new = [t for t in pc.getTransceivers() if t not in known and t.kind in ("audio", "video")]
            preferred = self._preferred_video_codec()
            if preferred is not None:
                for transceiver in new:
                    if transceiver.kind == "video" and adapter.prefer_codec(transceiver, preferred):
                        self._log.info("video codec preferred", mid=transceiver.mid, codec=preferred)
            for transceiver in new:
                codecs = adapter.transceiver_codecs(transceiver)
                if not codecs or not is_forwardable(codecs[0]):
                    await self._reset_if_unusable(pc, force=True)
                    raise UnsupportedCodecError(
                        f"m-section {transceiver.mid} ({transceiver.kind}) offers no codec Chorus forwards "
                        "(Opus, VP8, H.264)"
                    )
                self._accept_extensions(transceiver, offered.get(transceiver.mid or ""))
            try:
                answer = await pc.createAnswer()
                await pc.setLocalDescription(answer)
                answer_sdp = patch_answer(pc.localDescription.sdp, list(offered.values()))
            except InvalidSdpError:
                await self._reset_if_unusable(pc, force=True)
                raise
            except Exception as exc:
                await self._reset_if_unusable(pc, force=True)
                raise InvalidSdpError(f"cannot answer offer: {type(exc).__name__}: {exc}") from exc

            revived = self._revived(pc, known)
            producers = [self._add_producer(t, offered.get(t.mid or "")) for t in new + revived
                         if t.currentDirection in ("recvonly", "sendrecv")]
            if producers:
                self._hook(producers[0].receiver.transport)
            if any(p.simulcast for p in producers) and self._layers_task is None:
                self._layers_task = self._tasks.spawn(self._watch_layers(), name=f"publish layers {self.peer_id}")
            for producer in producers:
                self._on_source_added(producer)
            return answer_sdp, producers

    def unpublish(self, producer_id: str) -> None:
        """
        End one of this peer's tracks now, ahead of the renegotiation in which the client makes its m-section
        inactive (so the others see it go without waiting for that). Sending on the m-section again after a
        renegotiation makes a new track, as for any inactive m-section.

        :raises NotFoundError: no such producer here.
        """
        producer = self.producers.get(producer_id)
        if producer is None:
            raise NotFoundError(f"no track {producer_id!r} published by this peer")
        self._retire({producer.mid or ""})

    def _retire(self, mids: set[str]) -> None:
        """The client stopped sending on these m-sections (made them inactive, e.g. a screen share that ended):
        their tracks end."""
        for producer in [p for p in self.producers.values() if p.mid in mids]:
            del self.producers[producer.id]
            self._by_mid.pop(producer.mid or "", None)
            for ssrc in [ssrc for ssrc, route in self._routes.items() if route.producer is producer]:
                del self._routes[ssrc]
            producer.close()
            self._on_source_closed(producer)

    def _revived(self, pc: RTCPeerConnection, known: set[RTCRtpTransceiver]) -> list[RTCRtpTransceiver]:
        """After a renegotiation: the known m-sections without a track that send again (the client reuses its
        m-sections for a new track, e.g. the next screen share)."""
        mids = {p.mid for p in self.producers.values()}
        return [t for t in pc.getTransceivers() if t in known and t.mid not in mids
                and t.currentDirection in ("recvonly", "sendrecv")]

    def _accept_extensions(self, transceiver: RTCRtpTransceiver, offered: OfferedMedia | None) -> None:
        """Negotiate, beyond aiortc's own, simulcast's header extensions and transport-wide congestion control."""
        if offered is None:
            return
        wanted: dict[str, int] = {}
        if offered.simulcast is not None and transceiver.kind == "video":
            wanted.update({uri: offered.extmap[uri] for uri in (MID_URI, RID_URI, REPAIRED_RID_URI)
                           if uri in offered.extmap})
        if offered.transport_cc and TWCC_URI in offered.extmap:
            wanted[TWCC_URI] = self._twcc_id = offered.extmap[TWCC_URI]
            adapter.set_rtcp_feedback(transceiver, add="transport-cc", remove="goog-remb")
            if self._twcc is None:
                self._twcc = FeedbackRecorder(random.getrandbits(32))
            if self._feedback_task is None:
                self._feedback_task = self._tasks.spawn(self._send_feedback(),
                                                        name=f"transport-cc feedback {self.peer_id}")
        adapter.add_header_extensions(transceiver, wanted)

    def _add_producer(self, transceiver: RTCRtpTransceiver, offered: OfferedMedia | None) -> Producer:
        rids = list(offered.simulcast.rids) if offered is not None and offered.simulcast is not None else None
        producer = Producer(new_id("t"), self.peer_id, transceiver, tasks=self._tasks, log=self._log,
                            rids=rids if transceiver.kind == "video" else None)
        self.producers[producer.id] = producer
        if producer.mid is not None:
            self._by_mid[producer.mid] = producer
        self._log.info("producer created", producer=producer.id, kind=producer.kind, codec=producer.codec.mimeType,
                       mid=producer.mid, layers=producer.layer_count)
        return producer

    async def _reset_if_unusable(self, pc: RTCPeerConnection, force: bool = False) -> None:
        """After a failed first offer, start over with a fresh connection."""
        if pc is self._pc and (force or pc.signalingState != "stable") and not self.producers:
            self._pc = None
            self._twcc = None
            await close_peer_connection(pc)

    def set_muted(self, producer_id: str, muted: bool) -> Producer:
        """Pause or resume one of this peer's producers.

        :raises NotFoundError: no such producer here."""
        producer = self.producers.get(producer_id)
        if producer is None:
            raise NotFoundError(f"no track {producer_id!r} published by this peer")
        if muted:
            producer.pause()
        else:
            producer.resume()
        return producer

    # --- the receive path ------------------------------------------------------------------------------

    def _hook(self, dtls: RTCDtlsTransport) -> None:
        if self._dtls is dtls:
            return
        self._dtls = dtls
        adapter.hook_transport_rtp(dtls, self._on_rtp_data)
        if self._twcc is None and self._remb is None:
            self._remb = RemoteBitrateEstimator()
        elif self._twcc is not None:
            # Arrival times from the kernel: a busy event loop would compress them into bursts, which the
            # browser's estimator reads as queuing (or as an implausible probe) and answers by slowing down.
            self._kernel_times = adapter.kernel_arrival_times(dtls, self._arrived)

    def _arrived(self, datagram: bytes, nanoseconds: int) -> None:
        recorder = self._twcc
        if recorder is None or len(datagram) < 12 or not 127 < datagram[0] < 192 or 192 <= datagram[1] <= 223:
            return  # not RTP (STUN, DTLS, RTCP)
        seq = read_transport_seq(datagram, self._twcc_id)
        if seq is not None:
            recorder.record(seq, nanoseconds // 1000)

    async def _on_rtp_data(self, data: bytes, arrival_time_ms: int) -> None:
        dtls = self._dtls
        if dtls is None:
            return
        try:
            packet = adapter.parse_rtp(dtls, data)
        except ValueError:
            return
        if self._twcc is not None:
            self._twcc_media_ssrc = packet.ssrc
            seq = packet.extensions.transport_sequence_number
            if seq is not None and not self._kernel_times:
                self._twcc.record(seq, time.monotonic_ns() // 1000)
        route = self._routes.get(packet.ssrc)
        if route is None:
            route = self._learn(dtls, packet)
            if route is None:
                return
        producer = route.producer
        if self._remb is not None and producer.kind == "video" and packet.extensions.abs_send_time is not None:
            remb = self._remb.add(arrival_time_ms, packet.extensions.abs_send_time,
                                  len(packet.payload) + packet.padding_size, packet.ssrc)
            if remb is not None:
                await self._send_remb(producer, *remb)
        await producer.receive(packet, route, arrival_time_ms, time.monotonic())

    def _learn(self, dtls: RTCDtlsTransport, packet: RtpPacket) -> Route | None:
        producer = self._by_mid.get(packet.extensions.mid) if packet.extensions.mid else None
        if producer is None:
            receiver = adapter.route_rtp(dtls, packet)
            producer = next((p for p in self.producers.values() if p.receiver is receiver), None)
        if producer is None:
            return None
        route = producer.learn(packet)
        if route is not None:
            self._routes[packet.ssrc] = route
            adapter.register_ssrc(dtls, packet.ssrc, producer.receiver)  # its sender reports reach the receiver
        return route

    async def _send_remb(self, producer: Producer, bitrate: int, ssrcs: list[int]) -> None:
        sender_ssrc = adapter.receiver_rtcp_ssrc(producer.receiver)
        if sender_ssrc is None or self._dtls is None:
            return
        packet = RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=sender_ssrc, media_ssrc=0, fci=pack_remb_fci(bitrate, ssrcs))
        try:
            await adapter.send_rtcp(self._dtls, bytes(packet))
        except ConnectionError:
            pass

    async def _send_feedback(self) -> None:
        """Send transport-cc feedback for what arrived, every :data:`FEEDBACK_INTERVAL`."""
        while not self.closed:
            await asyncio.sleep(FEEDBACK_INTERVAL)
            recorder, dtls = self._twcc, self._dtls
            if recorder is None or dtls is None:
                continue
            for packet in recorder.build(self._twcc_media_ssrc):
                try:
                    await adapter.send_rtcp(dtls, packet)
                except ConnectionError:
                    break

    async def _watch_layers(self) -> None:
        """Tell the client which simulcast layers to send, as the viewers' wishes change (``on_layers_wanted``)."""
        while not self.closed:
            await asyncio.sleep(LAYERS_INTERVAL)
            now = time.monotonic()
            for producer in list(self.producers.values()):
                rids = producer.publish_layers_due(now)
                if rids is not None:
                    self._log.info("publish layers", producer=producer.id, active=",".join(rids))
                    self._on_layers_wanted(producer, rids)

    # --- closing ---------------------------------------------------------------------------------------

    def _closed_by_client(self, pc: RTCPeerConnection) -> None:
        self._log.info("publish connection closed by the client")
        self._pc = None
        self._close_producers()

    def _close_producers(self) -> None:
        producers, self.producers = list(self.producers.values()), {}
        self._routes.clear()
        self._by_mid.clear()
        if self._dtls is not None:
            adapter.unhook_transport(self._dtls)
            self._dtls = None
        self._twcc = self._remb = None
        for producer in producers:
            producer.close()
            self._on_source_closed(producer)

    async def _close_children(self) -> None:
        self._close_producers()
