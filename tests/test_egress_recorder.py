"""Recording without transcoding: files decode end to end, tracks line up, a SIGKILL loses at most ~2 s."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import av
import numpy as np
import pytest
from egress_media import H264_CODEC, OPUS_CODEC, VP8_CODEC, encode_opus, encode_video, packetize

from chorus.egress.depacketize import AccessUnit, H264Depacketizer, OpusDepacketizer, Vp8Depacketizer
from chorus.egress.errors import EgressError
from chorus.egress.recorder import SenderReportClock, TrackRecorder, list_recordings, ntp_to_unix, probe_duration

HERE = Path(__file__).resolve().parent
T0 = 1_800_000_000.0  # wall time of video frame 0
VIDEO_TS0, AUDIO_TS0 = 3_000_000_000, 123_456


def units(kind: str, seconds: float) -> list[AccessUnit]:
    """Access units as the depacketizer hands them over, with arrival times on the T0 timeline."""
    if kind == "opus":
        # The audio starts 0.5 s after the video: its first beep is at the video's first flash (frame 15).
        packets = packetize(OPUS_CODEC, encode_opus(seconds, beep_every=50), ts0=AUDIO_TS0)
        dep: H264Depacketizer | Vp8Depacketizer | OpusDepacketizer = OpusDepacketizer()
        clock, start = 48000, T0 + 0.5
    else:
        codec = H264_CODEC if kind == "h264" else VP8_CODEC
        packets = packetize(codec, encode_video("libx264" if kind == "h264" else "libvpx", int(seconds * 30)),
                            ts0=VIDEO_TS0)
        dep = H264Depacketizer() if kind == "h264" else Vp8Depacketizer()
        clock, start = 90000, T0
    ts0 = packets[0].timestamp
    out: list[AccessUnit] = []
    for p in packets:
        out += dep.push(p, arrival=start + ((p.timestamp - ts0) & 0xFFFFFFFF) / clock + 0.01)
    return out + dep.flush()


def record(path: Path, codec: str, seconds: float, *, sender_reports: bool) -> TrackRecorder:
    clock = SenderReportClock(48000 if codec == "opus" else 90000)
    if sender_reports:
        # The publisher's SR: RTP timestamp of the first frame ↔ its capture time (arrival is 10 ms later).
        clock.update(T0 + 0.5 if codec == "opus" else T0, AUDIO_TS0 - 312 if codec == "opus" else VIDEO_TS0)
    recorder = TrackRecorder(path, codec, origin=T0 - 1.0, clock=clock)  # type: ignore[arg-type]
    for u in units(codec, seconds):
        recorder.write(u)
    recorder.close()
    return recorder


def start_of(c: av.container.InputContainer) -> float:
    """Wall time of the file's first sample, from its ``chorus_start`` metadata."""
    return datetime.fromisoformat({k.lower(): v for k, v in c.metadata.items()}["chorus_start"]).timestamp()


def flashes(path: Path) -> list[float]:
    """Wall times of the white frames."""
    with av.open(str(path)) as c:
        frames = list(c.decode(video=0))
        base = start_of(c) - float(frames[0].time or 0)
    return [base + float(f.time or 0) for f in frames if f.to_ndarray(format="gray").mean() > 200]


def beeps(path: Path) -> list[float]:
    """Wall times where the tone starts."""
    out, loud = [], False
    with av.open(str(path)) as c:
        frames = list(c.decode(audio=0))
        base = start_of(c) - float(frames[0].time or 0)
    for f in frames:
        level = float(np.abs(f.to_ndarray()).mean())
        if level > 0.02 and not loud:
            out.append(base + float(f.time or 0))
        loud = level > 0.02
    return out


