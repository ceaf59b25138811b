"""The active-speaker detector and the MCU speaker layout, as pure functions of their inputs."""

from __future__ import annotations

from chorus.sfu.mixer import speaker_layout
from chorus.sfu.quality import LinkSample, QualityTracker, rate
from chorus.sfu.speakers import MAX_SPEAKERS, SpeakerDetector


def feed(detector: SpeakerDetector, source: str, peer: str, levels: list[int], start: float) -> float:
    """One packet every 20 ms, as Opus sends."""
    t = start
    for level in levels:
        detector.observe(source, peer, level, t)
        t += 0.02
    return t


def test_speech_with_pauses_speaks_and_silence_does_not() -> None:
    detector = SpeakerDetector()
    speech = ([30] * 8 + [127] * 4) * 2  # syllables with short pauses
    end = feed(detector, "a1", "alice", speech, 0.0)
    feed(detector, "b1", "bob", [127] * len(speech), 0.0)
    assert detector.speakers(end) == ["alice"]
    # Silence: alice falls out within the window.
    end = feed(detector, "a1", "alice", [127] * 20, end)
    assert detector.speakers(end) == []


def test_loudest_first_with_a_margin_for_the_first() -> None:
    detector = SpeakerDetector()
    end = feed(detector, "a1", "alice", [40] * 25, 0.0)
    feed(detector, "b1", "bob", [30] * 25, 0.0)
    assert detector.speakers(end) == ["bob", "alice"]
    # Alice gets a little louder than bob, but not by the margin: bob keeps the floor.
    end2 = feed(detector, "a1", "alice", [29] * 25, end)
    feed(detector, "b1", "bob", [30] * 25, end)
    assert detector.speakers(end2) == ["bob", "alice"]
    # Clearly louder: she takes it.
    end3 = feed(detector, "a1", "alice", [20] * 25, end2)
    feed(detector, "b1", "bob", [30] * 25, end2)
    assert detector.speakers(end3) == ["alice", "bob"]


def test_a_peer_counts_by_its_loudest_source_and_at_most_four_are_reported() -> None:
    detector = SpeakerDetector()
    for i in range(6):
        end = feed(detector, f"s{i}", f"p{i}", [20 + i] * 25, 0.0)
    feed(detector, "p0-screen", "p0", [127] * 25, 0.0)
    speakers = detector.speakers(end)
    assert speakers == ["p0", "p1", "p2", "p3"] and len(speakers) == MAX_SPEAKERS
    detector.forget("s0")
    assert "p0" not in detector.speakers(end)


def test_speaker_layout_puts_the_first_large() -> None:
    rects = speaker_layout(4, 640, 480)
    main, *strip = rects
    assert (main.width, main.height) == (640, 360)
    assert all(r.y == 360 and r.height == 120 for r in strip)
    assert all(r.x % 2 == 0 and r.width % 2 == 0 for r in rects)
    assert strip[-1].x + strip[-1].width <= 640
    assert speaker_layout(1, 640, 480)[0].width == 640


def test_quality_from_samples() -> None:
    tracker = QualityTracker()
    tracker.update("p", LinkSample(received=1000, lost=0))
    q = tracker.update("p", LinkSample(received=1900, lost=100, rtts=[0.03, 0.05], downlink_losses=[0.0]))
    assert q.uplink_loss == 0.1 and q.rtt == 0.04 and q.quality == "poor"
    assert rate(0.01, 0.05) == "excellent" and rate(0.05, 0.1) == "good" and rate(None, None) == "unknown"
