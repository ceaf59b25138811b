"""
Participants of a benchmark, one class per server protocol. The load is identical whatever the server:
publishers send the same clip with the same codecs, subscribers receive with the same cheap counters.

* :class:`ChorusParticipant` — Chorus's own signaling, through :class:`signaling.client.ChorusClient`. The
  MediaRelay baseline server (``bench.relay_server``) speaks the same subset, so it uses this class too.
* :class:`JanusParticipant` — Janus VideoRoom over the websocket ``janus-protocol``: a publisher handle
  and, to receive, one subscriber handle subscribed to every wanted feed (multistream), as one
  PeerConnection — like Chorus's single subscribe connection.

A publisher may send its video as three simulcast layers (:class:`~.simulcast.SimulcastSender`); a subscriber may
then want one of them (``layer``, 0 = lowest): Chorus is told the viewer's size (``set_preferences`` with the
layer's height), Janus the substream (``substream`` in the subscriber's join).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.rtcconfiguration import RTCBundlePolicy

from chorus.sfu.consumer import IdleTrack
from chorus.sfu.tasks import Tasks
from chorus.signaling.client import ChorusClient

from .janus import JanusHandle, JanusSession
from .media import SIMULCAST_LAYERS, Clip, ClipAudioTrack, ClipVideoTrack, SimulcastClip
from .receive import TrackRecord, hook_receiver
from .simulcast import SimulcastSender


def _configuration() -> RTCConfiguration:
    return RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)


def _make_tracks(clip: Clip, audio: bool, video: bool) -> list[MediaStreamTrack]:
    tracks: list[MediaStreamTrack] = []
    if audio:
        tracks.append(ClipAudioTrack(clip))
    if video:
        tracks.append(ClipVideoTrack(clip))
    return tracks


async def _wait_connected(pc: RTCPeerConnection, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while pc.connectionState != "connected":
        if pc.connectionState in ("failed", "closed") or time.monotonic() > deadline:
            raise ConnectionError(f"publish connection {pc.connectionState}")
        await asyncio.sleep(0.05)


def _attach_senders(pc: RTCPeerConnection) -> None:
    """Let each clip video track see its sender's keyframe requests."""
    for transceiver in pc.getTransceivers():
        track = transceiver.sender.track
        if isinstance(track, ClipVideoTrack):
            track.sender = transceiver.sender


def _receiver_of(pc: RTCPeerConnection, track: MediaStreamTrack) -> Any:
    return next(t.receiver for t in pc.getTransceivers() if t.receiver.track is track)


async def _simulcast_offer(pc: RTCPeerConnection, clip: Clip, simulcast: SimulcastClip, audio: bool
                           ) -> tuple[str, SimulcastSender]:
    """Add the tracks of a simulcast publisher to ``pc`` and make its offer (see :mod:`.simulcast`)."""
    if audio:
        pc.addTransceiver(ClipAudioTrack(clip), direction="sendonly")
    video = pc.addTransceiver(IdleTrack("video"), direction="sendonly")
    codecs = RTCRtpSender.getCapabilities("video").codecs
    video.setCodecPreferences([c for c in codecs if c.mimeType.lower() == "video/vp8"])
    await pc.setLocalDescription(await pc.createOffer())
    sender = SimulcastSender(simulcast)
    return sender.offer(pc.localDescription.sdp, video), sender


class Participant:
    """Common bookkeeping: what this participant received."""

    def __init__(self, url: str, room: str, name: str, clip: Clip) -> None:
        self.url = url
        self.room = room
        self.name = name
        self.clip = clip
        self.records: list[TrackRecord] = []
        self.join_started: float | None = None
        self.receiving = False  # whether received tracks count (publishers in a fan-out do not receive)
        self.feed_id: Any = None
        #: The simulcast clip, when this participant publishes simulcast (set by the worker).
        self.simulcast_clip: SimulcastClip | None = None
        self.simulcast: SimulcastSender | None = None
        #: The simulcast layer this participant wants to receive (0 = lowest), or None for the server's choice.
        self.wanted_layer: int | None = None

    async def publish(self, audio: bool, video: bool, *, receive: bool, simulcast: bool = False) -> None:
        raise NotImplementedError

    async def subscribe(self, feeds: list[Any], layer: int | None = None) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def _record(self, kind: str) -> TrackRecord:
        record = TrackRecord(kind, self.join_started)
        if kind == "video":
            record.wanted = self.wanted_layer
        self.records.append(record)
        return record

    def _simulcast_clip(self) -> SimulcastClip:
        if self.simulcast_clip is None:
            raise RuntimeError("a simulcast publisher needs the simulcast clip")
        return self.simulcast_clip


