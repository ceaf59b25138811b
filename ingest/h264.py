"""
H.264 bitstream helpers for ingest: the three ways NAL units are framed (``avcC`` + length prefixes as in RTMP/MP4,
Annex B start codes as in MPEG-TS, RTP payloads as in RFC 6184), and enough of the SPS (ITU-T H.264 §7.3.2.1.1,
Annex E) to name the profile in SDP and to tell whether the stream may carry B-frames.

Nothing here decodes pictures; everything works on bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ProtocolError
from .media import VideoAccessUnit, VideoConfig

NAL_SLICE = 1
NAL_IDR = 5
NAL_SEI = 6
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9
NAL_FILLER = 12
NAL_STAP_A = 24  # RFC 6184 §5.7.1
NAL_FU_A = 28  # RFC 6184 §5.8

#: RTP clock rate of H.264 video (RFC 6184 §8.2.1).
CLOCK_RATE = 90_000


def nal_type(nal: bytes) -> int:
    return nal[0] & 0x1F if nal else 0


# --- framing -----------------------------------------------------------------------------------------------------


def split_avcc(data: bytes, length_size: int = 4) -> list[bytes]:
    """
    NAL units of length-prefixed (AVCC) data, as in an RTMP video message or an MP4 sample.

    :raises ProtocolError: a length runs past the end, or the prefix size is not 1, 2 or 4.
    """
    if length_size not in (1, 2, 4):
        raise ProtocolError(f"NAL length size {length_size} is invalid")
    nalus: list[bytes] = []
    i, n = 0, len(data)
    while i < n:
        if i + length_size > n:
            raise ProtocolError("AVCC data ends inside a NAL length")
        size = int.from_bytes(data[i: i + length_size], "big")
        i += length_size
        if size > n - i:
            raise ProtocolError("AVCC NAL unit runs past the end of its message")
        if size:
            nalus.append(data[i: i + size])
        i += size
    return nalus


def join_avcc(nalus: Iterable[bytes], length_size: int = 4) -> bytes:
    return b"".join(len(nal).to_bytes(length_size, "big") + nal for nal in nalus)


def split_annexb(data: bytes) -> list[bytes]:
    """NAL units of an Annex B byte stream (``00 00 01`` / ``00 00 00 01`` start codes, §B.1); leading junk skipped."""
    nalus: list[bytes] = []
    start = data.find(b"\x00\x00\x01")
    while start >= 0:
        begin = start + 3
        nxt = data.find(b"\x00\x00\x01", begin)
        end = len(data) if nxt < 0 else nxt
        # trailing_zero_8bits and the first zero of a 4-byte start code belong to no NAL unit (a NAL unit
        # ends with its rbsp_stop_one_bit's byte, never 0x00)
        nal = data[begin:end].rstrip(b"\x00")
        if nal:
            nalus.append(nal)
        start = nxt
    return nalus


def join_annexb(nalus: Iterable[bytes]) -> bytes:
    return b"".join(b"\x00\x00\x00\x01" + nal for nal in nalus)


@dataclass(frozen=True, slots=True)
class AvcDecoderConfig:
    """An ``AVCDecoderConfigurationRecord`` (ISO/IEC 14496-15 §5.3.3.1), the ``avcC`` box / FLV sequence header."""

    profile: int
    compatibility: int
    level: int
    nal_length_size: int
    sps: tuple[bytes, ...]
    pps: tuple[bytes, ...]


def parse_avcc(record: bytes) -> AvcDecoderConfig:
    """
    Parse an ``avcC`` record.

    :raises ProtocolError: wrong version, truncated, or without an SPS and a PPS.
    """
    if len(record) < 7 or record[0] != 1:
        raise ProtocolError("avcC record is truncated or not version 1")
    length_size = (record[4] & 0x03) + 1
    if length_size == 3:
        raise ProtocolError("avcC lengthSizeMinusOne is 2 (reserved)")
    i = 5
    lists: list[list[bytes]] = []
    for count_mask in (0x1F, 0xFF):
        if i >= len(record):
            raise ProtocolError("avcC record is truncated")
        count = record[i] & count_mask
        i += 1
        units: list[bytes] = []
        for _ in range(count):
            if i + 2 > len(record):
                raise ProtocolError("avcC record is truncated")
            size = int.from_bytes(record[i: i + 2], "big")
            if i + 2 + size > len(record) or size == 0:
                raise ProtocolError("avcC parameter set runs past the record")
            units.append(record[i + 2: i + 2 + size])
            i += 2 + size
        lists.append(units)
    sps, pps = lists
    if not sps or not pps:
        raise ProtocolError("avcC record has no SPS or no PPS")
    return AvcDecoderConfig(record[1], record[2], record[3], length_size, tuple(sps), tuple(pps))


# --- SPS -----------------------------------------------------------------------------------------------------------


def unescape_rbsp(nal: bytes) -> bytes:
    """Remove emulation prevention bytes (``00 00 03`` → ``00 00``, §7.4.1)."""
    if b"\x00\x00\x03" not in nal:
        return nal
    out = bytearray()
    zeros = 0
    for byte in nal:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


class _BitReader:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data) * 8

    def u(self, n: int) -> int:
        if self.pos + n > self.end:
            raise ProtocolError("SPS is truncated")
        value = 0
        for _ in range(n):
            value = (value << 1) | ((self.data[self.pos >> 3] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ProtocolError("SPS has an Exp-Golomb code longer than 32 bits")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)

    @property
    def remaining(self) -> int:
        return self.end - self.pos


@dataclass(frozen=True, slots=True)
class SpsInfo:
    """What Chorus needs from a sequence parameter set."""

    profile_idc: int
    constraint_flags: int
    level_idc: int
    width: int
    height: int
    pic_order_cnt_type: int
    #: ``max_num_reorder_frames`` from the VUI bitstream restriction (Annex E.2.1), ``None`` when absent.
    max_num_reorder_frames: int | None
    frame_mbs_only: bool

    @property
    def profile_level_id(self) -> str:
        """The SDP ``profile-level-id`` (RFC 6184 §8.1): profile_idc, constraint byte, level_idc in hex."""
        return f"{self.profile_idc:02x}{self.constraint_flags:02x}{self.level_idc:02x}"

    @property
    def may_reorder(self) -> bool:
        """
        Whether pictures may come out of presentation order (B-frames, or reordered P-frames): no for the
        Baseline profile (no B slices) and for ``pic_order_cnt_type`` 2 (output order = decoding order, §8.2.1.3);
        otherwise what the VUI's ``max_num_reorder_frames`` says, and yes when the VUI does not say.
        """
        if self.profile_idc == 66 or self.pic_order_cnt_type == 2:
            return False
        if self.max_num_reorder_frames is not None:
            return self.max_num_reorder_frames > 0
        return True


_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


def _skip_scaling_list(r: _BitReader, size: int) -> None:
    last = nxt = 8
    for _ in range(size):
        if nxt:
            nxt = (last + r.se() + 256) % 256
        last = nxt or last


def _skip_hrd(r: _BitReader) -> None:
    count = r.ue() + 1  # cpb_cnt_minus1 (E.1.2)
    if count > 32:
        raise ProtocolError("SPS HRD has more than 32 CPB specifications")
    r.u(8)  # bit_rate_scale, cpb_size_scale
    for _ in range(count):
        r.ue()
        r.ue()
        r.u(1)
    r.u(20)  # four 5-bit delay/length fields


def parse_sps(nal: bytes) -> SpsInfo:
    """
    Parse a sequence parameter set NAL unit (with its one-byte NAL header) far enough for profile, level,
    cropped resolution, ``pic_order_cnt_type`` and the VUI's ``max_num_reorder_frames``.

    :raises ProtocolError: not an SPS, truncated, or out-of-range values.
    """
    if nal_type(nal) != NAL_SPS or len(nal) < 4:
        raise ProtocolError("not an SPS NAL unit")
    r = _BitReader(unescape_rbsp(nal[1:]))
    profile_idc, constraint_flags, level_idc = r.u(8), r.u(8), r.u(8)
    r.ue()  # seq_parameter_set_id
    chroma_format_idc = 1
    if profile_idc in _HIGH_PROFILES:
        chroma_format_idc = r.ue()
        if chroma_format_idc > 3:
            raise ProtocolError("SPS chroma_format_idc out of range")
        if chroma_format_idc == 3:
            r.u(1)  # separate_colour_plane_flag
        r.ue()  # bit_depth_luma_minus8
        r.ue()  # bit_depth_chroma_minus8
        r.u(1)  # qpprime_y_zero_transform_bypass_flag
        if r.u(1):  # seq_scaling_matrix_present_flag
            for i in range(12 if chroma_format_idc == 3 else 8):
                if r.u(1):
                    _skip_scaling_list(r, 16 if i < 6 else 64)
    r.ue()  # log2_max_frame_num_minus4
    poc_type = r.ue()
    if poc_type == 0:
        r.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif poc_type == 1:
        r.u(1)
        r.se()
        r.se()
        cycle = r.ue()
        if cycle > 255:
            raise ProtocolError("SPS num_ref_frames_in_pic_order_cnt_cycle out of range")
        for _ in range(cycle):
            r.se()
    elif poc_type != 2:
        raise ProtocolError("SPS pic_order_cnt_type out of range")
    r.ue()  # max_num_ref_frames
    r.u(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = r.ue() + 1
    height_map_units = r.ue() + 1
    frame_mbs_only = r.u(1)
    if not frame_mbs_only:
        r.u(1)  # mb_adaptive_frame_field_flag
    r.u(1)  # direct_8x8_inference_flag
    crop = (0, 0, 0, 0)
    if r.u(1):  # frame_cropping_flag
        crop = (r.ue(), r.ue(), r.ue(), r.ue())
    sub_width, sub_height = {0: (1, 1), 1: (2, 2), 2: (2, 1), 3: (1, 1)}[chroma_format_idc]
    crop_x = sub_width if chroma_format_idc else 1
    crop_y = (sub_height if chroma_format_idc else 1) * (2 - frame_mbs_only)
    width = width_mbs * 16 - crop_x * (crop[0] + crop[1])
    height = (2 - frame_mbs_only) * height_map_units * 16 - crop_y * (crop[2] + crop[3])
    reorder: int | None = None
    if r.remaining > 0 and r.u(1):  # vui_parameters_present_flag (E.1.1)
        reorder = _vui_max_num_reorder_frames(r)
    if width <= 0 or height <= 0:
        raise ProtocolError("SPS gives an empty picture")
    return SpsInfo(profile_idc, constraint_flags, level_idc, width, height, poc_type, reorder, bool(frame_mbs_only))


def _vui_max_num_reorder_frames(r: _BitReader) -> int | None:
    if r.u(1):  # aspect_ratio_info_present_flag
        if r.u(8) == 255:  # Extended_SAR
            r.u(32)
    if r.u(1):  # overscan_info_present_flag
        r.u(1)
    if r.u(1):  # video_signal_type_present_flag
        r.u(4)
        if r.u(1):  # colour_description_present_flag
            r.u(24)
    if r.u(1):  # chroma_loc_info_present_flag
        r.ue()
        r.ue()
    if r.u(1):  # timing_info_present_flag
        r.u(32)
        r.u(32)
        r.u(1)
    nal_hrd = r.u(1)
    if nal_hrd:
        _skip_hrd(r)
    vcl_hrd = r.u(1)
    if vcl_hrd:
        _skip_hrd(r)
    if nal_hrd or vcl_hrd:
        r.u(1)  # low_delay_hrd_flag
    r.u(1)  # pic_struct_present_flag
    if not r.u(1):  # bitstream_restriction_flag
        return None
    r.u(1)  # motion_vectors_over_pic_boundaries_flag
    for _ in range(4):  # max_bytes_per_pic_denom, max_bits_per_mb_denom, log2_max_mv_length_horizontal/vertical
        r.ue()
    return r.ue()


def video_config(sps: Sequence[bytes], pps: Sequence[bytes], nal_length_size: int = 4) -> VideoConfig:
    """A :class:`VideoConfig` from parameter sets (the first SPS is the one described)."""
    if not sps or not pps:
        raise ProtocolError("H.264 configuration without SPS or PPS")
    info = parse_sps(sps[0])
    return VideoConfig(sps=tuple(sps), pps=tuple(pps), profile_level_id=info.profile_level_id, width=info.width,
                       height=info.height, may_reorder=info.may_reorder, nal_length_size=nal_length_size)


# libwebrtc's table (api/video_codecs/h264_profile_level_id.cc): profile_idc and a pattern over the constraint byte.
_PROFILE_PATTERNS: tuple[tuple[int, str, str], ...] = (
    (0x42, "x1xx0000", "constrained-baseline"),
    (0x4D, "1xxx0000", "constrained-baseline"),
    (0x58, "11xx0000", "constrained-baseline"),
    (0x42, "x0xx0000", "baseline"),
    (0x58, "10xx0000", "baseline"),
    (0x4D, "0x0x0000", "main"),
    (0x64, "00000000", "high"),
    (0x64, "00001100", "constrained-high"),
    (0xF4, "00000000", "predictive-high-444"),
)


def webrtc_profile(profile_level_id: str) -> str | None:
    """
    The WebRTC profile name of a ``profile-level-id`` as libwebrtc classifies it (what browsers match in SDP),
    or ``None`` when libwebrtc knows no such profile (then a browser cannot take the stream as is).
    """
    try:
        value = int(profile_level_id, 16)
    except ValueError:
        return None
    if len(profile_level_id) != 6:
        return None
    profile_idc, constraints = value >> 16, (value >> 8) & 0xFF
    bits = f"{constraints:08b}"
    for idc, pattern, name in _PROFILE_PATTERNS:
        if idc == profile_idc and all(p in ("x", b) for p, b in zip(pattern, bits, strict=True)):
            return name
    return None


#: WebRTC H.264 profiles forwarded as they are by default: what Chromium receives over WebRTC (its recvonly offer
#: lists 42001f, 42e01f, 4d001f and f4001f: no High, so a High stream is re-encoded). Firefox (OpenH264) takes
#: the two baselines only and Safari constrained baseline and (constrained) high: pass a narrower set for such
#: audiences (setting ``ingest_passthrough_profiles``).
BROWSER_PROFILES = frozenset({"constrained-baseline", "baseline", "main"})


def needs_reencode(config: VideoConfig, unit: VideoAccessUnit | None = None, *,
                   accepted: frozenset[str] = BROWSER_PROFILES) -> bool:
    """
    Whether a stream must be re-encoded before browsers can play it smoothly: its profile is not one they
    take, or pictures may come out of order (B-frames: WebRTC receivers render in decoding order, so they
    stutter). Checked on the configuration when a stream starts, and on each ``unit`` as it arrives (a non-zero
    composition offset proves reordering even when the SPS did not announce it).
    """
    if webrtc_profile(config.profile_level_id) not in accepted or config.may_reorder:
        return True
    return unit is not None and unit.pts_ms != unit.dts_ms


# --- RTP (RFC 6184, packetization-mode 1) ------------------------------------------------------------------------


def rtp_timestamp(pts_ms: int) -> int:
    """The 90 kHz RTP timestamp of a presentation time in milliseconds, modulo 2**32 (RFC 6184 §5.1)."""
    return (pts_ms * (CLOCK_RATE // 1000)) & 0xFFFFFFFF


class H264Packetizer:
    """
    Turns access units into RTP payloads (RFC 6184, packetization-mode 1): a NAL unit that fits goes alone
    (§5.6), a larger one as FU-A fragments (§5.8), and every IDR picture is preceded by the current SPS and PPS
    in one STAP-A (§5.7.1) at the start of the unit, unless the unit carries them itself. Access unit delimiters
    and filler data are dropped (they mean nothing to an RTP receiver). The marker bit is set on the last packet
    of each access unit (§5.1).

    :param max_payload: the largest payload produced, in bytes (≥ 3).
    """

    def __init__(self, max_payload: int = 1200) -> None:
        if max_payload < 3:
            raise ValueError("max_payload must be at least 3")
        self.max_payload = max_payload
        self.config: VideoConfig | None = None

    def packetize(self, unit: VideoAccessUnit) -> list[tuple[bytes, bool]]:
        """RTP payloads and marker bits of one access unit (timestamp: :func:`rtp_timestamp` of ``pts_ms``)."""
        nalus = [nal for nal in unit.nalus if nal and nal_type(nal) not in (NAL_AUD, NAL_FILLER)]
        types = {nal_type(nal) for nal in nalus}
        if NAL_IDR in types and self.config is not None and NAL_SPS not in types:
            nalus[0:0] = [*self.config.sps, *self.config.pps]  # first in the unit, before SEI (§7.4.1.2.3)
        payloads: list[bytes] = []
        i = 0
        while i < len(nalus):
            nal = nalus[i]
            if nal_type(nal) == NAL_SPS:  # aggregate the parameter sets that follow into one STAP-A
                j = i
                group: list[bytes] = []
                size = 1
                while j < len(nalus) and nal_type(nalus[j]) in (NAL_SPS, NAL_PPS) \
                        and size + 2 + len(nalus[j]) <= self.max_payload:
                    group.append(nalus[j])
                    size += 2 + len(nalus[j])
                    j += 1
                if len(group) > 1:
                    payloads.append(self._stap_a(group))
                    i = j
                    continue
            payloads.extend(self._single_or_fu_a(nal))
            i += 1
        return [(payload, k == len(payloads) - 1) for k, payload in enumerate(payloads)]

    def _stap_a(self, group: list[bytes]) -> bytes:
        nri = max(nal[0] & 0x60 for nal in group)
        return bytes([nri | NAL_STAP_A]) + b"".join(len(nal).to_bytes(2, "big") + nal for nal in group)

    def _single_or_fu_a(self, nal: bytes) -> list[bytes]:
        if len(nal) <= self.max_payload:
            return [nal]
        indicator = (nal[0] & 0xE0) | NAL_FU_A
        kind = nal[0] & 0x1F
        chunk = self.max_payload - 2
        body = nal[1:]
        out = []
        for offset in range(0, len(body), chunk):
            start = 0x80 if offset == 0 else 0
            end = 0x40 if offset + chunk >= len(body) else 0
            out.append(bytes([indicator, start | end | kind]) + body[offset: offset + chunk])
        return out


def depacketize(payloads: Iterable[bytes]) -> list[bytes]:
    """
    NAL units of the RTP payloads of one access unit, in order (single NAL, STAP-A, FU-A; RFC 6184 §5.6–5.8).

    :raises ProtocolError: a truncated aggregate, an FU-A without its start, or an unsupported packet type.
    """
    nalus: list[bytes] = []
    fragment: bytearray | None = None
    for payload in payloads:
        if not payload:
            raise ProtocolError("empty H.264 RTP payload")
        kind = payload[0] & 0x1F
        if kind == NAL_STAP_A:
            i = 1
            while i < len(payload):
                if i + 2 > len(payload):
                    raise ProtocolError("STAP-A ends inside a NAL size")
                size = int.from_bytes(payload[i: i + 2], "big")
                if size == 0 or i + 2 + size > len(payload):
                    raise ProtocolError("STAP-A NAL unit runs past the packet")
                nalus.append(payload[i + 2: i + 2 + size])
                i += 2 + size
        elif kind == NAL_FU_A:
            if len(payload) < 3:
                raise ProtocolError("FU-A packet is too short")
            header = payload[1]
            if header & 0x80:
                fragment = bytearray([(payload[0] & 0xE0) | (header & 0x1F)])
            elif fragment is None:
                raise ProtocolError("FU-A continuation without a start fragment")
            fragment += payload[2:]
            if header & 0x40:
                nalus.append(bytes(fragment))
                fragment = None
        elif 1 <= kind <= 23:
            nalus.append(bytes(payload))
        else:
            raise ProtocolError(f"unsupported H.264 RTP packet type {kind}")
    if fragment is not None:
        raise ProtocolError("FU-A fragment without its end")
    return nalus
