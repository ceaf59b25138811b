"""
One ingested stream as one room participant: a :class:`StreamBridge` is the :class:`.media.MediaSink` that the RTMP
and SRT listeners and the URL puller deliver to, and it publishes the stream's tracks on an
:class:`~chorus.sfu.external.ExternalPeer`.

Video: H.264 is forwarded as it arrives (packetized, never decoded) when subscribers can decode it — its WebRTC
profile is in ``passthrough_profiles`` and pictures come in presentation order — and re-encoded otherwise
(B-frames: WebRTC receivers render in decoding order and stutter; a profile browsers do not take), by
:class:`.transcode.H264Reencoder` in a child process. A stream that turns out to reorder pictures after it
started (a composition offset the SPS did not announce) switches to re-encoding at its next keyframe. Audio: AAC
becomes Opus in :class:`.transcode.AacToOpus`'s thread. Nothing heavy runs on the event loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chorus.sfu.external import ExternalPeer
from chorus.sfu.ids import new_id
from chorus.sfu.logs import PeerLogger
from chorus.sfu.tasks import Tasks

from .errors import IngestError, TranscodeError
from .h264 import BROWSER_PROFILES, needs_reencode, webrtc_profile
from .media import AudioConfig, AudioFrame, EndReason, MediaItem, Metadata, VideoAccessUnit, VideoConfig
from .sources import H264Source, OpusSource
from .transcode import AacToOpus, H264Reencoder, OpusPacket
from .wire import ReencodeSettings

#: Access units waiting for a running re-encoder at most (a second at 30 fps): a short stall is absorbed, and when it
#: stays behind (a starved CPU) input is dropped until the stream's next keyframe rather than queued without end,
#: so the latency it adds stays bounded.
REENCODE_BACKLOG = 30
#: Seconds over which ``bitrate`` is measured.
BITRATE_WINDOW = 5.0


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    """
    :param passthrough_profiles: WebRTC H.264 profile names (:func:`.h264.webrtc_profile`) forwarded without
        re-encoding; what the audience's browsers decode (Chromium: constrained baseline, baseline, main; Firefox:
        the baselines; Safari: constrained baseline, high).
    """

    passthrough_profiles: frozenset[str] = BROWSER_PROFILES
    reencode: ReencodeSettings = field(default_factory=ReencodeSettings)
    opus_bitrate: int = 64_000


class StreamBridge:
    """
    Turns one stream's media into the tracks of ``peer``.

    :param on_ended: called once, on the loop, when the stream has ended (:meth:`ended`); the owner then awaits
        :meth:`close` and removes the participant.
    :param on_failed: called when a transcoder failed: the owner should stop the stream (its end reason will be
        the error).

    Lifecycle: *waiting* (nothing published yet) → *live* (a video and/or an audio source published on ``peer``)
    → *ended* (:meth:`ended`: media is ignored from then on) → *closed* (:meth:`close`: transcoders and forwarding
    tasks stopped; the sources end with the participant).
    """

    def __init__(self, peer: ExternalPeer, *, settings: BridgeSettings | None = None, log: PeerLogger,
                 on_ended: Callable[[EndReason], None], on_failed: Callable[[IngestError], None]) -> None:
        self.peer = peer
        self.settings = settings or BridgeSettings()
        self.log = log
        self.on_ended = on_ended
        self.on_failed = on_failed
        self.started = time.monotonic()
        self.metadata: dict[str, Any] = {}
        self.received_bytes = 0
        self.video_mode: str | None = None  # "passthrough" | "reencode"
        self.reencode_reason = ""
        self.input_video: VideoConfig | None = None
        self.input_audio: AudioConfig | None = None
        self.video: H264Source | None = None
        self.audio: OpusSource | None = None
        self.reencoder: H264Reencoder | None = None
        self.aac: AacToOpus | None = None
        self.ended_reason: EndReason | None = None
        self.closed = False
        self._tasks = Tasks(f"ingest bridge {peer.id}")
        self._window: deque[tuple[float, int]] = deque()
        self._waiting_keyframe = False  # after switching to re-encoding mid-stream

    # --- MediaSink ---------------------------------------------------------------------------------------------

    def media(self, item: MediaItem) -> None:
        if self.ended_reason is not None or self.closed or self.peer.closed:
            return
        try:
            self._media(item)
        except Exception as e:  # a bug must end this stream, not the connection's task or the listener
            self.log.error("ingest bridge failed", exc_info=True)
            self.on_failed(IngestError(f"internal error: {type(e).__name__}: {e}"))

    def _media(self, item: MediaItem) -> None:
        if isinstance(item, VideoAccessUnit):
            self._count(sum(len(n) for n in item.nalus))
            self._video_unit(item)
        elif isinstance(item, AudioFrame):
            self._count(len(item.aac))
            if self.aac is not None:
                self.aac.push(item)
        elif isinstance(item, VideoConfig):
            self._video_config(item)
        elif isinstance(item, AudioConfig):
            self._audio_config(item)
        elif isinstance(item, Metadata):
            self.metadata.update({k: v for k, v in item.values.items() if isinstance(v, str | int | float | bool)})

    def ended(self, reason: EndReason) -> None:
        if self.ended_reason is not None:
            return
        self.ended_reason = reason
        self.on_ended(reason)

    # --- video ---------------------------------------------------------------------------------------------------

    def _video_config(self, config: VideoConfig) -> None:
        self.input_video = config
        if self.video_mode is None:
            if needs_reencode(config, accepted=self.settings.passthrough_profiles):
                profile = webrtc_profile(config.profile_level_id)
                reason = ("pictures may come out of order (B-frames)" if config.may_reorder
                          else f"profile {profile or config.profile_level_id} is not forwarded as is")
                self._start_reencoding(reason)
            else:
                self.video_mode = "passthrough"
                self.log.info("video forwarded without re-encoding", profile_level_id=config.profile_level_id,
                              width=config.width, height=config.height)
                self._publish_video(config, None)
        if self.video_mode == "reencode":
            assert self.reencoder is not None
            self.reencoder.push(config)
        elif self.video is not None:
            if needs_reencode(config, accepted=self.settings.passthrough_profiles):
                self._start_reencoding("the stream's new configuration needs re-encoding")
                assert self.reencoder is not None
                self.reencoder.push(config)
            else:
                self.video.set_config(config)

    def _video_unit(self, unit: VideoAccessUnit) -> None:
        if self.video_mode == "passthrough" and unit.pts_ms != unit.dts_ms:
            # the SPS did not announce it, but pictures come out of order: re-encode from the next keyframe
            self._start_reencoding("pictures came out of order (B-frames)")
            assert self.reencoder is not None and self.input_video is not None
            self.reencoder.push(self.input_video)
            self._waiting_keyframe = True
        if self.video_mode == "passthrough":
            if self.video is not None:
                self.video.push(unit)
        elif self.video_mode == "reencode" and self.reencoder is not None:
            if self._waiting_keyframe and not unit.keyframe:
                return
            self._waiting_keyframe = False
            self.reencoder.push(unit)

    def _start_reencoding(self, reason: str) -> None:
        self.video_mode = "reencode"
        self.reencode_reason = reason
        self.log.info("video re-encoded", reason=reason,
                      profile_level_id=self.input_video.profile_level_id if self.input_video else None)
        self.reencoder = H264Reencoder(self._reencoded, settings=self.settings.reencode, on_error=self._failed,
                                       name=f"re-encode {self.peer.id}", max_backlog=REENCODE_BACKLOG)
        self._tasks.spawn(self._start_reencoder(self.reencoder), name=f"start re-encoder {self.peer.id}")

    async def _start_reencoder(self, reencoder: H264Reencoder) -> None:
        try:
            await reencoder.start()
        except OSError as e:
            self._failed(TranscodeError(f"cannot start the re-encoder: {e}"))

    def _reencoded(self, item: MediaItem) -> None:
        if self.ended_reason is not None or self.closed or self.peer.closed:
            return
        if isinstance(item, VideoConfig):
            if self.video is None:
                self._publish_video(item, self._request_reencoded_keyframe)
            else:
                self.video.set_config(item)
        elif isinstance(item, VideoAccessUnit) and self.video is not None:
            self.video.push(item)

    def _request_reencoded_keyframe(self) -> None:
        if self.reencoder is not None:
            self.reencoder.request_keyframe()

    def _publish_video(self, config: VideoConfig, on_keyframe_request: Callable[[], None] | None) -> None:
        if self.peer.closed:
            return
        self.video = H264Source(new_id("t"), self.peer.id, config, tasks=self._tasks,
                                on_keyframe_request=on_keyframe_request)
        self.peer.publish(self.video)

    # --- audio ---------------------------------------------------------------------------------------------------

    def _audio_config(self, config: AudioConfig) -> None:
        self.input_audio = config
        if self.aac is None and not self.peer.closed:
            self.aac = AacToOpus(self._opus, bitrate=self.settings.opus_bitrate, on_error=self._failed,
                                 name=f"aac→opus {self.peer.id}")
            self.audio = OpusSource(new_id("t"), self.peer.id, tasks=self._tasks)
            self.peer.publish(self.audio)
        if self.aac is not None:
            self.aac.push(config)

    def _opus(self, packet: OpusPacket) -> None:
        if self.audio is not None and self.ended_reason is None:
            self.audio.push(packet)

    # --- state ---------------------------------------------------------------------------------------------------

    def _failed(self, error: TranscodeError) -> None:
        if self.ended_reason is None and not self.closed:
            self.on_failed(error)

    def _count(self, size: int) -> None:
        self.received_bytes += size
        now = time.monotonic()
        self._window.append((now, size))
        while self._window and self._window[0][0] < now - BITRATE_WINDOW:
            self._window.popleft()

    @property
    def bitrate(self) -> int:
        """Bits per second of media received over the last :data:`BITRATE_WINDOW` seconds."""
        now = time.monotonic()
        recent = sum(size for at, size in self._window if at >= now - BITRATE_WINDOW)
        return int(recent * 8 / min(BITRATE_WINDOW, max(now - self.started, 0.5)))

    def describe(self) -> dict[str, Any]:
        """Codecs in and out, mode, bit rate and transcoding cost, for the admin API."""
        video: dict[str, Any] | None = None
        if self.input_video is not None:
            config = self.input_video
            video = {"codec": "H.264", "profile_level_id": config.profile_level_id,
                     "profile": webrtc_profile(config.profile_level_id), "width": config.width,
                     "height": config.height, "b_frames": config.may_reorder, "mode": self.video_mode}
            if self.video is not None:
                video["sent_profile_level_id"] = self.video.codec.parameters.get("profile-level-id")
                video["keyframes"] = self.video.stats.keyframes
                video["dropped_units"] = self.video.stats.dropped_units
            if self.reencoder is not None:
                video["reencode_reason"] = self.reencode_reason
                video["reencode_cpu_seconds"] = round(self.reencoder.cpu_seconds(), 3)
                video["reencode_dropped"] = self.reencoder.dropped
        audio: dict[str, Any] | None = None
        if self.input_audio is not None:
            audio = {"codec": "AAC", "sample_rate": self.input_audio.sample_rate,
                     "channels": self.input_audio.channels, "sent_codec": "opus"}
            if self.aac is not None:
                audio["transcode_cpu_seconds"] = round(self.aac.cpu_seconds, 3)
                audio["dropped"] = self.aac.dropped
        return {"video": video, "audio": audio, "bitrate": self.bitrate, "received_bytes": self.received_bytes,
                "metadata": self.metadata}

    async def close(self) -> None:
        """Stop the transcoders and the forwarding tasks. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.reencoder is not None:
            await self.reencoder.close()
        if self.aac is not None:
            await self.aac.close()
        await self._tasks.close()
