"""
VP8 RTP payload descriptor (RFC 7741 §4.2) and a munger that keeps a forwarded VP8 stream continuous when the
server switches between simulcast streams and drops temporal layers.

::

          0 1 2 3 4 5 6 7
         +-+-+-+-+-+-+-+-+
         |X|R|N|S|R| PID | (REQUIRED)
         +-+-+-+-+-+-+-+-+
    X:   |I|L|T|K| RSV   | (OPTIONAL)
         +-+-+-+-+-+-+-+-+
    I:   |M| PictureID   | (OPTIONAL, 7 or 15 bits)
         +-+-+-+-+-+-+-+-+
         |   PictureID   | (if M)
         +-+-+-+-+-+-+-+-+
    L:   |   TL0PICIDX   | (OPTIONAL)
         +-+-+-+-+-+-+-+-+
    T/K: |TID|Y| KEYIDX  | (OPTIONAL)
         +-+-+-+-+-+-+-+-+

Simulcast streams are independent encodings: each has its own random picture-id and TL0PICIDX bases (Chromium
always writes 15-bit picture ids). A receiver (libwebrtc's ``RtpVp8RefFinder``) uses picture ids and
TL0PICIDX to find references, so after a switch, or after dropping the frames of a temporal layer, they must
go on from where the subscriber's stream was, as mediasoup (``Codecs/VP8.cpp``), LiveKit
(``codecmunger/vp8.go``) and Janus (``janus_vp8_simulcast_descriptor_update``) do.

**Width.** The munger rewrites in place and keeps each packet's picture-id width as received: a 15-bit id
stays 15 bits (arithmetic modulo 2^15), a 7-bit id stays 7 bits (the output modulo 2^7, the same wrap the
RFC prescribes for a 7-bit sender). So the payload length never changes and no header needs moving. LiveKit
instead re-encodes the width from the value, which changes the payload length.
"""

from __future__ import annotations

from typing import Final, NamedTuple


class Vp8Descriptor(NamedTuple):
    """
    A parsed payload descriptor. Optional fields are ``None`` when absent; ``picture_id_bits`` is 7, 15, or 0
    without a picture id. ``size`` is the descriptor's length in bytes (the VP8 payload starts there);
    ``keyframe`` is true for the first packet of a key frame: S=1, PID=0 and the P bit of the VP8 payload
    header (RFC 7741 §4.3) is 0.
    """

    size: int
    start: bool
    partition: int
    picture_id: int | None
    picture_id_bits: int
    tl0picidx: int | None
    tid: int | None
    layer_sync: bool
    keyidx: int | None
    keyframe: bool

    @property
    def tl0picidx_at(self) -> int:
        """Byte offset of TL0PICIDX (when present)."""
        return 2 + (self.picture_id_bits + 1) // 8

    @property
    def tk_at(self) -> int:
        """Byte offset of the TID/Y/KEYIDX byte (when present)."""
        return self.tl0picidx_at + (self.tl0picidx is not None)


_new = tuple.__new__


def parse_vp8(payload: bytes) -> Vp8Descriptor | None:
    """The descriptor at the start of a VP8 RTP payload, or ``None`` when it is truncated (or no VP8 payload
    follows it). About 1 µs."""
    n = len(payload)
    if n < 2:
        return None
    b0 = payload[0]
    if n > 6 and b0 & 0x80 and payload[1] == 0xE0 and payload[2] & 0x80:
        # What Chromium sends: X; I (15-bit), L and T present, K absent.
        tk = payload[5]
        start = b0 & 0x10 != 0
        part = b0 & 0x07
        return _new(Vp8Descriptor, (6, start, part, ((payload[2] & 0x7F) << 8) | payload[3], 15, payload[4],
                                    tk >> 6, tk & 0x20 != 0, None, start and not part and not payload[6] & 1))
    picture_id = tl0picidx = tid = keyidx = None
    bits = 0
    sync = False
    i = 1
    if b0 & 0x80:  # X: extension byte
        x = payload[1]
        i = 2
        if x & 0x80:  # I: picture id, M says 15 bits
            if i >= n:
                return None
            b = payload[i]
            if b & 0x80:
                if i + 1 >= n:
                    return None
                picture_id = ((b & 0x7F) << 8) | payload[i + 1]
                bits = 15
                i += 2
            else:
                picture_id = b
                bits = 7
                i += 1
        if x & 0x40:  # L: TL0PICIDX
            if i >= n:
                return None
            tl0picidx = payload[i]
            i += 1
        if x & 0x30:  # T or K: one byte TID|Y|KEYIDX
            if i >= n:
                return None
            tk = payload[i]
            if x & 0x20:
                tid = tk >> 6
                sync = tk & 0x20 != 0
            if x & 0x10:
                keyidx = tk & 0x1F
            i += 1
    if i >= n:
        return None
    start = b0 & 0x10 != 0
    part = b0 & 0x07
    return _new(Vp8Descriptor, (i, start, part, picture_id, bits, tl0picidx, tid, sync, keyidx,
                                start and not part and not payload[i] & 1))