@pytest.mark.parametrize(("video", "suffix"), [("vp8", ".webm"), ("h264", ".mp4"), ("h264", ".mkv")])
@pytest.mark.parametrize("sender_reports", [True, False])
def test_tracks_decode_end_to_end_and_line_up(tmp_path: Path, video: str, suffix: str, sender_reports: bool) -> None:
    vpath, apath = tmp_path / f"video{suffix}", tmp_path / f"audio{suffix}"
    record(vpath, video, 4.0, sender_reports=sender_reports)
    record(apath, "opus", 4.0, sender_reports=sender_reports)
    with av.open(str(vpath)) as c:
        # Media time 0 is T0 - 1 s: the video starts at T0 (+10 ms arrival when anchored without an SR).
        assert start_of(c) == pytest.approx(T0, abs=0.02)
        frames = list(c.decode(video=0))
    assert len(frames) == 120
    if suffix != ".mp4":  # Matroska keeps the offset from the origin in its timestamps too
        assert float(frames[0].time or 0) == pytest.approx(1.0, abs=0.02)
    duration = probe_duration(vpath)
    assert duration is not None and abs(duration - 4.0) <= 0.08  # within 2 %
    audio_duration = probe_duration(apath)
    assert audio_duration is not None and abs(audio_duration - 4.0) <= 0.08
    f, b = flashes(vpath), beeps(apath)
    assert len(f) == 4 and len(b) >= 3
    # The flash and the beep of the same instant: A/V offset within 80 ms.
    for t in b:
        assert min(abs(t - x) for x in f) <= 0.08, (f, b)


def test_listing_and_refusals(tmp_path: Path) -> None:
    record(tmp_path / "a.webm", "vp8", 2.0, sender_reports=True)
    record(tmp_path / "b.mp4", "h264", 1.0, sender_reports=True)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.mkv").write_bytes(b"not a file")
    listing = {r.name: r for r in list_recordings(tmp_path)}
    assert set(listing) == {"a.webm", "b.mp4", "broken.mkv"}
    assert listing["a.webm"].duration == pytest.approx(2.0, abs=0.05) and listing["a.webm"].size > 1000
    assert listing["b.mp4"].duration == pytest.approx(1.0, abs=0.05)
    assert listing["broken.mkv"].duration is None
    with pytest.raises(EgressError) as e:
        TrackRecorder(tmp_path / "x.webm", "h264", origin=0)
    assert e.value.code == "unsupported_codec"
    with pytest.raises(EgressError) as e:
        list_recordings(tmp_path / "missing")
    assert e.value.code == "not_found"
    closed = TrackRecorder(tmp_path / "c.webm", "vp8", origin=0)
    closed.close()
    assert not (tmp_path / "c.webm").exists()  # nothing was written: no file
    with pytest.raises(EgressError) as e:
        closed.write(AccessUnit(b"", 0, 0, True))
    assert e.value.code == "invalid_state"


def test_sender_report_clock_and_ntp() -> None:
    clock = SenderReportClock(90000)
    assert clock.wall_time(5) is None
    clock.update(1000.0, 0xFFFFFF00)
    assert clock.wall_time(0xFFFFFF00 + 90000 - (1 << 32)) == pytest.approx(1001.0)  # across the wrap
    assert clock.wall_time(0xFFFFFF00 - 45000) == pytest.approx(999.5)
    assert ntp_to_unix((2208988800 + 10) << 32 | (1 << 31)) == 10.5


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_egress_recorder import units
    from chorus.egress.recorder import TrackRecorder
    recorder = TrackRecorder(Path({path!r}), {codec!r}, origin=0)
    first = None
    for u in units({codec!r}, 8.0):
        recorder.write(u)
        first = u.pts if first is None else first
        print((u.pts - first) / 90000, flush=True)
        time.sleep(0.002)
""")


@pytest.mark.parametrize(("codec", "suffix"), [("h264", ".mp4"), ("vp8", ".webm"), ("h264", ".mkv")])
def test_sigkill_mid_write_leaves_a_playable_prefix(tmp_path: Path, codec: str, suffix: str) -> None:
    path = tmp_path / f"rec{suffix}"
    written = 0.0
    with subprocess.Popen([sys.executable, "-P", "-c", WRITER.format(tests=str(HERE), path=str(path), codec=codec)],
                          stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            written = float(line)
            if written >= 5.0:
                proc.kill()  # SIGKILL: no close, no trailer
                break
        proc.wait(timeout=10)
    assert written >= 5.0
    with av.open(str(path)) as c:
        times = [float(f.time or 0) for f in c.decode(video=0)]
    # Everything up to 2 s before the kill decodes (frame times count from the file's first frame).
    assert times and times[-1] - times[0] >= written - 2.0, (times[-1] - times[0], written)
    assert len(times) >= (written - 2.0) * 30


def test_origin_metadata_is_iso(tmp_path: Path) -> None:
    record(tmp_path / "v.mkv", "vp8", 1.0, sender_reports=True)
    with av.open(str(tmp_path / "v.mkv")) as c:
        value = {k.lower(): v for k, v in c.metadata.items()}["chorus_origin"]
    assert datetime.fromisoformat(value).timestamp() == T0 - 1.0
