"""The publish connection of a peer: the client offers, Chorus answers; each received track becomes a Producer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiortc import RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription

from . import aiortc_adapter as adapter
from .errors import InvalidSdpError, InvalidStateError, LimitError, NotFoundError, UnsupportedCodecError
from .ids import new_id
from .logs import PeerLogger
from .producer import Producer
from .rtp import is_forwardable
from .sdp import parse_sdp, strip_mdns_candidates
from .transport import Transport, close_peer_connection


class PublishTransport(Transport):
    """
    Where a peer's tracks come in. Each offer may add m-sections; each new one the answer accepts becomes a
    :class:`~.producer.Producer`, announced with ``on_source_added``. Producers end with ``on_source_closed``:
    when the client closes its connection, or when the transport closes.

    Lifecycle: as :class:`~.transport.Transport`. A first offer that fails leaves no connection behind (the next
    offer starts afresh); once producers exist, a failed offer leaves them untouched.
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
    ) -> None:
        super().__init__(peer_id, log=log, on_failed=on_failed)
        self.producers: dict[str, Producer] = {}
        self._on_source_added = on_source_added
        self._on_source_closed = on_source_closed
        self._lock = asyncio.Lock()

    async def negotiate(self, offer_sdp: str, *, max_tracks: int = 4) -> tuple[str, list[Producer]]:
        """
        Apply the client's offer and answer it.

        :returns: the answer SDP and the producers created for new m-sections.
        :raises InvalidSdpError: the offer cannot be parsed or applied.
        :raises UnsupportedCodecError: an m-section has no codec Chorus forwards.
        :raises LimitError: the peer would publish more than ``max_tracks`` tracks.
        :raises InvalidStateError: the transport is closed, or another offer is being negotiated.
        """
        if self.closed:
            raise InvalidStateError("peer is closed")
        offer_sdp = strip_mdns_candidates(offer_sdp)
        media = parse_sdp(offer_sdp).media
        tracks = sum(1 for m in media if m.kind in ("audio", "video"))
        if not tracks:
            raise InvalidSdpError("the offer has no audio or video m-section to publish")
        if tracks > max_tracks:
            raise LimitError(f"at most {max_tracks} tracks may be published, the offer has {tracks}")
        async with self._lock:
            if self.closed:
                raise InvalidStateError("peer is closed")
            if self._pc is None:
                self._pc = self._new_pc()
            pc = self._pc
            if pc.signalingState != "stable":
                raise InvalidStateError("a publish negotiation is already in progress")
            known = set(pc.getTransceivers())
            try:
                await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
            except Exception as exc:  # aiortc raises many types on bad SDP (ValueError, KeyError, ...)
                await self._reset_if_unusable(pc)
                raise InvalidSdpError(f"cannot apply offer: {type(exc).__name__}: {exc}") from exc

            new = [t for t in pc.getTransceivers() if t not in known and t.kind in ("audio", "video")]
            for transceiver in new:
                codecs = adapter.transceiver_codecs(transceiver)
                if not codecs or not is_forwardable(codecs[0]):
                    await self._reset_if_unusable(pc, force=True)
                    raise UnsupportedCodecError(
                        f"m-section {transceiver.mid} ({transceiver.kind}) offers no codec Chorus forwards "
                        "(Opus, VP8, H.264)"
                    )
            try:
                answer = await pc.createAnswer()
                await pc.setLocalDescription(answer)
            except Exception as exc:
                await self._reset_if_unusable(pc, force=True)
                raise InvalidSdpError(f"cannot answer offer: {type(exc).__name__}: {exc}") from exc

            producers = [self._add_producer(t) for t in new if t.currentDirection in ("recvonly", "sendrecv")]
            for producer in producers:
                self._on_source_added(producer)
            return pc.localDescription.sdp, producers

    def _add_producer(self, transceiver: RTCRtpTransceiver) -> Producer:
        producer = Producer(new_id("t"), self.peer_id, transceiver, tasks=self._tasks, log=self._log)
        self.producers[producer.id] = producer
        self._log.info("producer created", producer=producer.id, kind=producer.kind,
                       codec=producer.codec.mimeType, mid=producer.mid)
        return producer

    async def _reset_if_unusable(self, pc: RTCPeerConnection, force: bool = False) -> None:
        """After a failed first offer, start over with a fresh connection."""
        if pc is self._pc and (force or pc.signalingState != "stable") and not self.producers:
            self._pc = None
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

    def _closed_by_client(self, pc: RTCPeerConnection) -> None:
        self._log.info("publish connection closed by the client")
        self._pc = None
        self._close_producers()

    def _close_producers(self) -> None:
        producers, self.producers = list(self.producers.values()), {}
        for producer in producers:
            producer.close()
            self._on_source_closed(producer)

    async def _close_children(self) -> None:
        self._close_producers()