_DROPPED: Final = -1
_PID_MOD = 1 << 15
_PID_HALF = 1 << 14


def _newer(a: int, b: int) -> bool:
    """Whether 15-bit picture id ``a`` is after ``b``."""
    return a != b and (a - b) % _PID_MOD < _PID_HALF


class Vp8Munger:
    """
    Rewrites VP8 payloads for one subscriber so that picture ids, TL0PICIDX and KEYIDX form one continuous
    sequence across simulcast switches and temporal-layer drops.

    Per packet, call :meth:`munge` with the payload, the identity of the simulcast stream it came from
    (``source``: e.g. its SSRC or layer index) and its parsed descriptor. It returns the payload to send, or
    ``None`` to drop the packet (its frame is above the temporal target, or it is not VP8) — then the caller
    must also skip its sequence number (:meth:`chorus.sfu.seqmanager.SeqManager.drop`).

    * **Switch**: the first packet from a new ``source`` rebases the stream — the caller switches only at that
      source's key frame, whose picture id then follows the last one sent, and whose TL0PICIDX and KEYIDX
      follow theirs.
    * **Temporal layers**: frames with TID above :attr:`target_temporal` are dropped, each dropped *picture*
      taking one picture id out of the count, so that what is sent has no gaps a decoder would take for loss.
      Lowering the target applies at the next picture; raising it goes one layer at a time, at a frame of that
      layer with the layer-sync bit Y (it depends on TL0 only, §4.2), or at once on a key frame.
    * **Reordering**: all packets of a picture get the same output id (decisions are cached per picture, for
      the last 256 pictures); a late first packet of an older picture is numbered as if it had arrived in order.

    Streams without picture ids are forwarded with only TL0PICIDX/KEYIDX rewritten and TID filtering.
    """

    CACHE = 256

    __slots__ = ("target_temporal", "temporal", "source", "_pid_offset", "_tl0_offset", "_keyidx_offset",
                 "_last_pid", "_last_src_pid", "_last_tl0", "_last_keyidx", "_pictures", "_started")

    def __init__(self, target_temporal: int = 2) -> None:
        #: The highest temporal layer wanted (0..3).
        self.target_temporal = target_temporal
        #: The highest temporal layer being forwarded now (rises towards the target at layer-sync frames).
        self.temporal = target_temporal
        #: The simulcast stream being forwarded.
        self.source: object = None
        self._pid_offset = 0
        self._tl0_offset = 0
        self._keyidx_offset = 0
        self._last_pid: int | None = None  # newest picture id sent (15-bit space)
        self._last_src_pid: int | None = None  # newest source picture id seen from the current source
        self._last_tl0: int | None = None
        self._last_keyidx: int | None = None
        self._pictures: dict[int, int] = {}  # source picture id → output picture id, or _DROPPED
        self._started = False

    def munge(self, payload: bytes, source: object, descriptor: Vp8Descriptor | None = None) -> bytes | None:
        """The rewritten payload, or ``None`` to drop it (see the class docstring). About 1.5 µs."""
        d = descriptor if descriptor is not None else parse_vp8(payload)
        if d is None:
            return None
        if source != self.source or not self._started:
            self._switch(d, source)
        _, start, partition, pid, bits, tl0, tid, _, keyidx, _ = d
        newest = True  # the packet belongs to the newest picture sent (its TL0PICIDX/KEYIDX are the latest)
        out_pid = -1
        if pid is not None:
            last_src = self._last_src_pid
            if bits == 7 and last_src is not None:
                # Unwrap a 7-bit id into the 15-bit space the decisions are kept in.
                delta = (pid - last_src) & 0x7F
                pid = (last_src + (delta - 128 if delta >= 64 else delta)) % _PID_MOD
            cached = self._pictures.get(pid)
            out_pid = self._new_picture(d, pid) if cached is None else cached
            if out_pid == _DROPPED:
                return None
            newest = out_pid == self._last_pid
        elif tid is not None:
            if start and partition == 0:
                self._follow_target(d)
            if tid > self.temporal:
                return None

        data = bytearray(payload)
        if out_pid >= 0:
            if bits == 15:
                data[2] = 0x80 | (out_pid >> 8)
                data[3] = out_pid & 0xFF
            else:
                data[2] = out_pid & 0x7F
        if tl0 is not None:
            at = 2 + (bits + 1) // 8
            tl0 = (tl0 + self._tl0_offset) & 0xFF
            data[at] = tl0
            if newest:
                self._last_tl0 = tl0
        if keyidx is not None:
            at = d.tk_at
            keyidx = (keyidx + self._keyidx_offset) & 0x1F
            data[at] = (data[at] & 0xE0) | keyidx
            if newest:
                self._last_keyidx = keyidx
        return bytes(data)

    def _switch(self, d: Vp8Descriptor, source: object) -> None:
        """Rebase on the first packet of a new source (a key frame: the caller switches there)."""
        self.source = source
        self._pictures.clear()
        self._last_src_pid = None
        if d.picture_id is not None:
            if self._last_pid is None:
                self._pid_offset = 0
            else:
                self._pid_offset = (self._last_pid + 1 - d.picture_id) % _PID_MOD
        if d.tl0picidx is not None:
            self._tl0_offset = 0 if self._last_tl0 is None else (self._last_tl0 + 1 - d.tl0picidx) & 0xFF
        if d.keyidx is not None:
            self._keyidx_offset = 0 if self._last_keyidx is None else (self._last_keyidx + 1 - d.keyidx) & 0x1F
        if d.keyframe:
            self.temporal = self.target_temporal
        self._started = True

    def _follow_target(self, d: Vp8Descriptor) -> None:
        """At a picture's first packet: lower the forwarded layer at once, raise it at a sync frame."""
        target = self.target_temporal
        if target < self.temporal or d.keyframe:
            self.temporal = target
        elif target > self.temporal and d.tid == self.temporal + 1 and d.layer_sync:
            self.temporal += 1

    def _new_picture(self, d: Vp8Descriptor, pid: int) -> int:
        """Decide a picture seen for the first time: its output id, or :data:`_DROPPED`."""
        pictures = self._pictures
        last_src = self._last_src_pid
        in_order = last_src is None or _newer(pid, last_src)
        if d.tid is not None and in_order:
            self._follow_target(d)
        dropped = d.tid is not None and d.tid > self.temporal
        if in_order:
            if dropped:
                self._pid_offset = (self._pid_offset - 1) % _PID_MOD  # the next picture takes its id
                out = _DROPPED
            else:
                out = (pid + self._pid_offset) % _PID_MOD
                self._last_pid = out
            self._last_src_pid = pid
        elif dropped:
            out = _DROPPED  # later pictures are numbered already: its id stays a gap, as if it were lost
        else:
            # Late first packet of an older picture: undo the drops numbered since it.
            later_drops = sum(1 for p, o in pictures.items() if o == _DROPPED and _newer(p, pid))
            out = (pid + self._pid_offset + later_drops) % _PID_MOD
        pictures[pid] = out
        if len(pictures) > self.CACHE:
            newest = self._last_src_pid if self._last_src_pid is not None else pid
            for old in [p for p in pictures if (newest - p) % _PID_MOD >= self.CACHE // 2]:
                del pictures[old]
        return out
