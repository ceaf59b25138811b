"""
RTP → encoded access units, without decoding: what a muxer (fMP4, WebM, MP4) takes from a forwarded track.

- VP8 (RFC 7741 §4): the payload descriptor is stripped; packets of one picture share a timestamp, the first
  has S=1 and PID=0, the last has the marker bit (§4.1). Key frame: P bit 0 in the VP8 payload header (§4.3).
- H.264 (RFC 6184, packetization-mode 0 and 1): single NAL unit packets (§5.6), STAP-A (§5.7.1) and FU-A
  (§5.8) become one Annex B access unit per timestamp; the marker bit ends an access unit (§5.1). An access unit
  with an IDR slice is a key frame; SPS and PPS are remembered and put in front of an IDR that lacks them, so
  every key frame starts a decodable segment.
- Opus (RFC 7587 §4.2): one RTP packet carries one Opus packet; every one is independently decodable.

Loss: a sequence gap inside a picture drops the picture; for video it also drops everything up to the next key
frame (a reference is missing) and calls ``on_keyframe_needed`` once, so the caller can send a PLI.
Reordering: packets are put back in sequence within a small window; a gap still open when the window is full is
declared lost. Timestamps: 32-bit RTP timestamps are extended to 64 bits (RFC 3550 §5.1, A.1) so ``pts`` only
grows across a wrap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiortc.rtp import RtpPacket

from chorus.egress.errors import EgressError
from chorus.egress.h264 import NAL_AUD, NAL_IDR, NAL_PPS, NAL_SPS, join_annexb
from chorus.sfu.logs import PeerLogger

_log = PeerLogger(logging.getLogger("chorus.egress.depacketize"))


@dataclass(frozen=True, slots=True)
class AccessUnit:
    """
    One encoded picture or audio frame.

    :param data: a VP8 frame, an H.264 Annex B access unit, or an Opus packet.
    :param pts: the RTP timestamp extended to 64 bits (starts at the first packet's timestamp, never wraps).
    :param rtp_timestamp: the 32-bit RTP timestamp as received (for RTCP sender-report mapping).
    :param keyframe: independently decodable (VP8/H.264 key frame; always for audio).
    :param arrival: the receive time of the packet that completed it (caller's clock, seconds), if given.
    """

    data: bytes
    pts: int
    rtp_timestamp: int
    keyframe: bool
    arrival: float | None = None


class Unwrapper:
    """
    Extends a wrapping counter (16-bit sequence numbers, 32-bit timestamps) to an unbounded integer, choosing the
    value nearest the last one (RFC 3550 Appendix A.1). The first value is returned as is.
    """

    __slots__ = ("bits", "last")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.last: int | None = None

    def __call__(self, value: int) -> int:
        if self.last is None:
            self.last = value
            return value
        modulus = 1 << self.bits
        delta = (value - self.last) % modulus
        if delta >= modulus >> 1:
            delta -= modulus  # behind the last one (reordered), possibly across a wrap
        extended = self.last + delta
        if extended > self.last:
            self.last = extended
        return extended


class ReorderBuffer:
    """
    Puts packets back in sequence order within ``window`` packets.

    :meth:`push` returns the packets now in order, each with a ``lost`` count of missing packets just before
    it. A gap is waited for until ``window`` later packets are held, then declared lost. Duplicates and packets
    older than what was already released are dropped.
    """

    __slots__ = ("window", "_unwrap", "_next", "_held")

    def __init__(self, window: int = 16) -> None:
        if window < 1:
            raise EgressError("bad_input", "reorder window must be at least one packet")
        self.window = window
        self._unwrap = Unwrapper(16)
        self._next: int | None = None
        self._held: dict[int, RtpPacket] = {}

    def push(self, packet: RtpPacket) -> list[tuple[RtpPacket, int]]:
        seq = self._unwrap(packet.sequence_number)
        if self._next is None:
            self._next = seq
        if seq < self._next or seq in self._held:
            return []
        self._held[seq] = packet
        out: list[tuple[RtpPacket, int]] = []
        lost = 0
        while self._held:
            if self._next in self._held:
                out.append((self._held.pop(self._next), lost))
                lost = 0
                self._next += 1
            elif len(self._held) >= self.window:
                first = min(self._held)
                lost += first - self._next
                self._next = first
            else:
                break
        return out

    def flush(self) -> list[tuple[RtpPacket, int]]:
        """Release every held packet, gaps counted as lost (end of stream)."""
        out: list[tuple[RtpPacket, int]] = []
        assert self._next is not None or not self._held
        for seq in sorted(self._held):
            assert self._next is not None
            out.append((self._held.pop(seq), seq - self._next))
            self._next = seq + 1
        return out


class Depacketizer:
    """
    Base: reordering, timestamp extension, frame assembly by timestamp and marker bit, loss handling.

    Subclasses say how a payload starts a frame and what it contributes (:meth:`_payload`).

    Lifecycle: *waiting* (for the first decodable frame: a key frame start for video) → *assembling* → back to
    *waiting* after a loss (video), → *flushed* by :meth:`flush` at the end of the stream.

    :param on_keyframe_needed: called when loss (or a start mid-stream) leaves video waiting for a key frame.
    :param reorder_window: packets to wait for a missing one before declaring it lost.
    """

    kind = "video"
    needs_keyframe = True

    def __init__(self, *, on_keyframe_needed: Callable[[], None] | None = None, reorder_window: int = 16,
                 log: PeerLogger | None = None) -> None:
        self._reorder = ReorderBuffer(reorder_window)
        self._unwrap_ts = Unwrapper(32)
        self._on_keyframe_needed = on_keyframe_needed
        self._log = log or _log
        self._parts: list[bytes] = []
        self._frame_ts: int | None = None  # extended timestamp of the picture being assembled
        self._frame_rtp_ts = 0
        self._frame_broken = False
        self._waiting = self.needs_keyframe
        self._asked = False
        #: Counters: access units out, pictures dropped (incomplete or waiting for a key frame), packets lost.
        self.frames = 0
        self.dropped = 0
        self.lost = 0

    @property
    def waiting_for_keyframe(self) -> bool:
        return self._waiting

    def push(self, packet: RtpPacket, arrival: float | None = None) -> list[AccessUnit]:
        """Take one RTP packet (any order within the window); return the access units it completed."""
        out: list[AccessUnit] = []
        for ordered, lost in self._reorder.push(packet):
            self._take(ordered, lost, arrival, out)
        return out

    def flush(self) -> list[AccessUnit]:
        """End of stream: release held packets and the last picture if it is complete."""
        out: list[AccessUnit] = []
        for ordered, lost in self._reorder.flush():
            self._take(ordered, lost, None, out)
        self._finish(None, out)
        return out

    # -- assembly

    def _take(self, packet: RtpPacket, lost: int, arrival: float | None, out: list[AccessUnit]) -> None:
        ts = self._unwrap_ts(packet.timestamp)
        if lost:
            self.lost += lost
            self._lose(lost)
        if self._frame_ts is not None and ts != self._frame_ts:
            # A new timestamp without a marker on the last picture: it ended there (marker lost or unset).
            self._finish(arrival, out)
        starts = self._starts_frame(packet.payload)
        if self._frame_ts is None:
            if not starts:
                # The middle of a picture whose start we do not have.
                self._frame_broken = True
            self._frame_ts, self._frame_rtp_ts = ts, packet.timestamp
        try:
            part = self._payload(packet.payload)
        except (EgressError, IndexError, ValueError) as exc:
            self._log.debug("malformed payload", seq=packet.sequence_number, error=str(exc))
            self._frame_broken = True
            part = b""
        if part:
            self._parts.append(part)
        if packet.marker or self.kind == "audio":
            self._finish(arrival, out)

    def _lose(self, count: int) -> None:
        if self._frame_ts is not None:
            self._frame_broken = True
        if self.needs_keyframe and not self._waiting:
            self._waiting = True
            self._asked = False
            self._log.debug("packets lost, waiting for a key frame", lost=count)

    def _finish(self, arrival: float | None, out: list[AccessUnit]) -> None:
        if self._frame_ts is None:
            return
        data, keyframe = self._frame(self._parts) if self._parts and not self._frame_broken else (b"", False)
        pts, rtp_ts = self._frame_ts, self._frame_rtp_ts
        self._parts, self._frame_ts, self._frame_broken = [], None, False
        if not data:
            self.dropped += 1
            self._lose(0)
        elif self._waiting and not keyframe:
            self.dropped += 1
        else:
            self._waiting = False
            self._asked = False
            self.frames += 1
            out.append(AccessUnit(data, pts, rtp_ts, keyframe or self.kind == "audio", arrival))
        if self._waiting and not self._asked and self._on_keyframe_needed is not None:
            self._asked = True
            self._on_keyframe_needed()

    # -- codec specifics

    def _starts_frame(self, payload: bytes) -> bool:
        raise NotImplementedError

    def _payload(self, payload: bytes) -> bytes:
        raise NotImplementedError

    def _frame(self, parts: list[bytes]) -> tuple[bytes, bool]:
        """The access unit made of ``parts`` and whether it is a key frame; ``b""`` if it is not decodable."""
        raise NotImplementedError


def vp8_descriptor_size(payload: bytes) -> int:
    """Length of the VP8 payload descriptor (RFC 7741 §4.2) at the start of ``payload``."""
    if not payload:
        raise EgressError("bad_input", "empty VP8 payload")
    size = 1
    if payload[0] & 0x80:  # X
        x = payload[1]
        size = 2
        if x & 0x80:  # I: 7- or 15-bit PictureID
            size += 2 if payload[2] & 0x80 else 1
        if x & 0x40:  # L: TL0PICIDX
            size += 1
        if x & 0x30:  # T/K: TID|Y|KEYIDX
            size += 1
    if size > len(payload):
        raise EgressError("bad_input", "truncated VP8 payload descriptor")
    return size


class Vp8Depacketizer(Depacketizer):
    """VP8 frames (RFC 7741). ``AccessUnit.data`` is what a VP8 decoder or the WebM ``SimpleBlock`` takes."""

    def _starts_frame(self, payload: bytes) -> bool:
        # S=1 and PID=0 (RFC 7741 §4.2).
        return bool(payload) and payload[0] & 0x10 != 0 and payload[0] & 0x07 == 0

    def _payload(self, payload: bytes) -> bytes:
        return payload[vp8_descriptor_size(payload):]

    def _frame(self, parts: list[bytes]) -> tuple[bytes, bool]:
        data = b"".join(parts)
        if len(data) < 3:
            return b"", False
        keyframe = not data[0] & 0x01  # P bit of the frame tag (RFC 6386 §9.1; RFC 7741 §4.3)
        if keyframe and data[3:6] != b"\x9d\x01\x2a":
            return b"", False  # a key frame must carry the start code (RFC 6386 §9.1)
        return data, keyframe


_STAP_A = 24
_FU_A = 28


class H264Depacketizer(Depacketizer):
    """
    H.264 access units in Annex B form (RFC 6184). Interleaved mode (STAP-B, MTAP, FU-B) is not supported:
    such packets make the picture undecodable.

    ``sps``/``pps`` hold the last parameter sets seen (NAL units without start codes).
    """

    def __init__(self, *, on_keyframe_needed: Callable[[], None] | None = None, reorder_window: int = 16,
                 log: PeerLogger | None = None) -> None:
        super().__init__(on_keyframe_needed=on_keyframe_needed, reorder_window=reorder_window, log=log)
        self.sps: bytes | None = None
        self.pps: bytes | None = None
        self._fu_open = False  # inside an FU-A whose start we have

    def _starts_frame(self, payload: bytes) -> bool:
        if not payload:
            return False
        t = payload[0] & 0x1F
        if t == _FU_A:
            return len(payload) > 1 and bool(payload[1] & 0x80)
        return 1 <= t <= _STAP_A

    def _payload(self, payload: bytes) -> bytes:
        # Parts are Annex B fragments; FU-A continuation bytes are appended to the open NAL unit.
        if len(payload) < 1:
            raise EgressError("bad_input", "empty H.264 payload")
        t = payload[0] & 0x1F
        if 1 <= t <= 23:  # single NAL unit packet (§5.6)
            if self._fu_open:
                raise EgressError("bad_input", "FU-A not ended before a new NAL unit")
            return b"\x00\x00\x00\x01" + payload
        if t == _STAP_A:  # §5.7.1: 16-bit size, NAL unit, repeated
            if self._fu_open:
                raise EgressError("bad_input", "FU-A not ended before a STAP-A")
            nals = []
            i = 1
            while i < len(payload):
                if i + 2 > len(payload):
                    raise EgressError("bad_input", "truncated STAP-A size")
                size = int.from_bytes(payload[i:i + 2], "big")
                i += 2
                if size == 0 or i + size > len(payload):
                    raise EgressError("bad_input", "truncated STAP-A NAL unit")
                nals.append(payload[i:i + size])
                i += size
            return join_annexb(nals)
        if t == _FU_A:  # §5.8: FU indicator, FU header (S, E, R, type), fragment
            if len(payload) < 3:
                raise EgressError("bad_input", "truncated FU-A")
            header = payload[1]
            start, end = bool(header & 0x80), bool(header & 0x40)
            if start:
                if self._fu_open:
                    raise EgressError("bad_input", "FU-A start inside an FU-A")
                out = b"\x00\x00\x00\x01" + bytes([(payload[0] & 0xE0) | (header & 0x1F)]) + payload[2:]
            else:
                if not self._fu_open:
                    raise EgressError("bad_input", "FU-A continuation without its start")
                out = payload[2:]
            self._fu_open = not end
            return out
        raise EgressError("bad_input", f"H.264 packet type {t} is not supported (interleaved mode)")

    def _frame(self, parts: list[bytes]) -> tuple[bytes, bool]:
        fu_open, self._fu_open = self._fu_open, False
        if fu_open:
            return b"", False  # the last FU-A never ended
        nals = [n for n in b"".join(parts).split(b"\x00\x00\x00\x01") if n]
        types = [n[0] & 0x1F for n in nals]
        for nal, t in zip(nals, types, strict=True):
            if t == NAL_SPS:
                self.sps = nal
            elif t == NAL_PPS:
                self.pps = nal
        keyframe = NAL_IDR in types
        nals = [n for n, t in zip(nals, types, strict=True) if t != NAL_AUD]
        if keyframe and (NAL_SPS not in types or NAL_PPS not in types):
            if self.sps is None or self.pps is None:
                return b"", False  # an IDR we cannot decode: parameter sets never seen
            nals = [self.sps, self.pps] + [n for n in nals if n[0] & 0x1F not in (NAL_SPS, NAL_PPS)]
        if not any(1 <= (n[0] & 0x1F) <= NAL_IDR for n in nals):
            return b"", False  # parameter sets or SEI alone: no picture
        return join_annexb(nals), keyframe

    def _lose(self, count: int) -> None:
        self._fu_open = False
        super()._lose(count)


class OpusDepacketizer(Depacketizer):
    """Opus packets (RFC 7587 §4.2): one per RTP packet, each decodable on its own."""

    kind = "audio"
    needs_keyframe = False

    def _starts_frame(self, payload: bytes) -> bool:
        return True

    def _payload(self, payload: bytes) -> bytes:
        return payload

    def _frame(self, parts: list[bytes]) -> tuple[bytes, bool]:
        return parts[0], True


def depacketizer_for(mime_type: str, *, on_keyframe_needed: Callable[[], None] | None = None,
                     reorder_window: int = 16, log: PeerLogger | None = None) -> Depacketizer:
    """
    The depacketizer for a forwarded codec (``video/vp8``, ``video/h264``, ``audio/opus``).

    :raises EgressError: ``unsupported_codec`` for anything else.
    """
    classes: dict[str, type[Depacketizer]] = {
        "video/vp8": Vp8Depacketizer, "video/h264": H264Depacketizer, "audio/opus": OpusDepacketizer}
    cls = classes.get(mime_type.lower())
    if cls is None:
        raise EgressError("unsupported_codec", f"no depacketizer for {mime_type}")
    return cls(on_keyframe_needed=on_keyframe_needed, reorder_window=reorder_window, log=log)
