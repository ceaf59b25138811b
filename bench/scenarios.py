"""The benchmark's scenarios: who publishes what, who receives it."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    publishers: int  # each publishes Opus, plus VP8 when ``video``
    subscribers: int  # receive-only participants, each receiving every publisher
    meeting: bool = False  # publishers also receive each other (and there are no subscribers)
    video: bool = True
    #: The publisher sends its video as three simulcast layers; subscriber ``j`` wants layer ``j % 3``.
    simulcast: bool = False

    @property
    def tracks_per_publisher(self) -> int:
        return 2 if self.video else 1

    @property
    def receivers(self) -> int:
        return self.publishers if self.meeting else self.subscribers

    @property
    def tracks_per_receiver(self) -> int:
        """Forwarded tracks each receiving participant gets."""
        sources = self.publishers - 1 if self.meeting else self.publishers
        return sources * self.tracks_per_publisher

    @property
    def streams(self) -> int:
        """Forwarded streams (one track to one receiver), audio and video."""
        return self.receivers * self.tracks_per_receiver

    @property
    def video_streams(self) -> int:
        return self.streams // 2 if self.video else 0


    @property
    def reference(self) -> str | None:
        """The single-layer scenario a simulcast one is compared with (same publisher and subscribers)."""
        return f"fanout-{self.subscribers}" if self.simulcast else None


def fanout(n: int) -> Scenario:
    return Scenario(f"fanout-{n}", f"1×{n}", 1, n)


def simulcast(n: int) -> Scenario:
    """One publisher sending three simulcast layers, ``n`` subscribers wanting the lowest, middle and full one in
    turn."""
    return Scenario(f"simulcast-{n}", f"simulcast 1×{n}", 1, n, simulcast=True)


MEETING = Scenario("meeting-4", "meeting 4×3", 4, 0, meeting=True)
AUDIO = Scenario("audio-10x40", "audio 10×40", 10, 40, video=False)

#: What ``make bench`` runs, in order (fanout-1 first: it is the latency reference of the others; simulcast-50
#: right after its single-layer reference fanout-50). The Chromium ramp figure (``ramp``) comes last.
DEFAULT = [fanout(1), fanout(10), fanout(25), fanout(50), simulcast(50), fanout(100), MEETING, AUDIO]
#: The MediaRelay baseline saturates a core with a handful of subscribers: only these are run.
BASELINE = [fanout(1), fanout(10)]
BASELINE_MAX_SUBSCRIBERS = 10


#: Not a load scenario: a Chromium publisher's ramp-up into each server (bench/ramp.py).
RAMP = "ramp"


def by_name(name: str) -> Scenario:
    match = re.fullmatch(r"(fanout|simulcast)-(\d+)", name)
    if match and int(match.group(2)) >= 1:
        return (fanout if match.group(1) == "fanout" else simulcast)(int(match.group(2)))
    for scenario in (MEETING, AUDIO):
        if scenario.name == name:
            return scenario
    raise ValueError(f"unknown scenario {name!r} (fanout-N, simulcast-N, {MEETING.name}, {AUDIO.name}, {RAMP})")
