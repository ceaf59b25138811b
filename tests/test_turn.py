"""
TURN with a real coturn: relay-only calls (aiortc peers, headless Chromium) through a real Chorus process,
``chorus turn check``, refused expired credentials, and the hardened config's deny list.

Every packet stays on loopback: coturn listens and relays on 127.0.0.1 (and ::1). The deny-list tests only
send CreatePermission requests to coturn, which install (or refuse) state there; nothing is sent to the
peer addresses named in them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from browser import CHROMIUM, FLAGS, INBOUND_STATS, wait_until
from calls import Received
from conftest import ServerProcess
from coturn import SECRET, TURNSERVER, Coturn, free_udp_tcp_port
from coturn import coturn_fixture as coturn_fixture  # the `coturn` fixture
from coturn import hardened_coturn_fixture as hardened_coturn_fixture  # the `hardened_coturn` fixture
from media import ColorTrack, SineTrack

from chorus.sfu import aiortc_adapter
from chorus.signaling.client import ChorusClient
from chorus.signaling.config import Settings
from chorus.turn import check as turn_check
from chorus.turn import cli as turn_cli
from chorus.turn import config as turn_config
from chorus.turn.client import Transport, TurnClient, TurnError
from chorus.turn.credentials import ice_servers, mint

pytestmark = pytest.mark.skipif(not os.path.exists(TURNSERVER), reason="coturn is not installed")


@pytest.fixture(autouse=True)
def _no_chorus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings built in these tests must not pick up CHORUS_* variables of the shell running them."""
    for name in [n for n in os.environ if n.startswith("CHORUS_")]:
        monkeypatch.delenv(name)


# --- credentials ---------------------------------------------------------------------------------------


def test_credential_format_and_known_vector() -> None:
    credential = mint("chorus-vector-secret", "alice", 3600, now=1_700_000_000)
    assert credential.username == "1700003600:alice"
    assert credential.expires_at == 1_700_003_600
    # Computed independently: printf '1700003600:alice' | openssl dgst -sha1 -hmac chorus-vector-secret -binary | base64
    assert credential.password == "XOlqMV619F+ENCxqSZ0FbJD9cxc="
    digest = hmac.new(b"chorus-vector-secret", b"1700003600:alice", hashlib.sha1).digest()
    assert base64.b64decode(credential.password) == digest


def test_credential_rejects_separator_and_empty_secret() -> None:
    with pytest.raises(ValueError, match="':'"):
        mint("secret", "al:ice", 60)
    with pytest.raises(ValueError, match="empty"):
        mint("", "alice", 60)


def test_ice_servers_entry_carries_fresh_credentials() -> None:
    urls = ["turn:127.0.0.1:3478?transport=udp"]
    servers = ice_servers(identity="p-1", turn_secret="s", turn_urls=urls, stun_urls=["stun:127.0.0.1:3478"], ttl=60)
    assert servers[0] == {"urls": ["stun:127.0.0.1:3478"]}
    expiry, identity = servers[1]["username"].split(":")
    assert identity == "p-1" and abs(int(expiry) - (time.time() + 60)) < 5
    assert servers[1]["credential"] == mint("s", "p-1", 60, now=int(expiry) - 60).password
    assert ice_servers(identity="p-1", turn_secret=None, turn_urls=urls, stun_urls=[], ttl=60) == []


