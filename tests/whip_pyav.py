"""
FFmpeg's WHIP muxer, as bundled with PyAV (FFmpeg 8.1), publishing a test pattern in real time:

    python tests/whip_pyav.py URL TOKEN SECONDS CERT_DIR

H.264 constrained baseline without B-frames (libx264, zerolatency) and Opus stereo 48 kHz (libopus): what the
muxer takes. FFmpeg's own self-signed certificate fails the DTLS handshake with aiortc (which offers only
ECDHE-ECDSA suites), so an ECDSA P-256 certificate is made in CERT_DIR and passed as ``cert_file``/``key_file``.
The muxer sends DELETE when it closes. Prints one JSON line: frames sent.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import av.audio.resampler
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_certificate(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whip-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7)).sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "whip-cert.pem", folder / "whip-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def main(url: str, token: str, seconds: float, folder: Path) -> None:
    cert, key = make_certificate(folder)
    options = {"cert_file": str(cert), "key_file": str(key)}
    if token:
        options["authorization"] = token
    out = av.open(url, mode="w", format="whip", options=options)
    video = out.add_stream("libx264", rate=30)
    video.width, video.height, video.pix_fmt = 320, 240, "yuv420p"
    video.codec_context.max_b_frames = 0
    video.codec_context.gop_size = 30
    video.codec_context.options = {"profile": "baseline", "preset": "veryfast", "tune": "zerolatency",
                                   "threads": "1"}
    audio = out.add_stream("libopus", rate=48000)
    audio.layout = "stereo"
    audio.format = "s16"
    pattern = av.open("testsrc2=size=320x240:rate=30", format="lavfi")
    tone = av.open("sine=frequency=440:sample_rate=48000", format="lavfi")
    resampler = av.audio.resampler.AudioResampler(format="s16", layout="stereo", rate=48000, frame_size=960)
    frames = pattern.decode(video=0)
    samples = tone.decode(audio=0)
    start = time.monotonic()
    sent_video = sent_audio = 0
    audio_pts = 0
    while time.monotonic() - start < seconds:
        video_time = sent_video / 30
        audio_time = audio_pts / 48000
        if video_time <= audio_time:
            frame = next(frames)
            frame.pts, frame.time_base = sent_video, Fraction(1, 30)
            wait = start + video_time - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            for packet in video.encode(frame):
                out.mux(packet)
            sent_video += 1
        else:
            chunk = next(samples)
            chunk.pts = None
            for part in resampler.resample(chunk):
                part.pts, part.time_base = audio_pts, Fraction(1, 48000)
                audio_pts += part.samples
                for packet in audio.encode(part):
                    out.mux(packet)
                sent_audio += 1
    for packet in video.encode(None):
        out.mux(packet)
    out.close()  # sends DELETE
    print(json.dumps({"video_frames": sent_video, "audio_frames": sent_audio}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4]))
