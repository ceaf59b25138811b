"""
SDP for simulcast ingest and transport-wide congestion control, on plain SDP text (aiortc 1.16 neither parses
nor writes ``a=rid``/``a=simulcast``).

* :func:`parse_offer` reads each m-section of a publisher's offer: its MID, the header extension IDs Chorus
  needs, the payload types offered with ``transport-cc`` feedback, and its simulcast description — ``a=rid``
  (RFC 8851 §4) and ``a=simulcast`` (RFC 8853 §5.1), validated: at most :data:`MAX_LAYERS` streams, RIDs of
  ``[A-Za-z0-9_-]{1,16}`` (16: the most a one-byte header extension carries, RFC 8285 §4.2), every RID of
  ``a=simulcast`` declared by an ``a=rid … send`` line, no duplicates. Anything else is a
  :class:`SimulcastSdpError` (an ``invalid_sdp`` :class:`~.errors.InvalidSdpError` and a ``ValueError``).
* :func:`patch_answer` adds to aiortc's answer what makes the browser send all its layers and transport-cc:
  ``a=rid:<rid> recv`` and ``a=simulcast:recv …`` (without them libwebrtc keeps only the first encoding,
  ``SimulcastIsRejected``), the MID, RID, repaired-RID and transport-wide-cc ``a=extmap`` lines with the
  offer's IDs, and ``a=rtcp-fb:<pt> transport-cc`` (dropping ``goog-remb``: a browser with transport-cc
  stops sending REMB anyway).

**Layer order.** RIDs are names (Chromium uses q, h, f; others 0, 1, 2 or l, m, h). A layer's place is its
place in ``a=simulcast``, read as lowest resolution first — the order Chromium and Firefox list their
encodings in, scaled down the most first. When every layer carries a ``max-height`` (else ``max-width``)
restriction, that orders them instead. ``~`` (paused) streams are answered paused, as offered; of ``,``
alternatives the first is taken (RFC 8853 §5.3.2 lets the answerer choose).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import InvalidSdpError
from .twcc import TWCC_URI

MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
RID_URI = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
REPAIRED_RID_URI = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"

#: The most simulcast streams accepted in one m-section.
MAX_LAYERS = 3

_RID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_TOKEN = re.compile(r"[A-Za-z0-9_.!%*+`'~-]+")  # RFC 4566 token, for restriction names
_EXTMAP = re.compile(r"a=extmap:(\d+)(?:/(?:sendrecv|sendonly|recvonly|inactive))?\s+(\S+)")
_RTCP_FB = re.compile(r"a=rtcp-fb:(\d+|\*)\s+(.+)")
_URIS = (MID_URI, RID_URI, REPAIRED_RID_URI, TWCC_URI)


class SimulcastSdpError(InvalidSdpError, ValueError):
    """A simulcast description that is malformed or more than Chorus takes (``invalid_sdp``)."""


@dataclass(frozen=True, slots=True)
class RidLine:
    """One ``a=rid`` line (RFC 8851 §10): the RID, ``send``/``recv``, payload types (``pt=``) and
    restrictions (``max-width=1280`` …, as text)."""

    rid: str
    direction: str
    payload_types: tuple[int, ...] = ()
    restrictions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SimulcastLayer:
    """One simulcast stream of an offer, at ``index`` in spatial order (0: the lowest resolution)."""

    rid: str
    index: int
    paused: bool = False
    restrictions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Simulcast:
    """The simulcast streams an m-section offers to send, as listed in ``a=simulcast`` (each with its spatial
    ``index``; :meth:`spatial` sorts them lowest first)."""

    layers: tuple[SimulcastLayer, ...]

    @property
    def rids(self) -> tuple[str, ...]:
        """RIDs, lowest resolution first."""
        return tuple(layer.rid for layer in self.spatial())

    def spatial(self) -> list[SimulcastLayer]:
        """The layers, lowest resolution first."""
        return sorted(self.layers, key=lambda layer: layer.index)

    def index(self, rid: str) -> int | None:
        """The spatial index of ``rid`` (0: lowest), ``None`` for a RID not offered (garbage on the wire)."""
        for layer in self.layers:
            if layer.rid == rid:
                return layer.index
        return None

    def answer_lines(self) -> list[str]:
        """``a=rid:<rid> recv`` for each stream, then ``a=simulcast:recv …`` (offer order, pauses kept)."""
        listed = ";".join(("~" if layer.paused else "") + layer.rid for layer in self.layers)
        return [*(f"a=rid:{layer.rid} recv" for layer in self.layers), f"a=simulcast:recv {listed}"]


@dataclass(frozen=True, slots=True)
class OfferedMedia:
    """What :func:`parse_offer` reads from one m-section."""

    index: int
    kind: str
    mid: str | None
    #: Header extension IDs by URI, for the URIs Chorus uses (MID, RID, repaired RID, transport-wide-cc).
    extmap: Mapping[str, int]
    #: Payload types offered with ``a=rtcp-fb:<pt> transport-cc``.
    transport_cc: frozenset[int]
    simulcast: Simulcast | None


def parse_offer(sdp: str, *, max_layers: int = MAX_LAYERS) -> list[OfferedMedia]:
    """
    Every m-section of an offer, with its simulcast description when it has one.

    :raises SimulcastSdpError: a malformed or unacceptable ``a=rid``/``a=simulcast``/needed ``a=extmap``.
    """
    return [_parse_section(i, lines, max_layers) for i, lines in enumerate(_sections(sdp)[1])]


def _sections(sdp: str) -> tuple[list[str], list[list[str]]]:
    """The session lines and each m-section's lines (``m=`` line first), without line endings."""
    session: list[str] = []
    sections: list[list[str]] = []
    for line in sdp.splitlines():
        if line.startswith("m="):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
        else:
            session.append(line)
    return session, sections