# --- config rendering ----------------------------------------------------------------------------------


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_rendered_config_is_hardened() -> None:
    settings = Settings(turn_secret="s3cret", turn_port=3479, turn_relay_ip="203.0.113.5",
                        turn_external_ip="198.51.100.9", turn_max_bps=500_000)
    lines = _lines(turn_config.render(settings))
    for expected in ("use-auth-secret", "static-auth-secret=s3cret", "realm=chorus.local", "listening-ip=127.0.0.1",
                     "listening-port=3479", "relay-ip=203.0.113.5", "external-ip=198.51.100.9", "min-port=49160",
                     "max-port=49999", "fingerprint", "no-cli", "no-multicast-peers", "no-tlsv1", "no-tlsv1_1",
                     "stale-nonce=600", "user-quota=12", "total-quota=1200", "max-bps=500000", "no-tls", "no-dtls",
                     "no-tcp-relay", "prometheus", "log-file=stdout", "denied-peer-ip=127.0.0.0-127.255.255.255",
                     "denied-peer-ip=::1", "denied-peer-ip=::ffff:0:0-::ffff:ffff:ffff",
                     "denied-peer-ip=169.254.0.0-169.254.255.255", "denied-peer-ip=100.64.0.0-100.127.255.255",
                     "denied-peer-ip=fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                     "denied-peer-ip=fe80::-febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff"):
        assert expected in lines, expected
    assert "allow-loopback-peers" not in lines
    assert not any(line.startswith(("cert=", "pkey=", "tls-listening-port=")) for line in lines)
    # coturn takes a denied-peer-ip of 0.0.0.0, :: or a range from :: as "every address": never render one.
    denied = [line.removeprefix("denied-peer-ip=") for line in lines if line.startswith("denied-peer-ip=")]
    assert not [d for d in denied if d in ("0.0.0.0", "::") or d.startswith("::-")]


def test_rendered_config_test_variant_and_tls() -> None:
    lines = _lines(turn_config.render(Settings(turn_secret="s"), allow_loopback_peers=True,
                                      allowed_peer_ips=["10.1.2.3"]))
    assert "allow-loopback-peers" in lines and "allowed-peer-ip=10.1.2.3" in lines
    assert "denied-peer-ip=127.0.0.0-127.255.255.255" not in lines and "denied-peer-ip=::1" not in lines
    assert "denied-peer-ip=10.0.0.0-10.255.255.255" in lines

    tls = Settings(turn_secret="s", turn_tls_cert=Path("/etc/c.pem"), turn_tls_key=Path("/etc/k.pem"))
    lines = _lines(turn_config.render(tls))
    assert {"cert=/etc/c.pem", "pkey=/etc/k.pem", "tls-listening-port=5349", "no-dtls"} <= set(lines)
    assert "no-tls" not in lines


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "turn_secret is not set"),
        ({"turn_secret": " padded"}, "whitespace"),
        ({"turn_secret": "s", "turn_tls_cert": Path("/c.pem")}, "together"),
        ({"turn_secret": "s", "turn_min_port": 50000, "turn_max_port": 49999}, "above"),
        ({"turn_secret": "s\nno-auth"}, "line breaks"),
    ],
)
def test_render_refuses_bad_settings(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        turn_config.render(Settings(**settings))


@pytest.mark.parametrize("peer", ["10.0.0.300", "0.0.0.0", "::-::1", "example.org"])
def test_render_refuses_bad_allowed_peers(peer: str) -> None:
    with pytest.raises(ValueError):
        turn_config.render(Settings(turn_secret="s"), allowed_peer_ips=[peer])


def test_deny_list_covers_the_addresses_that_matter() -> None:
    networks = [ipaddress.ip_network(n) for n, _ in turn_config.denied_networks()]
    for address in ("127.0.0.1", "10.0.0.1", "172.20.1.1", "192.168.1.1", "100.64.0.1", "169.254.169.254",
                    "0.0.0.1", "224.0.0.251", "255.255.255.255", "::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
                    "64:ff9b::a00:1", "2002:a00:1::", "fd00::1", "fe80::1", "ff02::1"):
        assert any(ipaddress.ip_address(address) in n for n in networks), address
    for address in ("8.8.8.8", "2001:4860:4860::8888"):
        assert not any(ipaddress.ip_address(address) in n for n in networks), address


# --- coturn: credentials and the deny list --------------------------------------------------------------


def _client(server: Coturn, *, ttl: int = 300, secret: str = SECRET, **kwargs: Any) -> TurnClient:
    credential = mint(secret, "test", ttl)
    return TurnClient(server.host, server.port, username=credential.username, password=credential.password,
                      timeout=2.0, **kwargs)


async def test_expired_credential_is_refused(coturn: Coturn) -> None:
    async with _client(coturn, ttl=-60) as client:
        with pytest.raises(TurnError) as refused:
            await client.allocate()
        assert refused.value.code == 401 and client.challenged
    past = mint(SECRET, "test", 3600, now=time.time() - 7200)  # minted two hours ago, valid for one
    async with TurnClient(coturn.host, coturn.port, username=past.username, password=past.password) as client:
        with pytest.raises(TurnError, match="401"):
            await client.allocate()
    async with _client(coturn) as client:  # the same, unexpired, is accepted
        allocation = await client.allocate()
        assert allocation.relayed[0] == "127.0.0.1"


async def _permission(client: TurnClient, peer: str) -> int | str:
    try:
        await client.create_permission(peer)
    except TurnError as exc:
        return exc.code
    return "allowed"


async def test_hardened_config_refuses_private_peers(hardened_coturn: Coturn) -> None:
    async with _client(hardened_coturn) as v4, _client(hardened_coturn) as v6:
        assert (await v4.allocate()).relayed[0] == "127.0.0.1"
        assert (await v6.allocate(family=6)).relayed[0] == "::1"
        for peer in ("127.0.0.1", "10.0.0.1", "169.254.169.254"):
            assert await _permission(v4, peer) == 403, peer
        # An IPv4-mapped address is IPv6 on the wire: an IPv4 allocation answers 443 (family mismatch), an
        # IPv6 one would relay to it -- only the ::ffff:0:0/96 deny line stops that.
        assert await _permission(v4, "::ffff:127.0.0.1") == 443
        for peer in ("::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::1", "fd00::1"):
            assert await _permission(v6, peer) == 403, peer
        # Public peers stay allowed (only a permission in coturn; nothing is sent to them).
        assert await _permission(v4, "8.8.8.8") == "allowed"
        assert await _permission(v6, "2001:4860:4860::8888") == "allowed"


async def test_every_denied_range_is_refused_by_coturn(hardened_coturn: Coturn) -> None:
    async with _client(hardened_coturn) as v4, _client(hardened_coturn) as v6:
        await v4.allocate()
        await v6.allocate(family=6)
        allowed = []
        for network, _ in turn_config.denied_networks():
            net = ipaddress.ip_network(network)
            for address in {net.network_address + (1 if net.num_addresses > 1 else 0), net.broadcast_address}:
                client = v4 if net.version == 4 else v6
                if await _permission(client, str(address)) != 403:
                    allowed.append(str(address))
        assert not allowed
        assert await _permission(v4, "0.0.0.0") == 403 and await _permission(v6, "::") == 403  # coturn's own


async def test_without_the_mapped_range_coturn_relays_to_ipv4_mapped_loopback(tmp_path: Path) -> None:
    """Why ::ffff:0:0/96 is denied: without it, an IPv6 allocation gets a permission for ::ffff:127.0.0.1."""
    server = Coturn(tmp_path, extra_args=["--relay-ip=::1"],
                    edit=lambda text: text.replace("denied-peer-ip=::ffff:0:0-::ffff:ffff:ffff\n", ""))
    try:
        async with _client(server) as v6:
            await v6.allocate(family=6)
            assert await _permission(v6, "::ffff:127.0.0.1") == "allowed"
            assert await _permission(v6, "::1") == 403
    finally:
        server.stop()


# --- turn check ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_check_passes_against_coturn(coturn: Coturn, transport: Transport) -> None:
    seen: list[turn_check.Step] = []
    result = await turn_check.check(coturn.host, coturn.port, SECRET, realm="chorus.local",
                                    transport=transport, progress=seen.append)
    assert result.ok, result.steps
    assert [s.name for s in seen] == ["reachable", "authentication", "allocation", "relay"]
    assert all(s.status == "pass" for s in seen)
    assert "relayed address 127.0.0.1:" in seen[2].detail
    assert "back in" in seen[3].detail


async def test_check_reports_a_wrong_secret(coturn: Coturn) -> None:
    result = await turn_check.check(coturn.host, coturn.port, "not-the-secret")
    assert not result.ok
    assert [(s.name, s.status) for s in result.steps] == [("reachable", "pass"), ("authentication", "fail")]
    assert "401" in result.steps[-1].detail and "wrong secret or expired credential" in result.steps[-1].detail


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_check_reports_an_unreachable_server(transport: Transport) -> None:
    port = free_udp_tcp_port()  # nothing listens there
    started = time.monotonic()
    result = await turn_check.check("127.0.0.1", port, SECRET, transport=transport, timeout=1.0)
    assert not result.ok and [s.name for s in result.steps] == ["reachable"]
    assert result.steps[0].detail.startswith(f"no response from 127.0.0.1:{port}")
    assert time.monotonic() - started < 2


async def test_check_reports_a_silent_server() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        result = await turn_check.check("127.0.0.1", port, SECRET, timeout=0.5)
    assert [(s.name, s.status) for s in result.steps] == [("reachable", "fail")]
    assert result.steps[0].detail == f"no response from 127.0.0.1:{port} within 0.5s"


async def test_check_on_a_hardened_server_reports_the_denied_echo_peer(hardened_coturn: Coturn) -> None:
    result = await turn_check.check(hardened_coturn.host, hardened_coturn.port, SECRET)
    assert result.ok  # the relay works; the loopback echo peer is refused by policy, as it should be
    relay = result.steps[-1]
    assert relay.status == "warn" and "relay works but peer address 127.0.0.1 denied by policy" in relay.detail


def _chorus_turn(*argv: str, **settings: Any) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(prog="chorus")
    turn_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["turn", *argv]), Settings(**settings)