class ChorusParticipant(Participant):
    def __init__(self, url: str, room: str, name: str, clip: Clip) -> None:
        super().__init__(url, room, name, clip)
        self.client = ChorusClient(url)
        self.client.on_track(self._on_track)
        self._tasks = Tasks(f"bench participant {name}")

    def _on_track(self, track: MediaStreamTrack, info: dict[str, Any]) -> None:
        pc = self.client.subscribe_pc
        assert pc is not None
        transceiver = next(t for t in pc.getTransceivers() if t.receiver.track is track)
        if not self.receiving:
            # A publish-only participant: decline the media (Janus publishers do not subscribe at all).
            transceiver.direction = "inactive"
            return
        hook_receiver(transceiver.receiver, self._record(track.kind))
        if track.kind == "video" and self.wanted_layer is not None and info.get("track_id"):
            # The viewer's size, sent at once (before the answer) so the first frames are of that layer already.
            height = SIMULCAST_LAYERS[self.wanted_layer].height
            self._tasks.spawn(self.client.request("set_preferences", {"track_id": info["track_id"],
                                                                      "max_height": height}),
                              name=f"set_preferences {self.name}")

    async def _join(self, *, timed: bool) -> None:
        await self.client.connect()
        self.join_started = time.time() if timed else None
        await self.client.join(self.room, self.name, identity=self.name)

    async def publish(self, audio: bool, video: bool, *, receive: bool, simulcast: bool = False) -> None:
        self.receiving = receive
        # A meeting participant receives peers that publish after it joined: join → first frame is not
        # meaningful there, so it is not timed.
        await self._join(timed=False)
        if simulcast and video:
            await self._publish_simulcast(audio)
            return
        tracks = _make_tracks(self.clip, audio, video)
        await self.client.publish(*tracks, video_codec="video/VP8")
        assert self.client.publish_pc is not None
        _attach_senders(self.client.publish_pc)
        await _wait_connected(self.client.publish_pc)

    async def _publish_simulcast(self, audio: bool) -> None:
        """Publish as :meth:`ChorusClient.publish` does, with the simulcast offer (the client cannot make one)."""
        pc = self.client.publish_pc = RTCPeerConnection(_configuration())
        offer, self.simulcast = await _simulcast_offer(pc, self.clip, self._simulcast_clip(), audio)
        answer = await self.client.request("publish", {"type": "offer", "sdp": offer})
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        for track in answer["tracks"]:
            self.client.tracks[track["id"]] = track
        await _wait_connected(pc)
        self.simulcast.start()

    async def subscribe(self, feeds: list[Any], layer: int | None = None) -> None:
        if self.client.peer_id is not None:
            return  # already in the room (a meeting participant): Chorus sends everything on join
        self.receiving = True
        self.wanted_layer = layer
        await self._join(timed=True)

    async def close(self) -> None:
        await self._tasks.close()
        if self.simulcast is not None:
            await self.simulcast.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.close(), 5)


class JanusParticipant(Participant):
    def __init__(self, url: str, room: str, name: str, clip: Clip) -> None:
        super().__init__(url, room, name, clip)
        self.session = JanusSession(url)
        self.pcs: list[RTCPeerConnection] = []
        self._connected = False

    async def _connect(self) -> None:
        if not self._connected:
            await self.session.connect()
            self._connected = True

    async def publish(self, audio: bool, video: bool, *, receive: bool, simulcast: bool = False) -> None:
        await self._connect()
        handle = await self.session.attach()
        joined = await handle.message({"request": "join", "ptype": "publisher", "room": int(self.room),
                                       "display": self.name})
        self.feed_id = joined["plugindata"]["data"]["id"]
        pc = RTCPeerConnection(_configuration())
        self.pcs.append(pc)
        jsep: dict[str, Any]
        if simulcast and video:
            offer, self.simulcast = await _simulcast_offer(pc, self.clip, self._simulcast_clip(), audio)
            # Janus reads a=rid lines as highest first unless told otherwise; ours are lowest first, as Chromium's.
            jsep = {"type": "offer", "sdp": offer, "rid_order": "lmh"}
        else:
            for track in _make_tracks(self.clip, audio, video):
                transceiver = pc.addTransceiver(track, direction="sendonly")
                if track.kind == "video":  # as ChorusClient.publish(video_codec="video/VP8")
                    codecs = RTCRtpSender.getCapabilities("video").codecs
                    transceiver.setCodecPreferences([c for c in codecs if c.mimeType.lower() == "video/vp8"])
            _attach_senders(pc)
            await pc.setLocalDescription(await pc.createOffer())
            jsep = {"type": "offer", "sdp": pc.localDescription.sdp}
        answer = await handle.message({"request": "publish", "audio": audio, "video": video}, jsep)
        await handle.trickle_done()
        await pc.setRemoteDescription(RTCSessionDescription(answer["jsep"]["sdp"], "answer"))
        self.receiving = receive
        await _wait_connected(pc)
        if self.simulcast is not None:
            self.simulcast.start()
        # Subscribing is refused ("No such feed") until Janus lists us as an active publisher.
        deadline = time.monotonic() + 10
        while True:
            listed = await handle.message({"request": "listparticipants", "room": int(self.room)})
            me = [p for p in listed["plugindata"]["data"].get("participants", []) if p.get("id") == self.feed_id]
            if me and me[0].get("publisher"):
                break
            if time.monotonic() > deadline:
                raise ConnectionError("janus never listed the publisher as publishing")
            await asyncio.sleep(0.1)

    async def subscribe(self, feeds: list[Any], layer: int | None = None) -> None:
        await self._connect()
        self.receiving = True
        self.wanted_layer = layer
        meeting = self.feed_id is not None
        self.join_started = None if meeting else time.time()
        handle: JanusHandle = await self.session.attach()
        # A simulcast feed's substream (0 = lowest) is chosen per stream; for audio it means nothing.
        streams = [{"feed": feed} if layer is None else {"feed": feed, "substream": layer} for feed in feeds]
        offer = await handle.message({"request": "join", "ptype": "subscriber", "room": int(self.room),
                                      "streams": streams})
        pc = RTCPeerConnection(_configuration())
        self.pcs.append(pc)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            hook_receiver(_receiver_of(pc, track), self._record(track.kind))

        await pc.setRemoteDescription(RTCSessionDescription(offer["jsep"]["sdp"], "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        await handle.message({"request": "start"}, {"type": "answer", "sdp": pc.localDescription.sdp})
        await handle.trickle_done()

    async def close(self) -> None:
        if self.simulcast is not None:
            await self.simulcast.close()
        for pc in self.pcs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pc.close(), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.session.close(), 5)


DRIVERS: dict[str, type[Participant]] = {
    "chorus": ChorusParticipant,
    "relay": ChorusParticipant,
    "janus": JanusParticipant,
}
