"""Simulcast SDP (RFC 8851 a=rid, RFC 8853 a=simulcast) and transport-cc in the answer, on Chromium 156's offer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import SessionDescription
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus.sfu.errors import InvalidSdpError
from chorus.sfu.simulcast import (
    MAX_LAYERS,
    MID_URI,
    REPAIRED_RID_URI,
    RID_URI,
    SimulcastSdpError,
    parse_offer,
    patch_answer,
)
from chorus.sfu.twcc import TWCC_URI

OFFER = (Path(__file__).parent / "fixtures" / "chromium156_simulcast_offer.sdp").read_text()
SIMULCAST_LINES = "a=rid:q send\na=rid:h send\na=rid:f send\na=simulcast:send q;h;f\n"


def with_simulcast(lines: str) -> str:
    """The fixture with its rid/simulcast lines replaced by ``lines``."""
    assert SIMULCAST_LINES in OFFER
    return OFFER.replace(SIMULCAST_LINES, lines)


def test_chromium_offer() -> None:
    [media] = parse_offer(OFFER)
    assert (media.kind, media.mid) == ("video", "0")
    assert media.extmap == {MID_URI: 9, RID_URI: 10, REPAIRED_RID_URI: 11, TWCC_URI: 4}
    assert 96 in media.transport_cc and 97 not in media.transport_cc  # VP8 yes, its RTX no
    assert media.simulcast is not None
    assert media.simulcast.rids == ("q", "h", "f")  # a=simulcast order: lowest resolution first
    assert [media.simulcast.index(r) for r in ("q", "h", "f", "x")] == [0, 1, 2, None]
    assert media.simulcast.answer_lines() == ["a=rid:q recv", "a=rid:h recv", "a=rid:f recv",
                                              "a=simulcast:recv q;h;f"]


async def aiortc_answer(offer: str) -> str:
    pc = RTCPeerConnection()
    try:
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


async def test_patched_aiortc_answer_accepts_all_layers_and_transport_cc() -> None:
    plain = await aiortc_answer(OFFER)
    assert "a=simulcast" not in plain and "transport-cc" not in plain  # what aiortc 1.16 answers by itself
    answer = patch_answer(plain, parse_offer(OFFER))
    assert answer.count("a=rid:") == 3 and re.findall(r"a=rid:(\w+) recv", answer) == ["q", "h", "f"]
    assert "a=simulcast:recv q;h;f\r\n" in answer
    for ext_id, uri in ((9, MID_URI), (10, RID_URI), (11, REPAIRED_RID_URI), (4, TWCC_URI)):
        assert answer.count(f"a=extmap:{ext_id} {uri}\r\n") == 1
    video_pts = SessionDescription.parse(answer).media[0].fmt
    vp8 = next(pt for pt in video_pts if f"a=rtpmap:{pt} VP8/90000" in answer)
    assert f"a=rtcp-fb:{vp8} transport-cc\r\n" in answer
    assert "goog-remb" not in answer
    assert all(line for line in answer.split("\r\n")[:-1])  # no empty lines, CRLF kept
    # aiortc still parses it (and nothing else in the answer changed).
    parsed = SessionDescription.parse(answer)
    assert parsed.media[0].rtp.muxId == "0"
    assert set(plain.split("\r\n")) - set(answer.split("\r\n")) == {
        line for line in plain.split("\r\n") if line.endswith("goog-remb")}
    assert patch_answer(answer, parse_offer(OFFER)) == answer  # idempotent


async def test_patch_can_do_transport_cc_alone() -> None:
    plain = await aiortc_answer(OFFER)
    answer = patch_answer(plain, parse_offer(OFFER), simulcast=False)
    assert "a=rid" not in answer and "a=simulcast" not in answer and f"a=extmap:4 {TWCC_URI}" in answer
    untouched = patch_answer(plain, parse_offer(OFFER), simulcast=False, transport_cc=False)
    assert untouched == plain


def test_paused_and_alternatives() -> None:
    lines = "a=rid:1 send\na=rid:2 send\na=rid:2b send\na=rid:3 send\na=simulcast:send ~1;2,2b;3 recv 9\n"
    [media] = parse_offer(with_simulcast(lines))
    assert media.simulcast is not None
    assert [(lay.rid, lay.index, lay.paused) for lay in media.simulcast.layers] == [
        ("1", 0, True), ("2", 1, False), ("3", 2, False)]
    assert media.simulcast.answer_lines()[-1] == "a=simulcast:recv ~1;2;3"


def test_restrictions_order_layers_when_all_have_them() -> None:
    lines = ("a=rid:hi send max-height=720;max-width=1280\na=rid:lo send pt=96;max-height=180\n"
             "a=rid:mid send max-height=360\na=simulcast:send hi;lo;mid\n")
    [media] = parse_offer(with_simulcast(lines))
    assert media.simulcast is not None
    assert media.simulcast.rids == ("lo", "mid", "hi")
    assert media.simulcast.answer_lines()[-1] == "a=simulcast:recv hi;lo;mid"  # answered as offered


def test_rid_lines_without_simulcast_are_not_simulcast() -> None:
    [media] = parse_offer(with_simulcast("a=rid:q send\n"))
    assert media.simulcast is None
    [media] = parse_offer(with_simulcast("a=rid:q recv\na=simulcast:recv q\n"))  # receive-only: not ours
    assert media.simulcast is None


@pytest.mark.parametrize(("lines", "message"), [
    ("a=rid:a send\na=rid:b send\na=rid:c send\na=rid:d send\na=simulcast:send a;b;c;d\n", "at most 3"),
    ("a=rid:q send\na=simulcast:send q;h\n", "no 'a=rid:h send'"),
    ("a=rid:q recv\na=simulcast:send q\n", "no 'a=rid:q send'"),
    ("a=rid:q send\na=rid:q send\na=simulcast:send q\n", "declared twice"),
    ("a=rid:q send\na=simulcast:send q;q\n", "listed twice"),
    ("a=rid:q!x send\na=simulcast:send q\n", "not 1-16"),
    ("a=rid:" + "x" * 17 + " send\na=simulcast:send q\n", "not 1-16"),
    ("a=rid:q sideways\na=simulcast:send q\n", "direction"),
    ("a=rid:q\na=simulcast:send q\n", "malformed a=rid"),
    ("a=rid:q send max-width\na=simulcast:send q\n", "malformed restriction"),
    ("a=rid:q send pt=96,x\na=simulcast:send q\n", "pt= list"),
    ("a=rid:q send pt=300\na=simulcast:send q\n", "out of range"),
    ("a=rid:q send max-fps=30;max-fps=15\na=simulcast:send q\n", "given twice"),
    ("a=rid:q send\na=simulcast:send\n", "malformed a=simulcast"),
    ("a=rid:q send\na=simulcast:send q send q\n", "unexpected"),
    ("a=rid:q send\na=simulcast:sendq\n", "malformed"),
    ("a=rid:q send\na=simulcast: send rid=q\n", "draft syntax"),
    ("a=rid:q send\na=simulcast:send q;;\n", "not 1-16"),
    ("a=rid:q send\na=simulcast:send q\na=simulcast:send q\n", "more than one"),
])
def test_malformed_is_rejected_clearly(lines: str, message: str) -> None:
    with pytest.raises(SimulcastSdpError, match=re.escape(message)) as info:
        parse_offer(with_simulcast(lines))
    assert isinstance(info.value, InvalidSdpError) and isinstance(info.value, ValueError)
    assert info.value.code == "invalid_sdp"


def test_more_layers_can_be_allowed() -> None:
    lines = "a=rid:a send\na=rid:b send\na=rid:c send\na=rid:d send\na=simulcast:send a;b;c;d\n"
    [media] = parse_offer(with_simulcast(lines), max_layers=MAX_LAYERS + 1)
    assert media.simulcast is not None and len(media.simulcast.layers) == 4


def test_simulcast_needs_the_rid_extension() -> None:
    offer = OFFER.replace("a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\n", "")
    with pytest.raises(SimulcastSdpError, match="rtp-stream-id"):
        parse_offer(offer)
    with pytest.raises(SimulcastSdpError, match="out of range"):
        parse_offer(OFFER.replace("a=extmap:10 urn", "a=extmap:0 urn"))
    with pytest.raises(SimulcastSdpError, match="malformed a=extmap"):
        parse_offer(OFFER.replace("a=extmap:10 urn", "a=extmap:x urn"))


def test_conflicting_extension_id_in_answer() -> None:
    answer = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\na=extmap:10 urn:x\r\na=rtpmap:96 VP8/90000\r\n"
    with pytest.raises(SimulcastSdpError, match="id 10"):
        patch_answer(answer, parse_offer(OFFER))


def test_rejected_or_unknown_sections_are_left_alone() -> None:
    answer = "v=0\r\nm=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:9\r\n"
    assert patch_answer(answer, parse_offer(OFFER)) == answer


GARBAGE = st.text(alphabet="abqhf019~;,= -_!\tsendrecvpt", max_size=40)


@settings(max_examples=400, deadline=None)
@given(rid_lines=st.lists(GARBAGE, max_size=5), simulcast=st.lists(GARBAGE, max_size=2))
def test_mutated_garbage_parses_or_raises_simulcast_error(rid_lines: list[str], simulcast: list[str]) -> None:
    lines = "".join(f"a=rid:{v}\n" for v in rid_lines) + "".join(f"a=simulcast:{v}\n" for v in simulcast)
    try:
        [media] = parse_offer(with_simulcast(lines))
    except SimulcastSdpError:
        return
    if media.simulcast is not None:
        assert 1 <= len(media.simulcast.layers) <= MAX_LAYERS
        assert sorted(layer.index for layer in media.simulcast.layers) == list(range(len(media.simulcast.layers)))
        assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,16}", rid) for rid in media.simulcast.rids)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_offer_lines(data: st.DataObject) -> None:
    """Any line of the offer replaced by garbage: a result or a SimulcastSdpError, nothing else."""
    lines = OFFER.split("\n")
    index = data.draw(st.integers(0, len(lines) - 1))
    lines[index] = data.draw(st.sampled_from(["a=rid:", "a=simulcast:", "a=extmap:", "a=rtcp-fb:", "m=", "a=mid:"]))
    lines[index] += data.draw(GARBAGE)
    try:
        parse_offer("\n".join(lines))
    except SimulcastSdpError:
        pass