def test_cli_check(coturn: Coturn, capsys: pytest.CaptureFixture[str]) -> None:
    args, settings = _chorus_turn("check", "--timeout", "2", turn_secret=SECRET, turn_port=coturn.port)
    assert turn_cli.run(args, settings) == 0
    out = capsys.readouterr().out
    print(out)
    assert out.count("[PASS]") == 4 and "TURN check passed" in out

    args, settings = _chorus_turn("check", turn_secret="wrong", turn_port=coturn.port)
    assert turn_cli.run(args, settings) == 1
    assert "[FAIL] authentication" in capsys.readouterr().out


def test_cli_config_and_credentials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "turnserver.conf"
    args, settings = _chorus_turn("config", "--output", str(target), turn_secret="s3cret")
    assert turn_cli.run(args, settings) == 0
    assert target.stat().st_mode & 0o777 == 0o600
    assert "static-auth-secret=s3cret" in target.read_text()

    args, settings = _chorus_turn("credentials", "--identity", "alice", "--ttl", "120", turn_secret="s3cret")
    assert turn_cli.run(args, settings) == 0
    out = capsys.readouterr().out
    entry = json.loads(out.strip().splitlines()[-1])
    expiry, identity = entry["username"].split(":")
    assert identity == "alice" and entry["urls"] == settings.turn_urls
    assert entry["credential"] == mint("s3cret", "alice", 120, now=int(expiry) - 120).password
    assert f"username: {entry['username']}" in out

    args, settings = _chorus_turn("credentials")
    assert turn_cli.run(args, settings) == 2
    assert "turn_secret is not set" in capsys.readouterr().err


