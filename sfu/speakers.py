"""
Active speakers from the audio-level header extension (RFC 6464), without decoding any audio.

A publisher's every audio packet carries the level of the audio it holds, in -dBov: 0 is the loudest a
signal can be, 127 is silence (RFC 6464 §3). A :class:`SpeakerDetector` keeps, per audio source, the levels
of the last :data:`WINDOW` seconds of packets; a source *speaks* while at least :data:`MIN_VOICE_SHARE` of
them are voice (at most :data:`VOICE_LEVEL` dB below full scale), which bridges the short pauses of speech
while silence (a muted or disabled microphone sends level 127) ends it within the window. Participants are
ranked by their loudest source's mean loudness (``127 - level``); the one ranked first keeps its place
unless another is louder by :data:`SWITCH_MARGIN` dB, so two people talking at once do not flap.

The detector is pure: it is told levels (:meth:`SpeakerDetector.observe`) and asked who speaks
(:meth:`SpeakerDetector.speakers`) with the time passed in. The router feeds it from its producers and asks it
four times a second (:data:`INTERVAL`).
"""

from __future__ import annotations

from collections import deque

#: Seconds of packets a decision is made on.
WINDOW = 0.4
#: A packet at most this many dB below full scale counts as voice (RFC 6464 level <= this).
VOICE_LEVEL = 60
#: The share of a window's packets that must be voice for its source to speak.
MIN_VOICE_SHARE = 0.3
#: A window with fewer packets than this (a source that stopped sending) is silent.
MIN_PACKETS = 5
#: The first speaker keeps its place unless another is louder by this many dB.
SWITCH_MARGIN = 3.0
#: How often the router asks (seconds): at most four ``active_speakers`` notifications a second.
INTERVAL = 0.25
#: The most speakers reported at once.
MAX_SPEAKERS = 4


class _Levels:
    """The recent levels of one audio source."""

    __slots__ = ("peer_id", "samples")

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        #: (monotonic time, level 0-127)
        self.samples: deque[tuple[float, int]] = deque()

    def score(self, now: float) -> float | None:
        """Mean loudness (``127 - level``) of the window if this source speaks, else ``None``."""
        samples = self.samples
        horizon = now - WINDOW
        while samples and samples[0][0] < horizon:
            samples.popleft()
        if len(samples) < MIN_PACKETS:
            return None
        voiced = sum(1 for _, level in samples if level <= VOICE_LEVEL)
        if voiced < MIN_VOICE_SHARE * len(samples):
            return None
        return sum(127 - level for _, level in samples) / len(samples)


class SpeakerDetector:
    """
    Who is speaking in a room, loudest first, from the audio levels of each participant's audio sources.

    Lifecycle: sources appear with their first :meth:`observe` and go with :meth:`forget` (or fall silent).
    """

    def __init__(self) -> None:
        self._sources: dict[str, _Levels] = {}
        self._first: str | None = None

    def observe(self, source_id: str, peer_id: str, level: int, now: float) -> None:
        """One packet of ``source_id`` (published by ``peer_id``) carried audio level ``level`` (0-127, -dBov)."""
        levels = self._sources.get(source_id)
        if levels is None:
            levels = self._sources[source_id] = _Levels(peer_id)
        levels.samples.append((now, min(max(level, 0), 127)))
        # Bounded whatever the packet rate: old samples also go here, not only when asked.
        if len(levels.samples) > 512:
            levels.samples.popleft()

    def forget(self, source_id: str) -> None:
        """The source ended."""
        self._sources.pop(source_id, None)

    def speakers(self, now: float) -> list[str]:
        """The peers speaking now, loudest first (at most :data:`MAX_SPEAKERS`)."""
        scores: dict[str, float] = {}
        for levels in self._sources.values():
            score = levels.score(now)
            if score is not None and score > scores.get(levels.peer_id, -1.0):
                scores[levels.peer_id] = score
        if self._first in scores:
            scores[self._first] += SWITCH_MARGIN  # the current first speaker keeps the floor on a near tie
        ranked = sorted(scores, key=lambda peer: (-scores[peer], peer))[:MAX_SPEAKERS]
        self._first = ranked[0] if ranked else None
        return ranked
