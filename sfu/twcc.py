"""
Transport-wide congestion control feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01).

* The transport sequence number header extension (§2): one 16-bit counter per transport, written by the
  sender in every RTP packet, whatever its SSRC.
* The RTCP transport-cc feedback message (§3.1, RTPFB PT 205, FMT 15): which of those packets arrived and
  when, in 250 µs steps, sent back by the receiver.

:class:`FeedbackRecorder` is the receiving side (the server receiving from a publisher): record each
packet's transport sequence number and arrival time, call :meth:`FeedbackRecorder.build` every ~50 ms and
send the RTCP packets it returns. :class:`FeedbackReader` is the sending side (the server sending to a
subscriber): it turns the feedback a subscriber sends into ``(sequence number, arrival time or None)``.
aiortc's ``RtcpRtpfbPacket.parse`` reads FMT 15 as a NACK, so :func:`iter_rtcp` splits compound RTCP here.

Times are integer microseconds on the recording side's clock (any epoch ≥ 0, e.g.
``time.monotonic_ns() // 1000``); arrival times read back from feedback are on the *remote* clock, and only
their differences mean anything. Nothing here touches aiortc.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

#: The header extension's URI in SDP ``a=extmap`` lines.
TWCC_URI = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"

RTCP_RTPFB = 205  # RFC 4585 §6.1: transport layer feedback
FMT_TRANSPORT_CC = 15  # draft §3.1

#: Receive deltas count in 250 µs (§3.1.5); the reference time in 64 ms (§3.1), 24 bits, wrapping.
DELTA_TICK_US = 250
REFERENCE_TICK_US = 64_000
REFERENCE_WRAP = 1 << 24

_HEADER = struct.Struct("!BBHII")  # V/P/FMT, PT, length, sender SSRC, media SSRC
_FEEDBACK_FIXED = struct.Struct("!HHI")  # base seq, status count, reference time (24) + fb count (8)
_U16 = struct.Struct("!H")
_I16 = struct.Struct("!h")
_HEADER_SIZE = 20  # RTCP header (4) + SSRCs (8) + transport-cc fixed fields (8)
_MAX_STATUS_COUNT = 0xFFFF
_MAX_RUN = 0x1FFF  # §3.1.3: 13-bit run length
_ONE_BIT = 14  # §3.1.4: a status vector chunk holds 14 one-bit or 7 two-bit symbols
_TWO_BIT = 7

# Packet status symbols (§3.1.1).
NOT_RECEIVED = 0
SMALL_DELTA = 1
LARGE_DELTA = 2


# --- the header extension (§2) ------------------------------------------------------------------------


def pack_transport_seq(seq: int) -> bytes:
    """The extension's 2-byte value: the transport-wide sequence number, big-endian (§2)."""
    return _U16.pack(seq & 0xFFFF)


def unpack_transport_seq(value: bytes) -> int:
    """The transport-wide sequence number in an extension value.

    :raises ValueError: the value is not 2 bytes long.
    """
    if len(value) != 2:
        raise ValueError(f"transport-wide sequence number is 2 bytes, got {len(value)}")
    return int(_U16.unpack(value)[0])


def transport_seq_element(ext_id: int, seq: int) -> bytes:
    """A one-byte-header extension element (RFC 8285 §4.2) carrying ``seq`` under ``ext_id`` (1..14), ready
    to be appended to a packet's other elements."""
    if not 1 <= ext_id <= 14:
        raise ValueError(f"one-byte header extension id must be 1..14, got {ext_id}")
    return bytes(((ext_id << 4) | 1, (seq >> 8) & 0xFF, seq & 0xFF))


