"""The subscribe connection of a peer: Chorus offers one sendonly m-section per Consumer, the client answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidStateError as AiortcInvalidStateError
from aiortc.rtcdtlstransport import RTCDtlsTransport

from . import aiortc_adapter as adapter
from .allocator import (
    BUDGET_SHARE,
    INTERVAL,
    UP_HEADROOM,
    Candidate,
    Hysteresis,
    allocate,
    options,
    wanted_layer,
)
from .bandwidth import TRANSPORT_CC_ID, SubscriberBandwidth
from .consumer import Consumer, IdleTrack
from .errors import InvalidSdpError, InvalidStateError
from .ids import new_id
from .logs import PeerLogger
from .observer import OfferedTrack, SubscribeOffer
from .rtp import advertise_h264_levels
from .sdp import TRANSPORT_CC_URI, offer_transport_cc, parse_sdp, strip_mdns_candidates
from .source import Source
from .transport import Transport, close_peer_connection

#: How long a subscriber may take to answer the server's offer before it is considered broken.
ANSWER_TIMEOUT = 15.0

#: Inactive m-sections a subscribe connection may accumulate before it is replaced (see SubscribeTransport._compact).
MAX_INACTIVE_SECTIONS = 16
#: Probe padding is sent in steps this far apart (seconds), in packets of at most 255 bytes of padding.
PROBE_STEP = 0.005


class SubscribeTransport(Transport):
    """
    Where a peer's subscriptions go out: one :class:`~.consumer.Consumer` per source it receives.

    Negotiations run one at a time (offer → ``send_offer`` → the client's :meth:`answer`); sources added or ended
    while one is in flight are folded into the next. A consumer whose source ended turns its m-section
    ``inactive`` (aiortc cannot remove m-sections) and sends RTCP BYE, which ends the track at the subscriber at
    once; past :data:`MAX_INACTIVE_SECTIONS` the live consumers move to a fresh connection (:meth:`_compact`).

    **Adapting to the network.** Every offer proposes transport-wide congestion control; a subscriber that
    accepts it (browsers) gets a transport-wide sequence number on every packet and its feedback drives a
    bandwidth estimate (:class:`~.bandwidth.SubscriberBandwidth`), which probes with padding when the viewers
    want more than it allows. Every :data:`~.allocator.INTERVAL` the estimate is shared out among the video
    consumers (:func:`~.allocator.allocate`): each gets the simulcast layer and temporal layer it can afford,
    never more than the size at which it is shown, audio first.

    Lifecycle: as :class:`~.transport.Transport`; the client closing its side, or not answering within
    :data:`ANSWER_TIMEOUT`, is a failure (``on_failed``).
    """

    role = "subscribe"

    def __init__(
        self,
        peer_id: str,
        *,
        log: PeerLogger,
        on_failed: Callable[[str], None],
        send_offer: Callable[[SubscribeOffer], None],
    ) -> None:
        super().__init__(peer_id, log=log, on_failed=on_failed)
        self.consumers: dict[str, Consumer] = {}
        self._send_offer = send_offer
        self._negotiation_needed = False
        self._negotiation_task: asyncio.Task[None] | None = None
        self._answer: asyncio.Future[None] | None = None
        self._inactive_sections = 0
        self.bandwidth = SubscriberBandwidth()
        self._memory: dict[str, Hysteresis] = {}
        self._hooked: RTCDtlsTransport | None = None
        self._adapting: asyncio.Task[None] | None = None
        self._probing: asyncio.Task[None] | None = None
        #: The last allocation: what it used and what the viewers want (bps).
        self.used_bps = 0
        self.wanted_bps = 0

    # --- consumers -------------------------------------------------------------------------------------

    def consume(self, source: Source) -> Consumer:
        """Start forwarding ``source`` here: adds an m-section and renegotiates.

        :raises InvalidStateError: the transport is closed."""
        if self.closed:
            raise InvalidStateError("peer is closed")
        consumer = self._add_consumer(source)
        self._negotiate_soon()
        return consumer

    def _add_consumer(self, source: Source) -> Consumer:
        if self._pc is None:
            self._pc = self._new_pc()
        transceiver = self._pc.addTransceiver(IdleTrack(source.kind), direction="sendonly")
        transceiver.setCodecPreferences([adapter.offerable_codec(source.codec)])
        # One media stream per publishing peer, so a browser groups (and lip-syncs) its audio and video.
        adapter.set_sender_stream(transceiver.sender, stream_id=source.peer_id, track_id=source.id)
        consumer = Consumer(new_id("c"), source, self.peer_id, transceiver,
                            on_source_closed=self._source_closed, bandwidth=self.bandwidth, log=self._log)
        self.consumers[consumer.id] = consumer
        if source.kind == "video" and self._adapting is None:
            self._adapting = self._tasks.spawn(self._adapt(), name=f"adapt {self.peer_id}")
        self._log.debug("consumer created", consumer=consumer.id, source=source.id)
        return consumer

    def _source_closed(self, consumer: Consumer) -> None:
        """A consumer's source ended: its m-section becomes inactive at the next negotiation."""
        if self.consumers.pop(consumer.id, None) is None or self.closed:
            return
        consumer.transceiver.direction = "inactive"
        self._inactive_sections += 1
        # Stopping the sender sends RTCP BYE, which ends the track at the subscriber right away.
        self._tasks.spawn(consumer.transceiver.sender.stop(), name=f"stop sender {consumer.id}")
        self._negotiate_soon()

    def _compact(self) -> None:
        """
        Move every live consumer to a fresh connection (offered with ``restart``).

        aiortc cannot remove m-sections: each track that ends leaves an inactive one behind, and in a long call
        with people coming and going the subscribe SDP would grow without bound. Past
        :data:`MAX_INACTIVE_SECTIONS` the subscriber gets a new connection with only the live tracks; its media
        pauses for about one round trip plus a keyframe.
        """
        old_pc = self._pc
        consumers, self.consumers = list(self.consumers.values()), {}
        for consumer in consumers:
            consumer.close()
        self._pc = None
        for consumer in consumers:
            if not consumer.source.closed:
                self._add_consumer(consumer.source)
        if self._pc is None:
            self._pc = self._new_pc()
        self._inactive_sections = 0
        self._log.info("subscribe connection compacted", consumers=len(self.consumers))
        if old_pc is not None:
            self._tasks.spawn(close_peer_connection(old_pc), name=f"close old subscribe pc {self.peer_id}")

    # --- negotiation -----------------------------------------------------------------------------------

    def _negotiate_soon(self) -> None:
        self._negotiation_needed = True
        if self._negotiation_task is None or self._negotiation_task.done():
            self._negotiation_task = self._tasks.spawn(self._negotiate(), name=f"negotiate {self.peer_id}")

    async def _negotiate(self) -> None:
        try:
            while self._negotiation_needed and not self.closed:
                self._negotiation_needed = False
                restart = self._inactive_sections >= MAX_INACTIVE_SECTIONS
                if restart:
                    self._compact()
                pc = self._pc
                assert pc is not None
                if pc.signalingState == "closed":
                    return  # the client closed it: the peer is on its way out (see _closed_by_client)
                await pc.setLocalDescription(await pc.createOffer())
                self._hook(pc)
                tracks = [OfferedTrack(c.mid, c.source.id, c.source.peer_id, c.kind) for c in self.consumers.values()]
                self._answer = asyncio.get_running_loop().create_future()
                codecs = {c.mid: c.source.codec for c in self.consumers.values()}
                offer = offer_transport_cc(advertise_h264_levels(pc.localDescription.sdp, codecs), TRANSPORT_CC_ID)
                self._send_offer(SubscribeOffer(offer, tracks, restart))
                try:
                    await asyncio.wait_for(asyncio.shield(self._answer), ANSWER_TIMEOUT)
                except TimeoutError:
                    self._on_failed("no answer to the subscribe offer")
                    return
                finally:
                    self._answer = None
        except Exception as exc:  # a bug here must not kill the session silently
            if self._pc is not None and self._pc.signalingState == "closed":
                return  # closed under us by the client while offering: nothing to negotiate any more
            if isinstance(exc, AiortcInvalidStateError) and "closed" in str(exc):
                return  # aiortc is closing it (its signaling state says so only once it is done)
            self._log.error("subscribe negotiation failed", exc_info=True)
            self._on_failed("subscribe negotiation failed")

    async def answer(self, answer_sdp: str) -> None:
        """
        Apply the client's answer to the pending offer.

        :raises InvalidStateError: no offer is pending.
        :raises InvalidSdpError: the answer cannot be applied (the offer stays pending).
        """
        if self._answer is None or self._answer.done() or self._pc is None:
            raise InvalidStateError("no subscribe offer is pending")
        answer_sdp = strip_mdns_candidates(answer_sdp)
        parse_sdp(answer_sdp)
        if f"a=extmap:{TRANSPORT_CC_ID} {TRANSPORT_CC_URI}" in answer_sdp and not self.bandwidth.transport_cc:
            self.bandwidth.mode = "transport-cc"  # before the senders start: they number packets from the first
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))
        except Exception as exc:
            raise InvalidSdpError(f"cannot apply answer: {type(exc).__name__}: {exc}") from exc
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(None)

    # --- adapting to the network ------------------------------------------------------------------------

    def _hook(self, pc: RTCPeerConnection) -> None:
        """See the subscriber's raw RTCP (transport-cc feedback, REMB) before aiortc does."""
        transceivers = pc.getTransceivers()
        dtls = transceivers[0].sender.transport if transceivers else None
        if dtls is None or dtls is self._hooked:
            return
        self._hooked = dtls
        original = adapter.hook_transport_rtcp(dtls, lambda data: self._on_rtcp(data, original))

    async def _on_rtcp(self, data: bytes, original: adapter.RtcpDataHandler) -> None:
        self.bandwidth.rtcp(data)
        await original(data)

    def _video(self) -> list[Consumer]:
        return [c for c in self.consumers.values() if c.kind == "video" and not c.closed]

    async def _adapt(self) -> None:
        """Every :data:`~.allocator.INTERVAL`: share the estimate out among the video consumers; start probes."""
        while not self.closed:
            await asyncio.sleep(INTERVAL)
            try:
                self.allocate()
            except Exception:  # a bug here must not stop media
                self._log.error("allocation failed", exc_info=True)
            if self.bandwidth.transport_cc and (self._probing is None or self._probing.done()):
                due = self.bandwidth.padding_due(self.bandwidth.bwe.sent_bps or 0)
                if due or self.bandwidth.probing:  # a cluster just started: spread it over its 40 ms
                    self._probing = self._tasks.spawn(self._probe(due), name=f"probe {self.peer_id}")

    def allocate(self) -> None:
        """Set each video consumer's target layer from the bandwidth estimate and the viewer's size."""
        video = self._video()
        adaptive = [c for c in video if c.source.layer_count > 1 or len(c.source.layer_temporal(0)) > 1]
        for consumer in video:
            consumer.wanted_layer = None if consumer.viewer_paused else wanted_layer(consumer.source,
                                                                                        consumer.max_height)
        if not adaptive:
            return
        candidates = []
        for consumer in adaptive:
            opts = options(consumer.source, consumer.max_height, consumer.viewer_paused or consumer.source.paused)
            # What the last allocation chose (the switch to it may still be waiting for a keyframe).
            current = None if consumer.reason == "start" and consumer.layer is None else next(
                (i for i, o in enumerate(opts)
                 if o.layer == consumer.target_layer and o.temporal == consumer.target_temporal), None)
            candidates.append(Candidate(consumer.id, consumer.priority, opts, current))
        fixed = sum(c.source.layer_bitrate(0) or 64_000 for c in self.consumers.values()
                    if c.kind == "audio" or c not in adaptive)
        result = allocate(self.bandwidth.estimate_bps, fixed, candidates, self._memory, time.monotonic())
        for candidate in candidates:
            target = self.consumers.get(candidate.id)
            decision = result.decisions[candidate.id]
            if target is None:
                continue
            consumer = target
            if decision.index is None:
                consumer.set_target(consumer.target_layer, consumer.target_temporal, decision.reason)
                consumer.suspend(True)
                continue
            option = candidate.options[decision.index]
            reason = decision.reason
            if reason == "best":
                reason = "size" if consumer.max_height else "best"
            consumer.suspend(False)
            consumer.set_target(option.layer, option.temporal, reason)
        self.used_bps = result.used_bps
        self.wanted_bps = result.wanted_bps + fixed
        # Probe above the need, so that the estimate can show the headroom an upgrade waits for.
        self.bandwidth.set_demand(int(self.wanted_bps * UP_HEADROOM / BUDGET_SHARE))

    async def _probe(self, first: int) -> None:
        """Send a probe cluster's padding, spread over its duration, in enough packets for the cluster to be
        measured (its ``min_packets``: a small cluster in a couple of big packets measures nothing)."""
        due = first
        cluster = self.bandwidth.cluster
        size = 255 if cluster is None else max(64, min(255, cluster.padding_bytes(0) // max(1, cluster.min_packets)))
        while True:
            consumer = max((c for c in self._video() if c.forwarding), key=lambda c: c.layer or 0, default=None)
            if consumer is None:
                return
            while due > 0:
                sent = await consumer.send_padding(min(due, size), None)
                if not sent:
                    return
                due -= sent
            await asyncio.sleep(PROBE_STEP)
            due = self.bandwidth.padding_due(self.bandwidth.bwe.sent_bps or 0)
            if not due and not self.bandwidth.probing:
                return

    def describe(self) -> dict[str, Any]:
        """The connection's estimate and each consumer's choice (admin API)."""
        bwe = self.bandwidth.bwe
        return {"bandwidth": {"mode": self.bandwidth.mode, "estimate_bps": self.bandwidth.estimate_bps
                              if self.bandwidth.mode != "none" else None, "state": self.bandwidth.state,
                              "used_bps": self.used_bps, "wanted_bps": self.wanted_bps,
                              "loss": round(bwe.loss_fraction, 3),
                              "rtt_ms": None if bwe.rtt_us is None else round(bwe.rtt_us / 1000, 1),
                              "probes": {"sent": bwe.probes.sent, "succeeded": bwe.probes.succeeded,
                                         "last_bps": bwe.probe_bps}},
                "consumers": [c.describe() for c in self.consumers.values()]}

    # --- closing ---------------------------------------------------------------------------------------

    def _closed_by_client(self, pc: RTCPeerConnection) -> None:
        self._on_failed("subscribe connection closed by the client")

    async def _close_children(self) -> None:
        if self._hooked is not None:
            adapter.unhook_transport(self._hooked)
            self._hooked = None
        consumers, self.consumers = list(self.consumers.values()), {}
        for consumer in consumers:
            consumer.close()