# --- relay-only calls through coturn ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def turn_chorus(coturn: Coturn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A Chorus server handing out credentials for the loopback-allowed coturn (UDP only)."""
    server = ServerProcess(
        tmp_path_factory.mktemp("chorus-turn"),
        env={"CHORUS_TURN_SECRET": SECRET, "CHORUS_TURN_URLS": json.dumps([coturn.url("udp")])},
    )
    yield server
    server.stop()
    log = server.log()
    assert "Traceback" not in log and "Task exception was never retrieved" not in log, log[-5000:]


async def decode_frames(track: MediaStreamTrack, frames: int, *, timeout: float) -> int:
    """Decode frames from ``track`` until ``frames`` arrived or ``timeout`` passed; returns how many did."""
    got = 0
    deadline = time.monotonic() + timeout
    while got < frames and (left := deadline - time.monotonic()) > 0:
        try:
            await asyncio.wait_for(track.recv(), left)
        except (TimeoutError, MediaStreamError):
            break
        got += 1
    return got


def _selected_local_candidate_type(pc: RTCPeerConnection) -> str:
    """The type of the local candidate of the nominated ICE pair (aioice internals: test-only)."""
    kind = aiortc_adapter.nominated_local_candidate_type(pc.getTransceivers()[0].sender.transport)
    assert kind is not None, "no nominated candidate pair"
    return kind


