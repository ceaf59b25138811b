"""
Which layer each video of one subscriber gets: the available bandwidth shared out, layer by layer.

Pure and synchronous: the subscribe transport calls :func:`allocate` every :data:`INTERVAL` with its bandwidth
estimate and, per video consumer, the options it can be given (:class:`Option`: a simulcast layer up to a
temporal layer, with what it costs), cut to the size at which the viewer shows it. As mediasoup's
``Transport::DistributeAvailableOutgoingBitrate``:

1. audio is never starved: its bitrate is taken off the budget first;
2. every video gets its cheapest option before any gets more;
3. then, round after round, each video in turn (highest priority first) is raised one option while the
   budget allows, until nothing more fits.

:class:`Hysteresis` keeps the choice steady on a sawtooth estimate: a consumer goes *down* once it has been
over its share for :data:`DOWN_AFTER` (or at once when far over), and *up* only after the budget has shown
:data:`UP_HEADROOM` above the next option for :data:`UP_AFTER` (at once when the viewer has just asked for a
larger size and the budget shows that headroom over it, or :data:`UP_NOW` over the best option); an upgrade
that had to be undone soon after doubles the wait before the next one (up to :data:`MAX_BACKOFF`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

#: How often the subscribe transport re-allocates (seconds).
INTERVAL = 0.25
#: Sustained excess before going down (seconds); congestion is acted on within ~2 s.
DOWN_AFTER = 0.75
#: Going down at once when the need is this many times the share.
DOWN_NOW = 1.5
#: Headroom the budget must show above the next option, for how long, before going up.
UP_HEADROOM = 1.2
UP_AFTER = 1.5
#: With this much headroom above the best option (e.g. the viewer enlarged a tile on a fast network), go there at
#: once: the hysteresis is for a budget near the need, not for a change of size.
UP_NOW = 2.0
#: The wait after a failed upgrade doubles up to this (seconds).
MAX_BACKOFF = 16.0
#: What the budget keeps back from the estimate (the estimate saws around the capacity).
BUDGET_SHARE = 1.0


@dataclass(frozen=True, slots=True)
class Option:
    """A stream a consumer can be given: spatial ``layer`` up to temporal layer ``temporal``, at ``bps``."""

    layer: int
    temporal: int
    bps: int


@dataclass(slots=True)
class Candidate:
    """One video consumer as the allocation sees it."""

    id: str
    #: Higher first (pinned, speaker, screen share).
    priority: int
    #: Ascending cost; empty when the viewer paused it or nothing is live.
    options: list[Option]
    #: Index in ``options`` of what it gets now, or ``None``.
    current: int | None = None


@dataclass(slots=True)
class Hysteresis:
    """Per-consumer memory that keeps allocations from flapping (see the module docstring)."""

    over_since: float | None = None
    headroom_since: float | None = None
    last_up: float = -1e9
    backoff: float = 2.0
    blocked_until: float = 0.0
    #: How many options the consumer had at the last allocation (more now: the viewer asked for a larger size).
    options: int = 0


@dataclass(slots=True)
class Decision:
    """What a consumer gets: an option index (``None``: nothing) and why."""

    index: int | None
    reason: str


@dataclass(slots=True)
class Allocation:
    decisions: dict[str, Decision] = field(default_factory=dict)
    #: What the chosen options cost together (bps), audio excluded.
    used_bps: int = 0
    #: What the viewers would want if bandwidth were no object (bps): probing aims at it.
    wanted_bps: int = 0


def allocate(budget_bps: int, audio_bps: int, candidates: list[Candidate], memory: dict[str, Hysteresis],
             now: float) -> Allocation:
    """Share ``budget_bps`` (minus ``audio_bps``) among ``candidates`` (see the module docstring)."""
    result = Allocation()
    video_budget = max(0, int(budget_bps * BUDGET_SHARE) - audio_bps)
    order = sorted(candidates, key=lambda c: -c.priority)
    ideal: dict[str, int | None] = {}
    for c in order:
        if not c.options:
            result.decisions[c.id] = Decision(None, "paused" if c.options == [] else "unavailable")
            ideal[c.id] = None
            continue
        result.wanted_bps += c.options[-1].bps
    live = [c for c in order if c.options]

    # The share each would get with no memory: lowest for all, then raise round-robin.
    chosen = {c.id: 0 for c in live}
    spent = sum(c.options[0].bps for c in live)
    changed = True
    while changed:
        changed = False
        for c in live:
            i = chosen[c.id]
            if i + 1 < len(c.options):
                extra = c.options[i + 1].bps - c.options[i].bps
                if spent + extra <= video_budget:
                    chosen[c.id] = i + 1
                    spent += extra
                    changed = True
    for c in live:
        ideal[c.id] = chosen[c.id]

    # Hysteresis: move each current choice towards its ideal one step at a time, only when sustained.
    for c in live:
        memo = memory.setdefault(c.id, Hysteresis())
        target = chosen[c.id]
        grew, memo.options = len(c.options) > memo.options > 0, len(c.options)
        current = c.current if c.current is not None and c.current < len(c.options) else None
        if current is None:
            # Nothing sent yet, or what is sent is no longer an option (the viewer shrank the tile, the layer
            # stopped): take the share at once.
            index, reason = target, "start"
            memo.over_since = memo.headroom_since = None
        elif target < current:
            memo.headroom_since = None
            need, share = c.options[current].bps, max(1, c.options[target].bps)
            if memo.over_since is None:
                memo.over_since = now
            if now - memo.over_since >= DOWN_AFTER or need >= DOWN_NOW * share or video_budget <= 0:
                index, reason = target, "bandwidth: down"
                memo.over_since = None
                if now - memo.last_up < 2 * UP_AFTER:  # the last upgrade did not hold
                    memo.backoff = min(memo.backoff * 2, MAX_BACKOFF)
                    memo.blocked_until = now + memo.backoff
            else:
                index, reason = current, "bandwidth: holding"
        elif target > current:
            memo.over_since = None
            step = current + 1
            fits = spent - c.options[target].bps + c.options[step].bps
            if memo.headroom_since is None:
                memo.headroom_since = now
            headroom = video_budget >= UP_HEADROOM * fits
            if (video_budget >= UP_NOW * spent or grew and video_budget >= UP_HEADROOM * spent) \
                    and now >= memo.blocked_until:
                index, reason = target, "size: up"
                memo.last_up = now
            elif headroom and now - memo.headroom_since >= UP_AFTER and now >= memo.blocked_until:
                index, reason = step, "bandwidth: up"
                memo.last_up = now
                memo.headroom_since = now  # one step at a time
            else:
                index, reason = current, "bandwidth: waiting" if headroom else "bandwidth: limited"
                if not headroom:
                    memo.headroom_since = None
        else:
            memo.over_since = memo.headroom_since = None
            index = current
            if now - memo.last_up > 4 * UP_AFTER:
                memo.backoff = 2.0
            reason = "best" if current == len(c.options) - 1 else "bandwidth"
        result.decisions[c.id] = Decision(index, reason)
        if index is not None:
            result.used_bps += c.options[index].bps
    for gone in memory.keys() - {c.id for c in candidates}:
        del memory[gone]
    return result


#: A layer fits a viewer when its height is at least the viewer's height divided by this (~10 % tolerance, so a
#: 352-pixel tile still takes a 360-pixel layer and a small resize does not switch).
SIZE_TOLERANCE = 1.1
#: The highest temporal layer a consumer can be given (VP8 L1T3: TID 0..2).
ALL_TEMPORAL = 2


class LayerSource(Protocol):
    """What the allocation reads of a source (see :class:`~.source.Source`)."""

    @property
    def layer_count(self) -> int: ...

    def layer_active(self, layer: int) -> bool: ...

    def layer_height(self, layer: int) -> int: ...

    def layer_temporal(self, layer: int) -> list[int]: ...


def layer_heights(source: LayerSource) -> list[int]:
    """Each layer's height; unknown ones guessed from the known ones (layers halve the size going down, as
    browsers send ¼, ½ and full), or from 720 p for the top."""
    n = source.layer_count
    heights = [source.layer_height(i) for i in range(n)]
    known = [(i, h) for i, h in enumerate(heights) if h > 0]
    anchor_index, anchor = known[-1] if known else (n - 1, 720)
    return [h if h > 0 else max(16, int(anchor * 2.0 ** (i - anchor_index))) for i, h in enumerate(heights)]


def wanted_layer(source: LayerSource, max_height: int | None) -> int:
    """The smallest layer whose height fits a viewer ``max_height`` pixels tall (the top one without a limit)."""
    heights = layer_heights(source)
    if max_height is None or max_height <= 0:
        return len(heights) - 1
    for i, height in enumerate(heights):
        if height * SIZE_TOLERANCE >= max_height:
            return i
    return len(heights) - 1


def nominal_bps(height: int) -> int:
    """A guess of what a layer costs before it has been measured (about 150 kbps at 180 p, 1.5 Mbps at 720 p)."""
    return max(50_000, height * height * 3)


def options(source: LayerSource, max_height: int | None, paused: bool) -> list[Option]:
    """
    What a consumer of ``source`` can be given, in rising quality and cost: the lowest live layer at each of its
    temporal layers (down to 7.5 fps when nothing else fits), then each higher live layer, up to the one that
    fits the viewer, at its two highest temporal layers (15 and 30 fps: a bigger picture at a choppy rate is
    not worth it). An option costing no more than the one before it is left out, so that going up an option
    always means more.
    """
    if paused:
        return []
    heights = layer_heights(source)
    out: list[Option] = []
    first = True
    for layer in range(wanted_layer(source, max_height) + 1):
        if not source.layer_active(layer):
            continue
        rates = source.layer_temporal(layer)
        if not rates or sum(rates) == 0:
            candidates = [Option(layer, ALL_TEMPORAL, nominal_bps(heights[layer]))]
        else:
            totals = [sum(rates[: tid + 1]) for tid in range(len(rates))]
            candidates = [Option(layer, ALL_TEMPORAL if tid == len(rates) - 1 else tid, total)
                          for tid, total in enumerate(totals)]
            if not first:
                candidates = candidates[-2:]
        for option in candidates:
            if not out or option.bps > out[-1].bps:
                out.append(option)
        first = False
    return out
