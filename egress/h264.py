"""
H.264 bitstream helpers for egress: Annex B ↔ length-prefixed NAL units, the ``avcC`` record, the SPS fields a
manifest needs (profile, level, size) and the RFC 6381 codec string.

Pure functions on bytes; nothing decodes pictures.
"""

from __future__ import annotations

from dataclasses import dataclass

from chorus.egress.errors import EgressError

NAL_SLICE = 1
NAL_IDR = 5
NAL_SEI = 6
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9

_START_CODE = b"\x00\x00\x00\x01"


def nal_type(nal: bytes) -> int:
    """``nal_unit_type`` (H.264 §7.3.1): the low five bits of the first byte."""
    return nal[0] & 0x1F


def split_annexb(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream (H.264 Annex B.1), start codes (3 or 4 bytes) removed."""
    nals: list[bytes] = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        start = i + 3
        j = data.find(b"\x00\x00\x01", start)
        end = len(data) if j < 0 else j
        # A 4-byte start code (or trailing_zero_8bits) leaves zero bytes before the next ``00 00 01``.
        nal = data[start:end].rstrip(b"\x00") if j >= 0 else data[start:end]
        if nal:
            nals.append(nal)
        i = j
    return nals


def join_annexb(nals: list[bytes]) -> bytes:
    """NAL units as one Annex B access unit, each behind a 4-byte start code."""
    return b"".join(_START_CODE + nal for nal in nals)


def annexb_to_length_prefixed(data: bytes) -> bytes:
    """Annex B → the ISO/IEC 14496-15 sample format: each NAL unit behind a 4-byte big-endian length."""
    return b"".join(len(nal).to_bytes(4, "big") + nal for nal in split_annexb(data))


def length_prefixed_to_annexb(data: bytes, length_size: int = 4) -> bytes:
    """The ISO/IEC 14496-15 sample format → Annex B with 4-byte start codes."""
    nals: list[bytes] = []
    i = 0
    while i + length_size <= len(data):
        size = int.from_bytes(data[i:i + length_size], "big")
        i += length_size
        if i + size > len(data):
            raise EgressError("bad_input", "length-prefixed NAL unit runs past the sample")
        nals.append(data[i:i + size])
        i += size
    return join_annexb(nals)


def avc_decoder_configuration(sps: bytes, pps: bytes) -> bytes:
    """
    The ``AVCDecoderConfigurationRecord`` (ISO/IEC 14496-15 §5.3.3.1) for one SPS and one PPS, with 4-byte NAL
    lengths. For profiles 100 and above the chroma/bit-depth extension is written from the SPS.
    """
    if len(sps) < 4 or nal_type(sps) != NAL_SPS or not pps or nal_type(pps) != NAL_PPS:
        raise EgressError("bad_input", "avcC needs an SPS and a PPS NAL unit")
    out = bytearray([1, sps[1], sps[2], sps[3], 0xFC | 3, 0xE0 | 1])
    out += len(sps).to_bytes(2, "big") + sps
    out += bytes([1]) + len(pps).to_bytes(2, "big") + pps
    if sps[1] in (100, 110, 122, 144):
        info = parse_sps(sps)
        out += bytes([0xFC | info.chroma_format_idc, 0xF8 | info.bit_depth_luma_minus8,
                      0xF8 | info.bit_depth_chroma_minus8, 0])
    return bytes(out)


def parse_avc_decoder_configuration(record: bytes) -> tuple[list[bytes], list[bytes]]:
    """The SPS and PPS NAL units of an ``avcC`` record (ISO/IEC 14496-15 §5.3.3.1)."""
    try:
        i = 5
        sps: list[bytes] = []
        for _ in range(record[i] & 0x1F):
            size = int.from_bytes(record[i + 1:i + 3], "big")
            sps.append(record[i + 3:i + 3 + size])
            i += 2 + size
        i += 1
        pps: list[bytes] = []
        for _ in range(record[i]):
            size = int.from_bytes(record[i + 1:i + 3], "big")
            pps.append(record[i + 3:i + 3 + size])
            i += 2 + size
    except IndexError:
        raise EgressError("bad_input", "truncated avcC record") from None
    return sps, pps


@dataclass(frozen=True, slots=True)
class SpsInfo:
    """What egress needs from a sequence parameter set (H.264 §7.3.2.1.1)."""

    profile_idc: int
    constraint_flags: int
    level_idc: int
    width: int
    height: int
    chroma_format_idc: int = 1
    bit_depth_luma_minus8: int = 0
    bit_depth_chroma_minus8: int = 0

    @property
    def codec_string(self) -> str:
        """RFC 6381 §3.3 ``avc1.PPCCLL`` (profile, constraint flags, level as hex)."""
        return f"avc1.{self.profile_idc:02x}{self.constraint_flags:02x}{self.level_idc:02x}"


class _Bits:
    """An RBSP bit reader with Exp-Golomb codes (H.264 §9.1)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def bit(self) -> int:
        byte = self.pos >> 3
        if byte >= len(self.data):
            raise EgressError("bad_input", "SPS is truncated")
        value = (self.data[byte] >> (7 - (self.pos & 7))) & 1
        self.pos += 1
        return value

    def bits(self, n: int) -> int:
        value = 0
        for _ in range(n):
            value = (value << 1) | self.bit()
        return value

    def ue(self) -> int:
        zeros = 0
        while not self.bit():
            zeros += 1
            if zeros > 31:
                raise EgressError("bad_input", "bad Exp-Golomb code in SPS")
        return (1 << zeros) - 1 + self.bits(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def _unescape(nal: bytes) -> bytes:
    """NAL payload → RBSP: drop each emulation_prevention_three_byte (H.264 §7.4.1)."""
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


def parse_sps(sps: bytes) -> SpsInfo:
    """
    Profile, level and picture size (after cropping) of an SPS NAL unit (H.264 §7.3.2.1.1, §7.4.2.1.1).

    :raises EgressError: ``bad_input`` if it is not an SPS or is truncated.
    """
    if len(sps) < 4 or nal_type(sps) != NAL_SPS:
        raise EgressError("bad_input", "not an SPS NAL unit")
    r = _Bits(_unescape(sps[1:]))
    profile_idc, constraint_flags, level_idc = r.bits(8), r.bits(8), r.bits(8)
    r.ue()  # seq_parameter_set_id
    chroma_format_idc, depth_luma, depth_chroma = 1, 0, 0
    if profile_idc in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        chroma_format_idc = r.ue()
        if chroma_format_idc == 3:
            r.bit()  # separate_colour_plane_flag
        depth_luma, depth_chroma = r.ue(), r.ue()
        r.bit()  # qpprime_y_zero_transform_bypass_flag
        if r.bit():  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma_format_idc != 3 else 12):
                if r.bit():  # seq_scaling_list_present_flag: skip scaling_list() (§7.3.2.1.1.1)
                    last, nxt = 8, 8
                    for _ in range(16 if i < 6 else 64):
                        if nxt:
                            nxt = (last + r.se() + 256) % 256
                        last = nxt or last
    r.ue()  # log2_max_frame_num_minus4
    poc_type = r.ue()
    if poc_type == 0:
        r.ue()
    elif poc_type == 1:
        r.bit()
        r.se()
        r.se()
        for _ in range(r.ue()):
            r.se()
    r.ue()  # max_num_ref_frames
    r.bit()  # gaps_in_frame_num_value_allowed_flag
    width_mbs = r.ue() + 1
    height_units = r.ue() + 1
    frame_mbs_only = r.bit()
    if not frame_mbs_only:
        r.bit()  # mb_adaptive_frame_field_flag
    r.bit()  # direct_8x8_inference_flag
    crop = (0, 0, 0, 0)
    if r.bit():  # frame_cropping_flag
        crop = (r.ue(), r.ue(), r.ue(), r.ue())
    # Crop units (§7.4.2.1.1, Table 6-1): chroma subsampling and field coding scale the offsets.
    sub_w, sub_h = {0: (1, 1), 1: (2, 2), 2: (2, 1), 3: (1, 1)}.get(chroma_format_idc, (2, 2))
    crop_x = 1 if chroma_format_idc == 0 else sub_w
    crop_y = (1 if chroma_format_idc == 0 else sub_h) * (2 - frame_mbs_only)
    width = width_mbs * 16 - crop_x * (crop[0] + crop[1])
    height = height_units * 16 * (2 - frame_mbs_only) - crop_y * (crop[2] + crop[3])
    return SpsInfo(profile_idc, constraint_flags, level_idc, width, height, chroma_format_idc, depth_luma,
                   depth_chroma)