def _parse_section(index: int, lines: list[str], max_layers: int) -> OfferedMedia:
    kind = lines[0][2:].split(" ", 1)[0]
    mid: str | None = None
    extmap: dict[str, int] = {}
    transport_cc: set[int] = set()
    rid_lines: list[str] = []
    simulcast_lines: list[str] = []
    for line in lines[1:]:
        line = line.strip()
        if line.startswith("a=mid:"):
            mid = line[6:].strip()
        elif line.startswith("a=extmap:"):
            match = _EXTMAP.match(line)
            if match is not None and match.group(2) in _URIS:
                ext_id = int(match.group(1))
                if not 1 <= ext_id <= 255:
                    raise SimulcastSdpError(f"a=extmap id {ext_id} for {match.group(2)} is out of range")
                extmap[match.group(2)] = ext_id
            elif any(uri in line for uri in _URIS):
                raise SimulcastSdpError(f"malformed a=extmap line: {line[:80]!r}")
        elif line.startswith("a=rtcp-fb:"):
            fb = _RTCP_FB.fullmatch(line)
            if fb is not None and fb.group(2).strip() == "transport-cc" and fb.group(1) != "*":
                transport_cc.add(int(fb.group(1)))
        elif line.startswith("a=rid:"):
            rid_lines.append(line[6:])
        elif line.startswith("a=simulcast:"):
            simulcast_lines.append(line[12:])
    rids = _parse_rids(rid_lines)
    simulcast = _parse_simulcast(simulcast_lines, rids, max_layers) if simulcast_lines else None
    if simulcast is not None and RID_URI not in extmap:
        raise SimulcastSdpError(f"simulcast needs the {RID_URI} header extension (a=extmap)")
    return OfferedMedia(index, kind, mid, extmap, frozenset(transport_cc), simulcast)


