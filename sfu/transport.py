"""
What the publish and the subscribe connection of a peer have in common: one aiortc RTCPeerConnection, watched.

:class:`Transport` creates the connection (max-bundle, no STUN/TURN of its own: the server advertises host
candidates clients reach), reports its failure once, adds trickled client candidates, and closes it even when a bad
remote description left it half broken. :class:`~.publish.PublishTransport` and
:class:`~.subscribe.SubscribeTransport` add what each direction does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.rtcconfiguration import RTCBundlePolicy

from .errors import InvalidSdpError, InvalidStateError
from .logs import PeerLogger
from .sdp import parse_candidate
from .tasks import Tasks


async def close_peer_connection(pc: RTCPeerConnection) -> None:
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


class Transport:
    """
    One RTCPeerConnection of a peer, in one direction (``role``: ``"publish"`` or ``"subscribe"``).

    Lifecycle: *new* (no connection until first used) → *connected* → *closed*. Two ways to end, as in mediasoup:
    :meth:`close` when the owning peer closes it, and :meth:`_closed_by_client` when the client closed its side
    (aiortc closes a connection whose DTLS the client shut down). ``on_failed(reason)`` tells the owner that the
    connection failed; the owner then closes the peer.
    """

    role = "transport"

    def __init__(self, peer_id: str, *, log: PeerLogger, on_failed: Callable[[str], None]) -> None:
        self.peer_id = peer_id
        self.closed = False
        self._log = log
        self._on_failed = on_failed
        self._pc: RTCPeerConnection | None = None
        self._tasks = Tasks(f"{self.role} transport of {peer_id}")

    def __repr__(self) -> str:
        state = self._pc.connectionState if self._pc is not None else "none"
        return f"{type(self).__name__}(peer={self.peer_id}, state={state})"

    def _new_pc(self) -> RTCPeerConnection:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            self._log.debug("connection state", pc=self.role, state=pc.connectionState)
            if self.closed or pc is not self._pc:
                return
            if pc.connectionState == "failed":
                self._on_failed(f"{self.role} connection failed")
            elif pc.connectionState == "closed":
                self._closed_by_client(pc)

        return pc

    def _closed_by_client(self, pc: RTCPeerConnection) -> None:
        """The client closed its RTCPeerConnection (aiortc closed ours when DTLS was shut down)."""

    async def add_ice_candidate(self, candidate: dict[str, Any] | None) -> None:
        """
        Add a candidate the client trickled (``None`` or an empty one: end of candidates, nothing to do).

        :raises InvalidStateError: the connection has no remote description yet.
        :raises InvalidSdpError: the candidate cannot be parsed or added.
        """
        pc = self._pc
        if pc is None or pc.remoteDescription is None:
            raise InvalidStateError(f"the {self.role} connection has no remote description yet")
        ice = parse_candidate(candidate) if candidate else None
        if ice is None:
            return
        try:
            await pc.addIceCandidate(ice)
        except Exception as exc:
            raise InvalidSdpError(f"bad ICE candidate: {type(exc).__name__}: {exc}") from exc

    async def rtp_stats(self, *, max_senders: int = 4) -> list[Any]:
        """
        aiortc's statistics (its public ``getStats``) of every receiver of this connection and of its first
        ``max_senders`` sending transceivers — bounded, since a subscribe connection may carry hundreds of tracks
        that all cross the same network path. Empty while not connected.
        """
        pc = self._pc
        if pc is None or pc.connectionState != "connected":
            return []
        stats: list[Any] = []
        senders = 0
        for transceiver in pc.getTransceivers():
            direction = transceiver.currentDirection
            if direction in ("recvonly", "sendrecv"):
                stats += (await transceiver.receiver.getStats()).values()
            if direction in ("sendonly", "sendrecv") and senders < max_senders:
                senders += 1
                stats += (await transceiver.sender.getStats()).values()
        return stats

    async def close(self) -> None:
        """Close the connection and everything on it, and wait for background work to end. Idempotent."""
        if self.closed:
            return
        self.closed = True
        await self._close_children()
        await self._tasks.close()
        pc, self._pc = self._pc, None
        if pc is not None:
            await close_peer_connection(pc)

    async def _close_children(self) -> None:
        """Close producers or consumers (subclasses)."""