async def test_relay_only_call_between_aiortc_peers(coturn: Coturn, turn_chorus: ServerProcess,
                                                    room_name: str) -> None:
    peers: list[tuple[ChorusClient, Received]] = []
    usernames: list[str] = []
    try:
        for i in range(2):
            client = ChorusClient(turn_chorus.ws_url, ice_transport_policy="relay")
            await client.connect()
            received = Received(client)
            peers.append((client, received))
            joined = await client.join(room_name, f"relay{i}")
            turn_entry = joined["ice_servers"][-1]
            assert turn_entry["urls"] == [coturn.url("udp")]
            usernames.append(turn_entry["username"])
            await client.publish(SineTrack(440.0 * (i + 1)), ColorTrack())
        for _, received in peers:
            await received.wait(2, timeout=15)  # audio + video from the other

        counts = await asyncio.gather(*[
            decode_frames(track, 20, timeout=10.0) for _, received in peers
            for (_, kind), track in received.tracks.items() if kind == "video"
        ])
        assert counts == [20, 20], counts

        for client, _ in peers:
            for pc in (client.publish_pc, client.subscribe_pc):
                assert pc is not None
                assert _selected_local_candidate_type(pc) == "relay"
        # coturn granted allocations to the credentials Chorus minted for these participants
        log = coturn.log()
        for username in usernames:
            assert f"user <{username}>: incoming packet ALLOCATE processed, success" in log
    finally:
        for client, _ in peers:
            await client.close()


SELECTED_PAIR = """async () => {
  const out = {};
  for (const target of ['publish', 'subscribe']) {
    const pc = window.chorus && window.chorus[target + 'Pc'];
    if (!pc) continue;
    const stats = await pc.getStats();
    let pair = null;
    stats.forEach(r => {
      if (r.type === 'transport' && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId);
    });
    if (!pair) stats.forEach(r => {
      if (r.type === 'candidate-pair' && r.nominated && r.state === 'succeeded') pair = r;
    });
    if (!pair) continue;
    const local = stats.get(pair.localCandidateId);
    out[target] = {type: local.candidateType, relayProtocol: local.relayProtocol || null};
  }
  return out;
}"""


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    playwright_api = pytest.importorskip("playwright.async_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed")
    async with playwright_api.async_playwright() as p:
        # Loopback allowed in peer connections: Chromium must reach coturn on 127.0.0.1 even on a machine
        # whose only interface is lo.
        instance = await p.chromium.launch(executable_path=CHROMIUM,
                                           args=[*FLAGS, "--allow-loopback-in-peer-connection"])
        yield instance
        await instance.close()


async def test_relay_only_browser_receives_video(turn_chorus: ServerProcess, browser: Any, room_name: str) -> None:
    publisher = ChorusClient(turn_chorus.ws_url)
    await publisher.connect()
    try:
        await publisher.join(room_name, "bot")
        await publisher.publish(SineTrack(440.0), ColorTrack())
        context = await browser.new_context()
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(f"{turn_chorus.http_url}/?room={room_name}&name=relayed&ice=relay")

        await wait_until(page, f"({INBOUND_STATS})().then(s => s.video_frames > 10)", 15)
        first = (await page.evaluate(INBOUND_STATS))["video_frames"]
        await asyncio.sleep(1.0)
        second = (await page.evaluate(INBOUND_STATS))["video_frames"]
        assert second - first >= 10, (first, second)  # still decoding, ~30 fps

        selected = await page.evaluate(SELECTED_PAIR)
        assert selected["subscribe"]["type"] == "relay", selected
        if "publish" in selected:  # the page publishes its fake camera too
            assert selected["publish"]["type"] == "relay", selected
        assert not errors, errors
        await context.close()
    finally:
        await publisher.close()