def _parse_rids(values: list[str]) -> dict[tuple[str, str], RidLine]:
    """``a=rid`` values by (RID, direction). RFC 8851 §10:
    ``rid-syntax = "a=rid:" rid-id SP rid-dir [ rid-pt-param-list / rid-param-list ]``."""
    out: dict[tuple[str, str], RidLine] = {}
    for value in values:
        parts = value.split()
        if len(parts) not in (2, 3):
            raise SimulcastSdpError(f"malformed a=rid line: {value[:80]!r}")
        rid, direction = parts[0], parts[1]
        if not _RID.fullmatch(rid):
            raise SimulcastSdpError(f"a=rid: RID {rid[:40]!r} is not 1-16 letters, digits, '-' or '_'")
        if direction not in ("send", "recv"):
            raise SimulcastSdpError(f"a=rid:{rid}: direction must be send or recv, not {direction[:20]!r}")
        payload_types: tuple[int, ...] = ()
        restrictions: dict[str, str] = {}
        if len(parts) == 3:
            for param in parts[2].split(";"):
                name, sep, param_value = param.partition("=")
                if not sep or not _TOKEN.fullmatch(name) or not param_value:
                    raise SimulcastSdpError(f"a=rid:{rid}: malformed restriction {param[:40]!r}")
                if name == "pt":
                    try:
                        payload_types = tuple(int(pt) for pt in param_value.split(","))
                    except ValueError:
                        raise SimulcastSdpError(f"a=rid:{rid}: malformed pt= list {param_value[:40]!r}") from None
                    if any(not 0 <= pt <= 127 for pt in payload_types):
                        raise SimulcastSdpError(f"a=rid:{rid}: payload type out of range")
                elif name in restrictions:
                    raise SimulcastSdpError(f"a=rid:{rid}: restriction {name} given twice")
                else:
                    restrictions[name] = param_value
        if (rid, direction) in out:
            raise SimulcastSdpError(f"a=rid:{rid} {direction} declared twice")
        out[(rid, direction)] = RidLine(rid, direction, payload_types, restrictions)
    return out


def _parse_simulcast(values: list[str], rids: dict[tuple[str, str], RidLine], max_layers: int) -> Simulcast | None:
    """RFC 8853 §5.1: ``sc-value = ( sc-send [SP sc-recv] ) / ( sc-recv [SP sc-send] )``,
    ``sc-str-list = sc-alt-list *( ";" sc-alt-list )``, ``sc-alt-list = sc-id *( "," sc-id )``,
    ``sc-id = [ "~" ] rid-id``. Returns the send direction's streams (``None`` if it only receives)."""
    if len(values) > 1:
        raise SimulcastSdpError("more than one a=simulcast line in an m-section")
    tokens = values[0].split()
    if not tokens or len(tokens) % 2:
        raise SimulcastSdpError(f"malformed a=simulcast: {values[0][:80]!r}")
    lists: dict[str, str] = {}
    for direction, listed in zip(tokens[::2], tokens[1::2], strict=True):
        if direction not in ("send", "recv") or direction in lists:
            raise SimulcastSdpError(f"a=simulcast: unexpected {direction[:20]!r} (want send and/or recv once)")
        lists[direction] = listed
    if "send" not in lists:
        return None
    layers: list[SimulcastLayer] = []
    seen: set[str] = set()
    for alternatives in lists["send"].split(";"):
        chosen: tuple[str, bool] | None = None
        for sc_id in alternatives.split(","):
            paused = sc_id.startswith("~")
            rid = sc_id[1:] if paused else sc_id
            if rid.startswith("rid="):
                raise SimulcastSdpError("a=simulcast uses the draft syntax 'rid=…'; RFC 8853 lists RIDs only")
            if not _RID.fullmatch(rid):
                raise SimulcastSdpError(f"a=simulcast: RID {rid[:40]!r} is not 1-16 letters, digits, '-' or '_'")
            if rid in seen:
                raise SimulcastSdpError(f"a=simulcast: RID {rid} listed twice")
            seen.add(rid)
            if (rid, "send") not in rids:
                raise SimulcastSdpError(f"a=simulcast: RID {rid} has no 'a=rid:{rid} send' line")
            if chosen is None:
                chosen = (rid, paused)
        assert chosen is not None  # split() always yields one item, validated above
        rid, paused = chosen
        layers.append(SimulcastLayer(rid, len(layers), paused, rids[(rid, "send")].restrictions))
    if len(layers) > max_layers:
        raise SimulcastSdpError(f"a=simulcast offers {len(layers)} streams, at most {max_layers} are accepted")
    for key in ("max-height", "max-width"):
        if all(layer.restrictions.get(key, "").isdigit() for layer in layers):
            rank = {layer.rid: i for i, layer in enumerate(sorted(layers, key=lambda x: int(x.restrictions[key])))}
            layers = [SimulcastLayer(layer.rid, rank[layer.rid], layer.paused, layer.restrictions) for layer in layers]
            break
    return Simulcast(tuple(layers))