def read_transport_seq(packet: bytes, ext_id: int) -> int | None:
    """
    The transport-wide sequence number in a raw (decrypted) RTP packet, or ``None`` when the packet has no
    such extension element or is malformed. Reads one-byte (RFC 8285 §4.2) and two-byte (§4.3) headers.
    """
    try:
        first = packet[0]
        if not first & 0x10:  # X bit
            return None
        offset = 12 + 4 * (first & 0x0F)
        profile = (packet[offset] << 8) | packet[offset + 1]
        end = offset + 4 + 4 * ((packet[offset + 2] << 8) | packet[offset + 3])
        if end > len(packet):
            return None
        i = offset + 4
        if profile == 0xBEDE:
            while i < end:
                byte = packet[i]
                if byte == 0:  # padding
                    i += 1
                    continue
                element_id = byte >> 4
                if element_id == 15:  # reserved: stop parsing (§4.2)
                    return None
                length = (byte & 0x0F) + 1
                if element_id == ext_id:
                    return (packet[i + 1] << 8) | packet[i + 2] if length == 2 and i + 3 <= end else None
                i += 1 + length
        elif profile & 0xFFF0 == 0x1000:
            while i < end:
                element_id = packet[i]
                if element_id == 0:
                    i += 1
                    continue
                length = packet[i + 1]
                if element_id == ext_id:
                    return (packet[i + 2] << 8) | packet[i + 3] if length == 2 and i + 4 <= end else None
                i += 2 + length
    except IndexError:
        return None
    return None


# --- RTCP framing -------------------------------------------------------------------------------------


