"""
The playback connection of a viewer (WHEP): the player offers receive-only m-sections, Chorus answers with one
sendonly m-section per source it is given, each fed by an ordinary Consumer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import OperationError

from . import aiortc_adapter as adapter
from .consumer import Consumer, IdleTrack
from .errors import InvalidSdpError, InvalidStateError, UnsupportedCodecError
from .ids import new_id
from .logs import PeerLogger
from .rtp import advertise_h264_levels
from .sdp import parse_sdp, strip_mdns_candidates
from .source import Source
from .transport import Transport, close_peer_connection


class PlaybackTransport(Transport):
    """
    The answerer counterpart of :class:`~.subscribe.SubscribeTransport`, for players that offer (WHEP): one
    negotiation, no renegotiation (WHEP has no way for the server to offer again).

    Each source goes out on the first offered m-section of its kind; m-sections left over are answered
    ``inactive``. The consumers are the same :class:`~.consumer.Consumer` class as everywhere. When a source ends
    its m-section cannot be retired (no renegotiation): the sender stops (RTCP BYE ends the player's track) and,
    once nothing is left to play, ``on_ended`` is called.

    Lifecycle: *new* → *answered* (:meth:`answer`) → *closed*; as :class:`~.transport.Transport`, the player
    closing its side or the connection failing is ``on_failed``.
    """

    role = "playback"

    def __init__(self, peer_id: str, *, log: PeerLogger, on_failed: Callable[[str], None],
                 on_ended: Callable[[str], None]) -> None:
        super().__init__(peer_id, log=log, on_failed=on_failed)
        self.consumers: dict[str, Consumer] = {}
        self._on_ended = on_ended

    async def answer(self, offer_sdp: str, sources: Sequence[Source]) -> str:
        """
        Apply the player's offer and answer it, sending ``sources``.

        :returns: the answer SDP (H.264 sections name the source's own ``profile-level-id``).
        :raises InvalidSdpError: the offer cannot be parsed or applied, or has no m-section for any source.
        :raises UnsupportedCodecError: the player cannot receive a source's codec (nothing is kept).
        :raises InvalidStateError: closed, or already answered.
        """
        if self.closed:
            raise InvalidStateError("viewer is closed")
        if self._pc is not None:
            raise InvalidStateError("this playback session is already negotiated")
        offer_sdp = strip_mdns_candidates(offer_sdp)
        description = parse_sdp(offer_sdp)
        left = list(sources)
        chosen: list[Source] = []
        for media in description.media:
            source = next((s for s in left if s.kind == media.kind), None)
            if source is not None:
                left.remove(source)
                chosen.append(source)
        if not chosen:
            raise InvalidSdpError("the offer has no audio or video m-section for what is playing")
        pc = self._pc = self._new_pc()
        transceivers = []
        try:
            # aiortc gives the offer's m-sections to unassigned transceivers of their kind, in order: add ours
            # first, each preferring exactly its source's codec, so the answer carries that codec or fails.
            for source in chosen:
                transceiver = pc.addTransceiver(IdleTrack(source.kind), direction="sendonly")
                transceiver.setCodecPreferences([adapter.offerable_codec(source.codec)])
                adapter.set_sender_stream(transceiver.sender, stream_id=source.peer_id, track_id=source.id)
                transceivers.append(transceiver)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
            except OperationError as exc:
                raise UnsupportedCodecError(
                    "the player offers no codec for what is playing ("
                    + ", ".join(sorted({s.codec.mimeType for s in chosen})) + f"): {exc}"
                ) from exc
            except Exception as exc:  # aiortc raises many types on bad SDP
                raise InvalidSdpError(f"cannot apply offer: {type(exc).__name__}: {exc}") from exc
            for source, transceiver in zip(chosen, transceivers, strict=True):
                consumer = Consumer(new_id("c"), source, self.peer_id, transceiver,
                                    on_source_closed=self._source_closed, log=self._log)
                self.consumers[consumer.id] = consumer
            try:
                await pc.setLocalDescription(await pc.createAnswer())
            except Exception as exc:
                raise InvalidSdpError(f"cannot answer offer: {type(exc).__name__}: {exc}") from exc
        except Exception:
            await self._close_children()
            self._pc = None
            await close_peer_connection(pc)
            raise
        self._log.info("playback answered", sources=[s.id for s in chosen])
        return advertise_h264_levels(pc.localDescription.sdp, {c.mid: c.source.codec for c in self.consumers.values()})

    def _source_closed(self, consumer: Consumer) -> None:
        if self.consumers.pop(consumer.id, None) is None or self.closed:
            return
        # Stopping the sender sends RTCP BYE, which ends the track at the player right away.
        self._tasks.spawn(consumer.transceiver.sender.stop(), name=f"stop sender {consumer.id}")
        if not self.consumers:
            self._on_ended("what this viewer watched has ended")

    def _closed_by_client(self, pc: RTCPeerConnection) -> None:
        self._on_failed("playback connection closed by the player")

    async def _close_children(self) -> None:
        consumers, self.consumers = list(self.consumers.values()), {}
        for consumer in consumers:
            consumer.close()
