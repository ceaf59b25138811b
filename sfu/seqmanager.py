"""
Output numbering for a forwarded stream whose input changes: sequence numbers that stay contiguous when the
server drops packets (temporal layers above the target, redundant RTX) or switches between simulcast streams,
and RTP timestamps rebased on a switch.

:class:`SeqManager` follows mediasoup's ``SeqManager`` semantics (``Input``/``Drop``/``Sync``): a dropped
input number is skipped, every later one shifted down by one, so the receiver sees no gap (a gap means loss:
NACKs, then a keyframe request when the retransmissions cannot come). Internally it works on unwrapped
(64-bit) numbers, so it is exact across the 16-bit wrap.

:class:`TimestampRebaser` keeps RTP timestamps continuous across switches by the wall time elapsed since the
last packet sent, as Chorus's ``Consumer`` and Janus's ``janus_rtp_header_update`` do (no sender report
needed; simulcast streams have independent random timestamp bases).
"""

from __future__ import annotations

import random
from bisect import bisect_left


class SeqManager:
    """
    Input → output RTP sequence numbers for one subscriber's stream.

    * :meth:`forward` maps an input number to its output number (``None``: the number was dropped before, is
      older than the current source's first packet, or is too old to place).
    * :meth:`drop` skips an input number: later numbers close up behind it. Only numbers newer than every
      number seen can be dropped this way; dropping an older one (it arrived late) cannot renumber what was
      already sent, so its output number stays a gap, like a loss (counted in :attr:`late_drops`).
    * :meth:`switch` makes the next input number (the first packet of another source, e.g. a simulcast
      stream's key frame) follow the last output number.

    Reordered inputs keep their order in the output. Numbers more than :attr:`WINDOW` behind the newest are
    too old (``None``); a number more than :attr:`WINDOW` ahead is a discontinuity (a long outage): numbering
    starts over from it, without a gap, as on a switch. The caller must pass one source's packets at a time
    (after a switch, stragglers of the previous source are its to discard: their numbers mean nothing here).

    :param first_output: the output number of the first packet (random by default, RFC 3550 §5.1).
    """

    WINDOW = 0x2000

    __slots__ = ("_base", "_max_in", "_max_out", "_floor", "_drops", "_inserts", "_pending", "late_drops")

    def __init__(self, first_output: int | None = None) -> None:
        start = random.randint(0, 0xFFFF) if first_output is None else first_output & 0xFFFF
        self._base = 0  # output = input + base − (drops below input), all unwrapped
        self._max_in = 0
        self._max_out = start - 1  # so that the first packet gets ``start``
        self._floor = 0  # inputs below this belong to an earlier source
        self._drops: list[int] = []  # dropped unwrapped inputs, ascending
        self._inserts: list[int] = []  # newest unwrapped input at each insert(), ascending
        self._pending = True  # the next input starts a source
        #: Drops that came too late to renumber around (each left a gap).
        self.late_drops = 0

    @property
    def last_output(self) -> int:
        """The highest output number given (16-bit)."""
        return self._max_out & 0xFFFF

    def switch(self) -> None:
        """The next input number starts a new source: it will follow the last output number."""
        self._pending = True

    def _unwrap(self, seq: int) -> int:
        if self._pending:
            self._pending = False
            self._drops.clear()
            self._inserts.clear()
            ext = self._floor = seq & 0xFFFF
            self._max_in = ext - 1  # so that this number counts as the newest, forwarded or dropped
            self._base = self._max_out + 1 - ext
            return ext
        max_in = self._max_in
        ext = max_in + ((seq - max_in + 0x8000) & 0xFFFF) - 0x8000
        if ext > max_in + self.WINDOW:
            # A jump forward beyond the window (a long outage, or a stranger's number): start over from it,
            # without a gap, as on a switch.
            self._pending = True
            return self._unwrap(seq)
        return ext

    def forward(self, seq: int) -> int | None:
        """The output number for input ``seq``, or ``None`` not to send it (see the class docstring)."""
        ext = self._unwrap(seq)
        if ext < self._floor or ext < self._max_in - self.WINDOW:
            return None
        drops = self._drops
        below = 0
        if drops:
            below = bisect_left(drops, ext)
            if below < len(drops) and drops[below] == ext:
                return None  # dropped before (e.g. a retransmission of a dropped packet)
        if self._inserts:
            below -= bisect_left(self._inserts, ext)  # numbers taken by inserts before this input
        out = ext + self._base - below
        if ext > self._max_in:
            self._max_in = ext
            if (drops and drops[0] < ext - self.WINDOW) or (self._inserts and self._inserts[0] < ext - self.WINDOW):
                self._fold()
        if out > self._max_out:
            self._max_out = out
        return out & 0xFFFF

    def drop(self, seq: int) -> None:
        """Skip input ``seq``: it will not be sent, and later numbers close up behind it."""
        ext = self._unwrap(seq)
        if ext > self._max_in:
            self._drops.append(ext)
            self._max_in = ext
        elif ext >= self._floor and ext not in self._drops:
            self.late_drops += 1

    def insert(self) -> int:
        """
        An output number for a packet that has no input (a padding packet probing the link): the one after the
        last given. Inputs newer than every input seen so far move up by one to make room; a late older one
        keeps its place.
        """
        self._max_out += 1
        if self._pending:
            # Nothing forwarded from the next source yet: its first packet simply follows this number.
            return self._max_out & 0xFFFF
        self._inserts.append(self._max_in)
        return self._max_out & 0xFFFF

    def _fold(self) -> None:
        """Drops and inserts older than the window can no longer be passed by an input: fold them into the
        base."""
        limit = self._max_in - self.WINDOW
        drops = self._drops
        n = bisect_left(drops, limit)
        del drops[:n]
        self._base -= n
        inserts = self._inserts
        n = bisect_left(inserts, limit)
        del inserts[:n]
        self._base += n