def patch_answer(answer_sdp: str, offer: list[OfferedMedia], *, simulcast: bool = True,
                 transport_cc: bool = True) -> str:
    """
    ``answer_sdp`` (aiortc's answer to the offer :func:`parse_offer` read) with, in each accepted m-section
    whose MID the offer has:

    * with ``simulcast`` and a simulcast offer: ``a=extmap`` for MID, RID and repaired RID (offer IDs), then
      :meth:`Simulcast.answer_lines`;
    * with ``transport_cc`` and transport-cc offered: ``a=extmap`` for transport-wide-cc, and
      ``a=rtcp-fb:<pt> transport-cc`` instead of ``goog-remb`` for each answered payload type the offer gave
      transport-cc.

    Lines already there are not repeated. Line endings follow the answer's.

    :raises SimulcastSdpError: an ID the offer uses for one of these is used by the answer for another URI.
    """
    newline = "\r\n" if "\r\n" in answer_sdp else "\n"
    session, sections = _sections(answer_sdp)
    by_mid = {media.mid: media for media in offer if media.mid is not None}
    out = list(session)
    for lines in sections:
        mid = next((line[6:].strip() for line in lines if line.startswith("a=mid:")), None)
        media = by_mid.get(mid) if mid is not None else None
        fields = lines[0].split()
        if media is None or len(fields) < 4 or fields[1] == "0":  # unknown, or rejected (port 0)
            out += lines
            continue
        out += _patch_section(lines, media, simulcast=simulcast, transport_cc=transport_cc)
    return newline.join(out) + newline


def _patch_section(lines: list[str], media: OfferedMedia, *, simulcast: bool, transport_cc: bool) -> list[str]:
    lines = list(lines)
    present: dict[int, str] = {}
    for line in lines:
        match = _EXTMAP.match(line)
        if match is not None:
            present[int(match.group(1))] = match.group(2)
    wanted: list[str] = []
    if simulcast and media.simulcast is not None:
        wanted += [MID_URI, RID_URI, REPAIRED_RID_URI]
    use_twcc = transport_cc and bool(media.transport_cc)
    if use_twcc:
        wanted.append(TWCC_URI)
    extmaps = []
    for uri in wanted:
        ext_id = media.extmap.get(uri)
        if ext_id is None or uri in present.values():
            continue
        if ext_id in present:
            raise SimulcastSdpError(f"a=extmap id {ext_id} is {present[ext_id]} in the answer, {uri} in the offer")
        present[ext_id] = uri
        extmaps.append(f"a=extmap:{ext_id} {uri}")
    if extmaps:
        anchor = max((i for i, line in enumerate(lines) if line.startswith(("a=extmap:", "a=mid:"))), default=0)
        lines[anchor + 1: anchor + 1] = extmaps
    if use_twcc:
        answered = set(lines[0].split()[3:])
        for pt in sorted(media.transport_cc):
            if str(pt) not in answered:
                continue
            feedback = [i for i, line in enumerate(lines) if line.startswith(f"a=rtcp-fb:{pt} ")]
            kinds = {lines[i].split(" ", 1)[1].strip() for i in feedback}
            lines = [line for line in lines if line.strip() != f"a=rtcp-fb:{pt} goog-remb"]
            if "transport-cc" not in kinds:
                rtpmap = [i for i, line in enumerate(lines) if line.startswith((f"a=rtpmap:{pt} ", f"a=rtcp-fb:{pt} "))]
                lines.insert((max(rtpmap) if rtpmap else len(lines) - 1) + 1, f"a=rtcp-fb:{pt} transport-cc")
    if simulcast and media.simulcast is not None and not any(line.startswith("a=simulcast:") for line in lines):
        lines += media.simulcast.answer_lines()
    return lines
