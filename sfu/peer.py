"""A Peer is one participant of a room: a publish connection and a subscribe connection."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.sdp import SessionDescription, candidate_from_sdp

from . import aiortc_adapter as adapter
from .consumer import Consumer, IdleTrack
from .errors import InvalidSdpError, InvalidStateError, LimitError, NotFoundError, UnsupportedCodecError
from .logs import PeerLogger
from .producer import Producer
from .rtp import is_forwardable, same_codec

#: How long a subscriber may take to answer the server's offer before it is considered broken.
ANSWER_TIMEOUT = 15.0

#: ``send_offer(peer, sdp, consumers, restart)``: deliver a subscribe offer to the client; ``restart``
#: means "answer it on a new RTCPeerConnection".
OfferSender = Callable[["Peer", str, list[dict[str, Any]], bool], Awaitable[None]]

#: Inactive m-sections a subscribe connection may accumulate before it is replaced (see Peer._compact).
MAX_INACTIVE_SECTIONS = 16


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def _strip_mdns_candidates(sdp: str) -> str:
    """Drop ``.local`` candidates: resolving them would need multicast; ICE finds them peer-reflexive."""
    return "".join(
        line for line in sdp.splitlines(keepends=True)
        if not (line.startswith("a=candidate:") and ".local " in line)
    )


def parse_sdp(sdp: str) -> SessionDescription:
    """
    Parse an SDP with aiortc's parser and check what aiortc assumes without checking; any failure (aiortc
    raises AssertionError, IndexError, KeyError, StopIteration, ...) becomes InvalidSdpError.
    """
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:
        raise InvalidSdpError(f"cannot parse SDP: {type(exc).__name__}: {exc}") from exc
    mids = [m.rtp.muxId for m in description.media]
    if any(not mid for mid in mids) or len(set(mids)) != len(mids):
        raise InvalidSdpError("every m-section needs a distinct a=mid")
    for group in description.group:
        # aiortc moves bundled m-sections onto the first mid's transport; an unknown first mid leaves them
        # with none, and the connection can then neither answer nor close.
        if group.semantic == "BUNDLE" and any(item not in mids for item in group.items):
            raise InvalidSdpError("a=group:BUNDLE names a mid that has no m-section")
    return description


async def close_pc(pc: RTCPeerConnection) -> None:
    """Close a connection, even one a bad remote description left half-broken (aiortc's close() then
    raises): its transports are stopped one by one so no socket stays open."""
    try:
        await pc.close()
        return
    except Exception:
        pass
    for transceiver in pc.getTransceivers():
        for transport in (transceiver.receiver.transport, transceiver.sender.transport):
            if transport is not None:
                with contextlib.suppress(Exception):
                    await transport.stop()
                with contextlib.suppress(Exception):
                    await transport.transport.stop()


class Peer:
    """
    One participant, named by ``id`` and ``name``.

    Two RTCPeerConnections avoid offer glare: on the *publish* connection the client offers and Chorus
    answers (each received track becomes a :class:`Producer`); on the *subscribe* connection Chorus offers
    one sendonly m-section per :class:`Consumer` and the client answers. Subscribe negotiations run one at
    a time; changes made while one is in flight are folded into the next.

    Lifecycle: *new* → *closed*. ``on_failed`` is called (once) when either connection fails or the
    client does not answer an offer in time; the owner then closes the peer.
    """

    def __init__(
        self,
        peer_id: str,
        name: str,
        *,
        send_offer: OfferSender,
        on_producer: Callable[[Peer, Producer], None],
        on_failed: Callable[[Peer, str], None],
        log: PeerLogger,
        subscribe: bool = True,
    ) -> None:
        self.id = peer_id
        self.name = name
        #: Whether this peer receives the room's tracks.
        self.subscribe = subscribe
        self.closed = False
        self.producers: dict[str, Producer] = {}
        self.consumers: dict[str, Consumer] = {}
        self._send_offer = send_offer
        self._on_producer = on_producer
        self._on_failed = on_failed
        self._log = log
        self._publish_pc: RTCPeerConnection | None = None
        self._subscribe_pc: RTCPeerConnection | None = None
        self._negotiation_needed = False
        self._negotiation_task: asyncio.Task[None] | None = None
        self._answer: asyncio.Future[None] | None = None
        self._publish_lock = asyncio.Lock()
        self._inactive_sections = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"Peer(id={self.id}, name={self.name!r})"

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "tracks": [
                {"id": p.id, "kind": p.kind, "muted": p.paused} for p in self.producers.values() if not p.closed
            ],
        }

    def _new_pc(self, role: str) -> RTCPeerConnection:
        # The server needs no STUN/TURN: it advertises host candidates the clients can reach.
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            self._log.debug("connection state", pc=role, state=pc.connectionState)
            if self.closed:
                return
            if pc.connectionState == "failed":
                self._fail(f"{role} connection failed")
            elif pc.connectionState == "closed":
                # aiortc closes a connection whose DTLS the client shut down (it closed its RTCPeerConnection).
                if role == "publish" and pc is self._publish_pc:
                    self._log.info("publish connection closed by the client")
                    self._publish_pc = None
                    for producer in list(self.producers.values()):
                        producer.close()
                elif role == "subscribe" and pc is self._subscribe_pc:
                    self._fail("subscribe connection closed by the client")

        return pc

    def _fail(self, reason: str) -> None:
        if not self.closed:
            self._log.warning("peer failed", reason=reason)
            self._on_failed(self, reason)

    # --- publish -----------------------------------------------------------------------------------------

    async def publish(self, offer_sdp: str, *, max_tracks: int = 4) -> tuple[str, list[Producer]]:
        """
        Apply the client's offer on the publish connection and answer it.

        :returns: the answer SDP and the producers created for new m-sections.
        :raises InvalidSdpError: the offer cannot be parsed or applied.
        :raises UnsupportedCodecError: an m-section has no codec Chorus forwards.
        :raises LimitError: the peer would publish more than ``max_tracks`` tracks.
        """
        if self.closed:
            raise InvalidStateError("peer is closed")
        offer_sdp = _strip_mdns_candidates(offer_sdp)
        media = parse_sdp(offer_sdp).media
        tracks = sum(1 for m in media if m.kind in ("audio", "video"))
        if not tracks:
            raise InvalidSdpError("the offer has no audio or video m-section to publish")
        if tracks > max_tracks:
            raise LimitError(f"at most {max_tracks} tracks may be published, the offer has {tracks}")
        async with self._publish_lock:
            if self._publish_pc is None:
                self._publish_pc = self._new_pc("publish")
            pc = self._publish_pc
            if pc.signalingState != "stable":
                raise InvalidStateError("a publish negotiation is already in progress")
            known = {t for t in pc.getTransceivers()}
            try:
                await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
            except Exception as exc:  # aiortc raises many types on bad SDP (ValueError, KeyError, ...)
                await self._reset_publish_if_unusable()
                raise InvalidSdpError(f"cannot apply offer: {type(exc).__name__}: {exc}") from exc

            new = [t for t in pc.getTransceivers() if t not in known and t.kind in ("audio", "video")]
            for transceiver in new:
                codecs = adapter.transceiver_codecs(transceiver)
                codec = codecs[0] if codecs else None
                if codec is None or not is_forwardable(codec):
                    await self._reset_publish_if_unusable(force=True)
                    raise UnsupportedCodecError(
                        f"m-section {transceiver.mid} ({transceiver.kind}) offers no codec Chorus forwards "
                        "(Opus, VP8, H.264)"
                    )
            try:
                answer = await pc.createAnswer()
                await pc.setLocalDescription(answer)
            except Exception as exc:
                await self._reset_publish_if_unusable(force=True)
                raise InvalidSdpError(f"cannot answer offer: {type(exc).__name__}: {exc}") from exc

            producers: list[Producer] = []
            for transceiver in new:
                if transceiver.currentDirection not in ("recvonly", "sendrecv"):
                    continue
                producer = Producer(new_id("t"), self.id, transceiver, log=self._log)
                self.producers[producer.id] = producer
                producer.on_close(lambda p: self.producers.pop(p.id, None))
                producers.append(producer)
                self._log.info("producer created", producer=producer.id, kind=producer.kind,
                               codec=producer.codec.mimeType, mid=producer.mid)
            for producer in producers:
                self._on_producer(self, producer)
            return pc.localDescription.sdp, producers

    async def _reset_publish_if_unusable(self, force: bool = False) -> None:
        """After a failed first offer, start over with a fresh publish connection."""
        pc = self._publish_pc
        if pc is not None and (force or pc.signalingState != "stable") and not self.producers:
            self._publish_pc = None
            await close_pc(pc)

    def set_muted(self, producer_id: str, muted: bool) -> Producer:
        producer = self.producers.get(producer_id)
        if producer is None:
            raise NotFoundError(f"no track {producer_id!r} published by this peer")
        if muted:
            producer.pause()
        else:
            producer.resume()
        return producer

    # --- subscribe -------------------------------------------------------------------------------------

    def consume(self, producer: Producer) -> Consumer:
        """Start forwarding ``producer`` to this peer: adds an m-section and renegotiates."""
        if self.closed:
            raise InvalidStateError("peer is closed")
        consumer = self._add_consumer(producer)
        self._negotiate_soon()
        return consumer

    def _add_consumer(self, producer: Producer) -> Consumer:
        if self._subscribe_pc is None:
            self._subscribe_pc = self._new_pc("subscribe")
        transceiver = self._subscribe_pc.addTransceiver(IdleTrack(producer.kind), direction="sendonly")
        capabilities = RTCRtpSender.getCapabilities(producer.kind).codecs
        transceiver.setCodecPreferences([c for c in capabilities if same_codec(c, producer.codec)][:1])
        # One media stream per publishing peer, so a browser groups (and lip-syncs) its audio and video.
        adapter.set_sender_stream(transceiver.sender, stream_id=producer.peer_id, track_id=producer.id)
        consumer = Consumer(
            new_id("c"), producer, self.id, transceiver, on_close=self._consumer_closed, log=self._log
        )
        self.consumers[consumer.id] = consumer
        producer.add_consumer(consumer)
        self._log.debug("consumer created", consumer=consumer.id, producer=producer.id)
        return consumer

    def _consumer_closed(self, consumer: Consumer) -> None:
        """A consumer closed (usually its producer did): its m-section becomes inactive at the next
        negotiation."""
        if self.consumers.pop(consumer.id, None) is None:
            return
        if not self.closed:
            consumer.transceiver.direction = "inactive"
            self._inactive_sections += 1
            # Stopping the sender sends RTCP BYE, which ends the track at the subscriber right away.
            self._spawn(consumer.transceiver.sender.stop())
            self._negotiate_soon()

    def _compact(self) -> None:
        """
        Move every live consumer to a fresh subscribe connection (offered with ``restart``).

        aiortc cannot remove m-sections: each track that ends leaves an inactive one behind, and in a long
        call with people coming and going the subscribe SDP would grow without bound. Past
        :data:`MAX_INACTIVE_SECTIONS` the subscriber gets a new connection with only the live tracks; its
        media pauses for about one round trip plus a keyframe.
        """
        old_pc = self._subscribe_pc
        producers = [c.producer for c in self.consumers.values()]
        consumers, self.consumers = self.consumers, {}
        for consumer in consumers.values():
            consumer.close()  # no longer in self.consumers: no renegotiation is triggered
        self._subscribe_pc = None
        for producer in producers:
            if not producer.closed:
                self._add_consumer(producer)
        if self._subscribe_pc is None:
            self._subscribe_pc = self._new_pc("subscribe")
        self._inactive_sections = 0
        self._log.info("subscribe connection compacted", consumers=len(self.consumers))
        if old_pc is not None:
            self._spawn(close_pc(old_pc))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _negotiate_soon(self) -> None:
        self._negotiation_needed = True
        if self._negotiation_task is None or self._negotiation_task.done():
            self._negotiation_task = asyncio.create_task(self._negotiate(), name=f"negotiate {self.id}")

    async def _negotiate(self) -> None:
        try:
            while self._negotiation_needed and not self.closed:
                self._negotiation_needed = False
                restart = self._inactive_sections >= MAX_INACTIVE_SECTIONS
                if restart:
                    self._compact()
                pc = self._subscribe_pc
                assert pc is not None
                if pc.signalingState == "closed":
                    return  # the client closed it: the peer is on its way out (see on_state)
                await pc.setLocalDescription(await pc.createOffer())
                consumers = [
                    {"mid": c.mid, "track_id": c.producer.id, "peer_id": c.producer.peer_id, "kind": c.kind}
                    for c in self.consumers.values()
                ]
                self._answer = asyncio.get_running_loop().create_future()
                await self._send_offer(self, pc.localDescription.sdp, consumers, restart)
                try:
                    await asyncio.wait_for(asyncio.shield(self._answer), ANSWER_TIMEOUT)
                except TimeoutError:
                    self._fail("no answer to the subscribe offer")
                    return
                finally:
                    self._answer = None
        except Exception:  # a bug here must not kill the session silently
            if self._subscribe_pc is not None and self._subscribe_pc.signalingState == "closed":
                return  # closed under us by the client while offering: nothing to negotiate any more
            self._log.error("subscribe negotiation failed", exc_info=True)
            self._fail("subscribe negotiation failed")

    async def answer(self, answer_sdp: str) -> None:
        """
        Apply the client's answer to the pending subscribe offer.

        :raises InvalidStateError: no offer is pending.
        :raises InvalidSdpError: the answer cannot be applied (the offer stays pending).
        """
        if self._answer is None or self._answer.done() or self._subscribe_pc is None:
            raise InvalidStateError("no subscribe offer is pending")
        answer_sdp = _strip_mdns_candidates(answer_sdp)
        parse_sdp(answer_sdp)
        try:
            await self._subscribe_pc.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))
        except Exception as exc:
            raise InvalidSdpError(f"cannot apply answer: {type(exc).__name__}: {exc}") from exc
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(None)

    # --- ICE ---------------------------------------------------------------------------------------------

    async def add_ice_candidate(self, target: str, candidate: dict[str, Any] | None) -> None:
        """Add a trickled client candidate to the ``"publish"`` or ``"subscribe"`` connection."""
        pc = self._publish_pc if target == "publish" else self._subscribe_pc
        if pc is None or pc.remoteDescription is None:
            raise InvalidStateError(f"the {target} connection has no remote description yet")
        if not candidate or not candidate.get("candidate"):
            return  # end of candidates: aiortc needs nothing
        line = str(candidate["candidate"])
        if ".local " in line:
            return
        try:
            ice = candidate_from_sdp(line.removeprefix("candidate:").removeprefix("a=candidate:"))
            ice.sdpMid = candidate.get("sdpMid")
            ice.sdpMLineIndex = candidate.get("sdpMLineIndex")
            if ice.sdpMid is None and ice.sdpMLineIndex is None:
                ice.sdpMLineIndex = 0
            await pc.addIceCandidate(ice)
        except Exception as exc:
            raise InvalidSdpError(f"bad ICE candidate: {type(exc).__name__}: {exc}") from exc

    # --- teardown ------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close both connections, every producer (and so their consumers) and every consumer. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._negotiation_task is not None:
            self._negotiation_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        for producer in list(self.producers.values()):
            producer.close()
        for consumer in list(self.consumers.values()):
            consumer.close()
        self.consumers.clear()
        for pc in (self._publish_pc, self._subscribe_pc):
            if pc is not None:
                await close_pc(pc)
        self._log.info("peer closed")


def vars_of(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__}