class TimestampRebaser:
    """
    Output RTP timestamps for one subscriber's stream: ``input + offset``, the offset fixed when forwarding
    (re)starts on a source (:meth:`switch`) so that its first packet's timestamp is the last one sent plus the
    wall time elapsed since (at least 1 ms), in the codec's clock.

    Times are seconds as floats (the forwarding path's ``now``).

    :param clock_rate: the codec's RTP clock rate (90000 for video, 48000 for Opus).
    :param first_output: the first timestamp sent (random by default, RFC 3550 §5.1).
    """

    __slots__ = ("clock_rate", "_offset", "_last", "_last_time", "_started", "_pending")

    def __init__(self, clock_rate: int, first_output: int | None = None) -> None:
        self.clock_rate = clock_rate
        self._offset = 0
        self._last = random.getrandbits(32) if first_output is None else first_output & 0xFFFFFFFF
        self._last_time = 0.0
        self._started = False
        self._pending = True

    @property
    def last_output(self) -> int:
        """The newest timestamp sent."""
        return self._last

    def switch(self) -> None:
        """The next packet starts a new source (or forwarding resumes after a pause)."""
        self._pending = True

    def rewrite(self, timestamp: int, now: float) -> int:
        """The output timestamp for a packet with input ``timestamp`` being sent at ``now``."""
        if self._pending:
            self._pending = False
            if self._started:
                elapsed = max(now - self._last_time, 0.001)
                target = (self._last + int(elapsed * self.clock_rate)) & 0xFFFFFFFF
            else:
                target = self._last
            self._offset = (target - timestamp) & 0xFFFFFFFF
            self._started = True
            self._last = target
            self._last_time = now
            return target
        out = (timestamp + self._offset) & 0xFFFFFFFF
        if out != self._last and (out - self._last) & 0xFFFFFFFF < 0x80000000:  # newer (RFC 3550 serial)
            self._last = out
            self._last_time = now
        return out
