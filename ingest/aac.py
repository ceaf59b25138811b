"""
AAC framing: the AudioSpecificConfig (ISO/IEC 14496-3 §1.6.2.1) that RTMP and MP4 carry out of band, and the
ADTS headers (ISO/IEC 13818-7 §6.2) that MPEG-TS puts in front of every frame.
"""

from __future__ import annotations

from .errors import ProtocolError
from .media import AudioConfig

#: samplingFrequencyIndex → Hz (ISO/IEC 14496-3 Table 1.18).
SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


class _Bits:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def read(self, n: int) -> int:
        value = 0
        for _ in range(n):
            byte = self.pos >> 3
            if byte >= len(self.data):
                raise ProtocolError("AudioSpecificConfig is truncated")
            value = (value << 1) | ((self.data[byte] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return value


def parse_asc(asc: bytes) -> AudioConfig:
    """
    Read object type, sample rate and channel count from an AudioSpecificConfig.

    :raises ProtocolError: truncated, or a reserved sampling-frequency index.
    """
    bits = _Bits(asc)
    object_type = bits.read(5)
    if object_type == 31:
        object_type = 32 + bits.read(6)
    index = bits.read(4)
    rate = bits.read(24) if index == 15 else (SAMPLE_RATES[index] if index < len(SAMPLE_RATES) else 0)
    if not rate:
        raise ProtocolError(f"reserved AAC sampling frequency index {index}")
    channels = bits.read(4)
    return AudioConfig(asc=bytes(asc), object_type=object_type, sample_rate=rate, channels=channels)


def make_asc(object_type: int, sample_rate: int, channels: int) -> bytes:
    """The two-byte AudioSpecificConfig for an object type < 31 and a standard sample rate."""
    index = SAMPLE_RATES.index(sample_rate)
    value = (object_type << 11) | (index << 7) | (channels << 3)
    return value.to_bytes(2, "big")


def split_adts(data: bytes) -> list[tuple[AudioConfig, bytes]]:
    """
    Split a run of ADTS frames (one MPEG-TS PES payload) into (config, raw frame) pairs.

    :raises ProtocolError: a missing sync word, a reserved field, or a frame running past the data.
    """
    out: list[tuple[AudioConfig, bytes]] = []
    i = 0
    while i < len(data):
        if len(data) - i < 7 or data[i] != 0xFF or data[i + 1] & 0xF6 != 0xF0:  # syncword, layer 00
            raise ProtocolError("ADTS sync word missing")
        protection_absent = data[i + 1] & 1
        profile = data[i + 2] >> 6
        index = (data[i + 2] >> 2) & 0x0F
        channels = ((data[i + 2] & 1) << 2) | (data[i + 3] >> 6)
        length = ((data[i + 3] & 3) << 11) | (data[i + 4] << 3) | (data[i + 5] >> 5)
        header = 7 if protection_absent else 9
        if index >= len(SAMPLE_RATES) or length < header or i + length > len(data):
            raise ProtocolError("malformed ADTS header")
        if data[i + 6] & 3:  # number_of_raw_data_blocks_in_frame - 1
            raise ProtocolError("ADTS frames with several raw data blocks are not supported")
        config = AudioConfig(asc=make_asc(profile + 1, SAMPLE_RATES[index], channels), object_type=profile + 1,
                             sample_rate=SAMPLE_RATES[index], channels=channels)
        out.append((config, data[i + header: i + length]))
        i += length
    return out


def is_adts(data: bytes) -> bool:
    """Whether ``data`` starts with an ADTS sync word."""
    return len(data) >= 2 and data[0] == 0xFF and data[1] & 0xF6 == 0xF0
