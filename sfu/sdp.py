"""SDP helpers for the publish and subscribe transports: a checked parse, mDNS candidates, trickled candidates."""

from __future__ import annotations

from typing import Any

from aiortc import RTCIceCandidate
from aiortc.sdp import SessionDescription, candidate_from_sdp

from .errors import InvalidSdpError


def strip_mdns_candidates(sdp: str) -> str:
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


def parse_candidate(candidate: dict[str, Any]) -> RTCIceCandidate | None:
    """
    A trickled candidate (``{"candidate": "candidate:…", "sdpMid", "sdpMLineIndex"}``) as aiortc takes it, or
    ``None`` for one to ignore (end of candidates, mDNS).

    :raises InvalidSdpError: the candidate line cannot be parsed.
    """
    line = str(candidate.get("candidate") or "")
    if not line or ".local " in line:
        return None
    try:
        ice = candidate_from_sdp(line.removeprefix("candidate:").removeprefix("a=candidate:"))
    except Exception as exc:
        raise InvalidSdpError(f"bad ICE candidate: {type(exc).__name__}: {exc}") from exc
    ice.sdpMid = candidate.get("sdpMid")
    ice.sdpMLineIndex = candidate.get("sdpMLineIndex")
    if ice.sdpMid is None and ice.sdpMLineIndex is None:
        ice.sdpMLineIndex = 0
    return ice


def offer_transport_cc(sdp: str, ext_id: int) -> str:
    """
    A subscribe offer written by aiortc, with transport-wide congestion control offered on every audio and video
    m-section: the transport-wide-cc ``a=extmap`` (``ext_id``, one ID for the whole bundle) and
    ``a=rtcp-fb:<pt> transport-cc`` for each payload type but RTX (aiortc offers neither).
    """
    newline = "\r\n" if "\r\n" in sdp else "\n"
    out: list[str] = []
    section: list[str] = []

    def flush() -> None:
        if section and section[0].startswith(("m=audio", "m=video")):
            rtx = {line.split()[0][9:] for line in section
                   if line.startswith("a=rtpmap:") and line.split()[-1].lower().startswith("rtx/")}
            payload_types = [pt for pt in section[0].split()[3:] if pt not in rtx]
            anchor = max((i for i, line in enumerate(section) if line.startswith(("a=extmap:", "a=mid:"))), default=0)
            section.insert(anchor + 1, f"a=extmap:{ext_id} {TRANSPORT_CC_URI}")
            for pt in payload_types:
                rtpmap = [i for i, line in enumerate(section)
                          if line.startswith((f"a=rtpmap:{pt} ", f"a=rtcp-fb:{pt} "))]
                if rtpmap:
                    section.insert(max(rtpmap) + 1, f"a=rtcp-fb:{pt} transport-cc")
        out.extend(section)
        section.clear()

    for line in sdp.splitlines():
        if line.startswith("m="):
            flush()
        (section if section or line.startswith("m=") else out).append(line)
    flush()
    return newline.join(out) + newline


#: The transport-wide congestion control header extension (draft-holmer-rmcat-transport-wide-cc-extensions-01).
TRANSPORT_CC_URI = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
