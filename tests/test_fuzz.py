"""Short fuzz runs of every target (``make fuzz`` runs them for minutes) and the corpus of past crashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ServerProcess, connect
from fuzz_targets import CORPUS, TARGETS, check_datagram, check_parse_sdp, check_publish
from hypothesis import HealthCheck, given, settings

from chorus.sfu.errors import InvalidSdpError
from chorus.sfu.sdp import parse_sdp
from chorus.signaling.client import ChorusClient, RequestError

SHORT = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target(name: str) -> None:
    strategy, check = TARGETS[name]
    examples = 40 if name == "sdp-publish" else 300
    given(strategy)(settings(SHORT, max_examples=examples)(check))()


SDP_CORPUS = sorted(p for p in CORPUS.glob("*.sdp") if p.name != "base-offer.sdp")


@pytest.mark.parametrize("path", SDP_CORPUS, ids=[p.name for p in SDP_CORPUS])
def test_sdp_corpus_gives_typed_errors(path: Path) -> None:
    """Inputs that made aiortc's own parser raise AssertionError/IndexError/KeyError/... become
    InvalidSdpError, in parsing and in a whole publish."""
    sdp = path.read_text()
    with pytest.raises(InvalidSdpError):
        parse_sdp(sdp)
    check_parse_sdp(sdp)
    check_publish(sdp)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.bin")), ids=lambda p: p.name)
def test_datagram_corpus(path: Path) -> None:
    check_datagram(path.read_bytes())


async def test_sdp_corpus_over_the_wire(server: ServerProcess, clients: list[ChorusClient], room_name: str) -> None:
    client = await connect(server, clients)
    await client.join(room_name, "fuzzer")
    for path in SDP_CORPUS:
        with pytest.raises(RequestError) as excinfo:
            await client.request("publish", {"type": "offer", "sdp": path.read_text()})
        assert excinfo.value.code == "invalid_sdp", (path.name, excinfo.value)
    assert "now" in await client.request("ping")
    assert json.dumps(await client.request("ping"))