def iter_rtcp(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """
    Split a (compound) RTCP datagram into its packets: ``(packet type, FMT/count field, packet bytes)``.
    Stops quietly at the first packet that is not version 2 or whose length runs past the datagram
    (RFC 3550 §6.4.1 framing), so garbage never raises.
    """
    offset = 0
    n = len(data)
    while offset + 4 <= n:
        first = data[offset]
        if first >> 6 != 2:
            return
        size = 4 * (((data[offset + 2] << 8) | data[offset + 3]) + 1)
        if offset + size > n:
            return
        yield data[offset + 1], first & 0x1F, data[offset: offset + size]
        offset += size


# --- status chunks (§3.1.3, §3.1.4) -------------------------------------------------------------------


class _ChunkEncoder:
    """
    Greedy packet-status chunk encoder, symbol by symbol, making the same choices as libwebrtc's
    ``TransportFeedback::LastChunk``: one run-length chunk while all symbols are equal, else a one-bit
    vector of 14 (only "not received" and small deltas), else two-bit vectors of 7. Same input, same bytes.
    """

    __slots__ = ("chunks", "symbols", "count", "all_same", "has_large")

    def __init__(self) -> None:
        self.chunks: list[int] = []  # closed chunks
        self.symbols: list[int] = []  # the open chunk's first (up to 14) symbols
        self.count = 0  # symbols in the open chunk
        self.all_same = True
        self.has_large = False

    def can_add(self, symbol: int) -> bool:
        """Whether the open chunk can take ``symbol`` (else adding it closes the chunk first)."""
        count = self.count
        if count < _TWO_BIT:
            return True
        if count < _ONE_BIT and not self.has_large and symbol != LARGE_DELTA:
            return True
        return count < _MAX_RUN and self.all_same and self.symbols[0] == symbol

    def add(self, symbol: int) -> None:
        """Add one status symbol."""
        if not self.can_add(symbol):
            self._emit()
        if self.count < _ONE_BIT:
            self.symbols.append(symbol)
        self.count += 1
        if symbol != self.symbols[0]:
            self.all_same = False
        if symbol == LARGE_DELTA:
            self.has_large = True

    def _emit(self) -> None:
        if self.all_same:
            self.chunks.append((self.symbols[0] << 13) | self.count)
            self._reopen([])
        elif self.count == _ONE_BIT:
            self.chunks.append(_one_bit(self.symbols))
            self._reopen([])
        else:  # 7..13 symbols, a large delta among them: a two-bit vector of the first 7
            self.chunks.append(_two_bit(self.symbols[:_TWO_BIT]))
            self._reopen(self.symbols[_TWO_BIT: self.count])

    def _reopen(self, rest: list[int]) -> None:
        self.symbols = rest
        self.count = len(rest)
        self.all_same = all(s == rest[0] for s in rest)
        self.has_large = LARGE_DELTA in rest

    def finish(self) -> list[int]:
        """All chunks, the open one encoded last as a run, a two-bit or a one-bit vector (what fits)."""
        chunks = list(self.chunks)
        if self.count:
            if self.all_same:
                chunks.append((self.symbols[0] << 13) | self.count)
            elif self.count <= _TWO_BIT:
                chunks.append(_two_bit(self.symbols))
            else:
                chunks.append(_one_bit(self.symbols))
        return chunks


def _one_bit(symbols: list[int]) -> int:
    chunk = 0x8000  # T=1, S=0 (§3.1.4)
    for i, symbol in enumerate(symbols):
        chunk |= symbol << (_ONE_BIT - 1 - i)
    return chunk


def _two_bit(symbols: list[int]) -> int:
    chunk = 0xC000  # T=1, S=1 (§3.1.4)
    for i, symbol in enumerate(symbols):
        chunk |= symbol << (2 * (_TWO_BIT - 1 - i))
    return chunk


def _decode_chunk(chunk: int, remaining: int) -> list[int]:
    if not chunk & 0x8000:  # run length (§3.1.3)
        return [(chunk >> 13) & 0x03] * min(chunk & _MAX_RUN, remaining)
    if not chunk & 0x4000:  # one-bit vector
        return [(chunk >> (_ONE_BIT - 1 - i)) & 1 for i in range(min(_ONE_BIT, remaining))]
    return [(chunk >> (2 * (_TWO_BIT - 1 - i))) & 3 for i in range(min(_TWO_BIT, remaining))]


def _ticks(delta_us: int) -> int:
    """Microseconds to 250 µs ticks, rounded half away from zero (as libwebrtc does)."""
    ticks = (abs(delta_us) + DELTA_TICK_US // 2) // DELTA_TICK_US
    return ticks if delta_us >= 0 else -ticks


# --- receiving side: building feedback ----------------------------------------------------------------


class FeedbackStats:
    """Counters of a :class:`FeedbackRecorder`."""

    __slots__ = ("recorded", "duplicates", "too_old", "feedback_packets")

    def __init__(self) -> None:
        self.recorded = 0
        self.duplicates = 0
        self.too_old = 0
        self.feedback_packets = 0


class FeedbackRecorder:
    """
    The receiving side of transport-cc: remembers when each transport sequence number arrived and writes
    the feedback messages (§3.1) that tell the sender.

    :meth:`record` is on the per-packet path and only appends to a list; the work happens in :meth:`build`,
    which the caller runs every ~50 ms (libwebrtc's default interval is 100 ms, 50..250 ms adaptive).

    Each :meth:`build` reports every sequence number from the first one not yet reported up to the highest
    received, as received (with its arrival time) or not received. A packet that arrives after its number
    was reported lost is reported again in the next feedback (libwebrtc's ``RemoteEstimatorProxy`` does
    the same; senders treat a later "received" as the truth). Arrival times are kept for
    ``back_window_us`` after they were reported; packets older than that are ignored and counted in
    :attr:`stats` ``too_old``. A report that would exceed ``max_packet_size`` bytes, or a receive delta
    beyond ±8.19 s (a signed 16-bit count of 250 µs), starts another feedback packet.

    :param sender_ssrc: the SSRC written as "SSRC of packet sender" (any SSRC of ours).
    :param max_packet_size: the largest RTCP packet to produce, in bytes (SRTCP adds 14 more on the wire).
    """

    __slots__ = ("sender_ssrc", "max_packet_size", "back_window_us", "stats", "_pending", "_arrivals",
                 "_max", "_report_from", "_kept_from", "_feedback_count", "_newest_arrival")

    #: Most sequence numbers kept or reported at once (a wild jump in numbering cannot cost more).
    MAX_SPAN = 0x4000
    #: Numbers this far below the first packet received are still accepted (they arrived reordered).
    START_SLACK = 64

    def __init__(self, sender_ssrc: int, *, max_packet_size: int = 1200, back_window_us: int = 500_000) -> None:
        if max_packet_size < _HEADER_SIZE + 8:
            raise ValueError(f"max_packet_size {max_packet_size} is too small for any feedback")
        self.sender_ssrc = sender_ssrc & 0xFFFFFFFF
        self.max_packet_size = max_packet_size - max_packet_size % 4
        self.back_window_us = back_window_us
        self.stats = FeedbackStats()
        self._pending: list[tuple[int, int]] = []
        self._arrivals: dict[int, int] = {}  # unwrapped sequence number → arrival time (µs)
        self._max: int | None = None  # highest unwrapped sequence number received
        self._report_from = 0  # first unwrapped number the next feedback reports
        self._kept_from = 0  # numbers below this are forgotten
        self._feedback_count = 0  # §3.1: 8-bit feedback packet count
        self._newest_arrival = 0

    def record(self, seq: int, arrival_us: int) -> None:
        """Note that the packet with transport sequence number ``seq`` arrived at ``arrival_us``."""
        pending = self._pending
        pending.append((seq, arrival_us))
        if len(pending) > 8192:  # build() is overdue: keep memory bounded
            self._ingest()

    @property
    def has_unreported(self) -> bool:
        """Whether a :meth:`build` now would produce feedback."""
        return bool(self._pending) or (self._max is not None and self._report_from <= self._max)

    def _ingest(self) -> None:
        pending, self._pending = self._pending, []
        arrivals = self._arrivals
        stats = self.stats
        for seq, arrival in pending:
            stats.recorded += 1
            if self._max is None:
                self._max = self._report_from = seq & 0xFFFF
                self._kept_from = self._max - self.START_SLACK  # packets reordered before the first one
                arrivals[self._max] = arrival
                self._newest_arrival = arrival
                continue
            # Unwrap: the 16-bit number closest to the highest seen.
            ext = self._max + ((seq - self._max + 0x8000) & 0xFFFF) - 0x8000
            if ext < self._kept_from:
                stats.too_old += 1
                continue
            if ext in arrivals:
                stats.duplicates += 1
                continue
            arrivals[ext] = arrival
            if arrival > self._newest_arrival:
                self._newest_arrival = arrival
            if ext > self._max:
                self._max = ext
                if ext - self._kept_from > self.MAX_SPAN:
                    self._forget_below(ext - self.MAX_SPAN)
            elif ext < self._report_from:
                self._report_from = ext  # arrived after being reported lost: report again

    def _forget_below(self, seq: int) -> None:
        for old in range(self._kept_from, seq):
            self._arrivals.pop(old, None)
        self._kept_from = seq
        self._report_from = max(self._report_from, seq)

    def build(self, media_ssrc: int = 0) -> list[bytes]:
        """
        Feedback for everything recorded and not yet reported: zero, one or more transport-cc RTCP packets
        (each a complete RTCP packet, ready to send alone or inside a compound datagram).

        :param media_ssrc: "SSRC of media source"; transport-cc is per transport, senders ignore it
            (libwebrtc writes the SSRC of the last packet received).
        """
        self._ingest()
        if self._max is None or self._report_from > self._max:
            return []
        out: list[bytes] = []
        start, end = self._report_from, self._max + 1
        while start < end:
            packet, start = self._build_one(start, end, media_ssrc & 0xFFFFFFFF)
            if packet is None:
                break
            out.append(packet)
        self._report_from = end
        self._cull()
        self.stats.feedback_packets += len(out)
        return out

    def _build_one(self, start: int, end: int, media_ssrc: int) -> tuple[bytes | None, int]:
        arrivals = self._arrivals
        first = start
        while first < end and first not in arrivals:
            first += 1
        if first == end:
            return None, end
        # §3.1: reference time in 64 ms units; the first delta is relative to it.
        reference = (arrivals[first] // REFERENCE_TICK_US) % REFERENCE_WRAP
        last_us = arrivals[first] - arrivals[first] % REFERENCE_TICK_US
        encoder = _ChunkEncoder()
        deltas = bytearray()
        limit = self.max_packet_size
        size = _HEADER_SIZE
        count = 0
        seq = start
        while seq < end and count < _MAX_STATUS_COUNT:
            arrival = arrivals.get(seq)
            if arrival is None:
                symbol, ticks, delta_size = NOT_RECEIVED, 0, 0
            else:
                ticks = _ticks(arrival - last_us)
                if not -0x8000 <= ticks <= 0x7FFF:
                    break  # §3.1.5: beyond a signed 16-bit delta, start a new feedback packet
                symbol = SMALL_DELTA if 0 <= ticks <= 0xFF else LARGE_DELTA
                delta_size = symbol
            # A status that does not fit the open chunk closes it and opens another (2 bytes).
            new_chunk = 2 if encoder.count == 0 or not encoder.can_add(symbol) else 0
            if size + new_chunk + delta_size > limit:
                break
            encoder.add(symbol)
            size += new_chunk + delta_size
            count += 1
            seq += 1
            if arrival is not None:
                last_us += ticks * DELTA_TICK_US
                if symbol == SMALL_DELTA:
                    deltas.append(ticks)
                else:
                    deltas += _I16.pack(ticks)
        if count == 0:  # cannot happen with max_packet_size >= 28, but never loop forever
            return None, end
        body = bytearray(_FEEDBACK_FIXED.pack(start & 0xFFFF, count, (reference << 8) | self._feedback_count))
        for chunk in encoder.finish():
            body += _U16.pack(chunk)
        body += deltas
        self._feedback_count = (self._feedback_count + 1) & 0xFF
        return _rtcp_packet(body, self.sender_ssrc, media_ssrc), seq

    def _cull(self) -> None:
        """Forget arrivals reported more than ``back_window_us`` ago (by arrival time); the numbers before
        them can no longer be reported, so packets that arrive for them later are too old."""
        cutoff = self._newest_arrival - self.back_window_us
        arrivals = self._arrivals
        seq = self._kept_from
        while seq < self._report_from:
            arrival = arrivals.get(seq)
            if arrival is not None:
                if arrival >= cutoff:
                    break
                del arrivals[seq]
                self._kept_from = seq + 1
            seq += 1


def _rtcp_packet(body: bytes | bytearray, sender_ssrc: int, media_ssrc: int) -> bytes:
    """An RTPFB/FMT 15 packet around ``body``, padded to 32 bits with the P bit and a count byte
    (RFC 3550 §6.4.1; libwebrtc does the same)."""
    padding = -(len(body)) % 4
    length = (12 + len(body) + padding) // 4 - 1
    first = 0x80 | FMT_TRANSPORT_CC | (0x20 if padding else 0)
    out = _HEADER.pack(first, RTCP_RTPFB, length, sender_ssrc, media_ssrc) + bytes(body)
    if padding:
        out += bytes(padding - 1) + bytes((padding,))
    return out


# --- sending side: reading feedback -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransportFeedback:
    """
    One parsed transport-cc message (§3.1).

    ``packets`` lists every reported sequence number (16-bit, in order from ``base_seq``) with its arrival
    time in µs on the remote clock, counted from reference time 0 (``reference_time`` × 64 ms plus the
    receive deltas), or ``None`` when it was reported not received.
    """

    sender_ssrc: int
    media_ssrc: int
    base_seq: int
    reference_time: int
    feedback_count: int
    packets: list[tuple[int, int | None]]


def parse_transport_feedback(packet: bytes) -> TransportFeedback:
    """
    Parse one RTPFB/FMT 15 RTCP packet (as yielded by :func:`iter_rtcp`).

    :raises ValueError: not a transport-cc packet, or malformed: zero status count (not allowed, §3.1),
        chunks or deltas running past the end, a reserved status symbol.
    """
    n = len(packet)
    if n < _HEADER_SIZE + 2:
        raise ValueError(f"transport-cc feedback too short: {n} bytes")
    first, packet_type, length, sender_ssrc, media_ssrc = _HEADER.unpack_from(packet)
    if first >> 6 != 2 or packet_type != RTCP_RTPFB or first & 0x1F != FMT_TRANSPORT_CC:
        raise ValueError("not an RTPFB transport-cc (FMT 15) packet")
    end = min(n, 4 * (length + 1))
    if first & 0x20:  # padding: the last byte counts the padding bytes (RFC 3550 §6.4.1)
        padding = packet[end - 1]
        if padding == 0 or end - padding < _HEADER_SIZE:
            raise ValueError("bad RTCP padding")
        end -= padding
    base_seq, status_count, word = _FEEDBACK_FIXED.unpack_from(packet, 12)
    if status_count == 0:
        raise ValueError("transport-cc feedback with zero packet status count")
    symbols: list[int] = []
    index = _HEADER_SIZE
    while len(symbols) < status_count:
        if index + 2 > end:
            raise ValueError("transport-cc status chunks run past the end")
        symbols += _decode_chunk(_U16.unpack_from(packet, index)[0], status_count - len(symbols))
        index += 2
    reference = word >> 8
    time_us = reference * REFERENCE_TICK_US
    packets: list[tuple[int, int | None]] = []
    for i, symbol in enumerate(symbols):
        seq = (base_seq + i) & 0xFFFF
        if symbol == NOT_RECEIVED:
            packets.append((seq, None))
            continue
        if symbol == SMALL_DELTA:
            if index + 1 > end:
                raise ValueError("transport-cc receive deltas run past the end")
            time_us += packet[index] * DELTA_TICK_US
            index += 1
        elif symbol == LARGE_DELTA:
            if index + 2 > end:
                raise ValueError("transport-cc receive deltas run past the end")
            time_us += _I16.unpack_from(packet, index)[0] * DELTA_TICK_US
            index += 2
        else:
            raise ValueError("transport-cc status symbol 3 is reserved")
        packets.append((seq, time_us))
    return TransportFeedback(sender_ssrc, media_ssrc, base_seq, reference, word & 0xFF, packets)


class FeedbackReader:
    """
    The sending side: reads the transport-cc feedback in RTCP datagrams from one remote peer and returns
    ``(transport sequence number, arrival time in µs or None)`` for a send-side estimator
    (:class:`chorus.sfu.bwe.SendSideBwe`).

    Arrival times are kept on one continuous time line across messages by unwrapping the 24-bit reference
    time (it wraps every 12.4 days) against the previous message's. Malformed messages are skipped and
    counted in :attr:`errors`; other RTCP packets are ignored.
    """

    __slots__ = ("errors", "messages", "_reference")

    def __init__(self) -> None:
        self.errors = 0
        self.messages = 0
        self._reference: int | None = None  # unwrapped reference time of the last message

    def read(self, data: bytes) -> list[tuple[int, int | None]]:
        """Every packet status in the transport-cc messages of one RTCP datagram, in message order."""
        out: list[tuple[int, int | None]] = []
        for packet_type, fmt, packet in iter_rtcp(data):
            if packet_type != RTCP_RTPFB or fmt != FMT_TRANSPORT_CC:
                continue
            try:
                feedback = parse_transport_feedback(packet)
            except ValueError:
                self.errors += 1
                continue
            self.messages += 1
            out += self.unwrap(feedback)
        return out

    def unwrap(self, feedback: TransportFeedback) -> list[tuple[int, int | None]]:
        """``feedback.packets`` with arrival times moved onto this reader's continuous time line."""
        reference = feedback.reference_time
        if self._reference is None:
            unwrapped = reference
        else:
            last = self._reference
            unwrapped = last + ((reference - last + REFERENCE_WRAP // 2) % REFERENCE_WRAP) - REFERENCE_WRAP // 2
        self._reference = unwrapped
        shift = (unwrapped - reference) * REFERENCE_TICK_US
        if not shift:
            return feedback.packets
        return [(seq, None if t is None else t + shift) for seq, t in feedback.packets]
