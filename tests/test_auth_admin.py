"""Room tokens, the admin API, webhooks and metrics, against a Chorus process with auth on."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import os
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from calls import Received
from conftest import ServerProcess, connect
from media import ColorTrack, SineTrack, count_frames

from chorus.signaling import auth
from chorus.signaling.client import ChorusClient, RequestError

SECRET = "test-secret-" + "x" * 40
WEBHOOK_SECRET = "webhook-secret-" + "y" * 20


class WebhookReceiver:
    """A plain HTTP server on loopback that records every POST."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        received = self.deliveries

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self, room: str) -> list[dict[str, Any]]:
        out = []
        for headers, body in list(self.deliveries):
            data = json.loads(body)
            if data.get("room") == room:
                out.append({**data, "_headers": headers, "_body": body})
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def webhooks() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory, webhooks: WebhookReceiver) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("auth"), env={
        "CHORUS_DEV_MODE": "0",
        "CHORUS_AUTH_SECRET": SECRET,
        "CHORUS_WEBHOOK_URLS": json.dumps([webhooks.url]),
        "CHORUS_WEBHOOK_SECRET": WEBHOOK_SECRET,
    })
    yield proc
    proc.stop()
    log = proc.log()
    assert "Traceback" not in log, log[-5000:]


def token(room: str | None = "r", identity: str = "alice", **kwargs: Any) -> str:
    return auth.create_token(SECRET, identity=identity, room=room, **kwargs)


def unsigned_token(room: str) -> str:
    """A token with alg=none: a classic JWT forgery."""
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': 'eve', 'room': room, 'exp': time.time() + 600})}."


def udp_sockets(pid: int) -> int:
    """UDP sockets the process has open (ICE allocates one per candidate)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            if line.split()[9] in inodes:
                count += 1
    return count


async def test_token_matrix_is_rejected_before_any_allocation(auth_server: ServerProcess,
                                                              clients: list[ChorusClient]) -> None:
    room = "tokens"
    other_secret = "another-secret-" + "z" * 40
    cases = {
        "missing": (None, "unauthorized"),
        "garbage": ("not-a-jwt", "unauthorized"),
        "expired": (token(room, ttl=-10), "unauthorized"),
        "not yet valid": (token(room, not_before=time.time() + 600), "unauthorized"),
        "bad signature": (auth.create_token(other_secret, identity="alice", room=room), "unauthorized"),
        "alg none": (unsigned_token(room), "unauthorized"),
        "wrong room": (token("some-other-room"), "forbidden"),
        "admin-only token": (token(None, admin=True), "forbidden"),
    }
    baseline = udp_sockets(auth_server.proc.pid)
    rejected = 0
    for label, (bad, code) in cases.items():
        client = await connect(auth_server, clients)
        with pytest.raises(RequestError) as excinfo:
            await client.join(room, "mallory", token=bad)
        assert excinfo.value.code == code, label
        rejected += 1

    # Joined with a subscribe-only token: publishing is refused before any connection is made.
    viewer = await connect(auth_server, clients)
    joined = await viewer.join(room, "viewer", token=token(room, "viewer", can_publish=False))
    assert joined["can_publish"] is False
    with pytest.raises(RequestError) as excinfo:
        await viewer.publish(SineTrack(440))
    assert excinfo.value.code == "forbidden"
    rejected += 1

    assert rejected == len(cases) + 1  # 100 % of the matrix
    # No ICE socket was opened on the server for any of them (the client side made its own).
    assert udp_sockets(auth_server.proc.pid) == baseline


async def test_valid_token_names_the_participant(auth_server: ServerProcess, clients: list[ChorusClient]) -> None:
    first = await connect(auth_server, clients)
    await first.join("tokens-ok", "", token=token("tokens-ok", "bob", name="Bob"))
    second = await connect(auth_server, clients)
    announced = first.expect_event("peer_joined")
    joined = await second.join("tokens-ok", "", token=token("tokens-ok", "carol"))
    assert [p["name"] for p in joined["peers"]] == ["Bob"]  # the token's name, else its identity
    assert (await announced)["peer"]["name"] == "carol"


async def test_token_metadata_is_the_participants(auth_server: ServerProcess, clients: list[ChorusClient]) -> None:
    host = await connect(auth_server, clients)
    joined = await host.join("tokens-meta", "", token=token("tokens-meta", "hana", metadata={"role": "host"}))
    assert joined["own_metadata"] == {"role": "host"}
    guest = await connect(auth_server, clients)
    joined = await guest.join("tokens-meta", "", token=token("tokens-meta", "gus"))
    assert [p["metadata"] for p in joined["peers"]] == [{"role": "host"}] and joined["own_metadata"] == {}
    forged = jwt_with(metadata="not an object")
    with pytest.raises(RequestError) as excinfo:
        await (await connect(auth_server, clients)).join("tokens-meta", "", token=forged)
    assert excinfo.value.code == "unauthorized"


def jwt_with(**claims: Any) -> str:
    import jwt

    return jwt.encode({"sub": "x", "room": "tokens-meta", "exp": int(time.time()) + 60, **claims}, SECRET,
                      algorithm="HS256")


def admin_headers(admin: bool = True) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(None, 'ops', admin=admin) if admin else token('x', 'ops')}"}


async def test_admin_api_and_webhooks(auth_server: ServerProcess, clients: list[ChorusClient],
                                      webhooks: WebhookReceiver) -> None:
    room = "admin-room"
    alice = await connect(auth_server, clients)
    await alice.join(room, "alice", token=token(room, "alice"))
    tracks = await alice.publish(SineTrack(440), ColorTrack())
    bob = await connect(auth_server, clients)
    bob_received = Received(bob)
    await bob.join(room, "bob", token=token(room, "bob"))
    await bob_received.wait(2)
    assert await count_frames(bob_received.tracks[(alice.peer_id, "video")], 1.0) > 5  # type: ignore[index]

    api = f"{auth_server.http_url}/api"
    async with aiohttp.ClientSession() as http:
        # Authorization is required, and must carry the admin grant.
        async with http.get(f"{api}/rooms") as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
        async with http.get(f"{api}/rooms", headers=admin_headers(admin=False)) as r:
            assert r.status == 403
        async with http.get(f"{api}/rooms/nope", headers=admin_headers()) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"

        async with http.get(f"{api}/rooms", headers=admin_headers()) as r:
            listed = {x["id"]: x for x in (await r.json())["rooms"]}
        assert listed[room]["participants"] == 2 and listed[room]["tracks"] == 2
        async with http.get(f"{api}/rooms/{room}", headers=admin_headers()) as r:
            detail = await r.json()
        by_name = {p["name"]: p for p in detail["participants"]}
        assert {t["kind"] for t in by_name["alice"]["tracks"]} == {"audio", "video"}

        # Mute a track: both sides hear about it, and its media stops.
        video_id = next(t["id"] for t in tracks if t["kind"] == "video")
        muted = bob.expect_event("track_muted")
        async with http.post(f"{api}/rooms/{room}/tracks/{video_id}/mute", json={"muted": True},
                             headers=admin_headers()) as r:
            assert r.status == 200
        assert (await muted)["muted"] is True
        async with http.post(f"{api}/rooms/{room}/tracks/{video_id}/mute", data=b"{bad",
                             headers=admin_headers()) as r:
            assert r.status == 400

        # Kick bob: alice sees him gone within 2 s, bob is told why.
        gone = alice.expect_event("peer_left", lambda d: d["peer_id"] == bob.peer_id)
        told = bob.expect_event("left")
        kicked_at = time.monotonic()
        async with http.delete(f"{api}/rooms/{room}/participants/{bob.peer_id}", headers=admin_headers()) as r:
            assert r.status == 204
        await gone
        assert time.monotonic() - kicked_at < 2.0
        assert (await told)["reason"] == "kicked"

        # Close the room: alice is told, the room is gone.
        closed = alice.expect_event("left")
        async with http.delete(f"{api}/rooms/{room}", headers=admin_headers()) as r:
            assert r.status == 204
        assert (await closed)["reason"] == "closed by admin"
        async with http.get(f"{api}/rooms/{room}", headers=admin_headers()) as r:
            assert r.status == 404

    # Webhooks: signed, and in the order things happened.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(e["event"] == "room_finished" for e in webhooks.events(room)):
        await asyncio.sleep(0.1)
    events = webhooks.events(room)
    names = [e["event"] for e in events]
    assert names[0] == "room_started" and names[-1] == "room_finished", names
    assert names[1] == "participant_joined" and events[1]["participant"]["name"] == "alice"
    assert names.count("track_published") == 2
    assert names.index("track_published") < names.index("participant_joined", 2)  # alice published, then bob
    assert names.count("participant_left") == 2  # bob (kicked), alice (room closed)
    ids = [int(e["_headers"]["X-Chorus-Delivery"]) for e in events]
    assert ids == sorted(ids)
    for e in events:
        expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), e["_body"], hashlib.sha256).hexdigest()
        assert e["_headers"]["X-Chorus-Signature"] == expected
        assert e["_headers"]["X-Chorus-Event"] == e["event"]


def scrape(server: ServerProcess) -> dict[str, float]:
    text = urllib.request.urlopen(f"{server.http_url}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(chorus_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return values


async def test_metrics_show_forwarding(server: ServerProcess, clients: list[ChorusClient], room_name: str) -> None:
    alice = await connect(server, clients)
    await alice.join(room_name, "alice")
    await alice.publish(SineTrack(440), ColorTrack())
    bob = await connect(server, clients)
    received = Received(bob)
    await bob.join(room_name, "bob")
    await received.wait(2)
    await count_frames(received.tracks[(alice.peer_id, "video")], 0.5)  # type: ignore[index]
    first = scrape(server)
    await asyncio.sleep(1.0)
    second = scrape(server)
    assert second["chorus_rtp_forwarded_packets_total"] > first["chorus_rtp_forwarded_packets_total"] + 20
    assert second["chorus_rtp_received_packets_total"] > first["chorus_rtp_received_packets_total"] + 20
    assert second["chorus_rooms"] >= 1 and second["chorus_peers"] >= 2
    assert second['chorus_consumers{kind="video"}'] >= 1
    assert "chorus_keyframe_requests_total" in second


async def test_health_and_readiness(server: ServerProcess) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz"):
            async with http.get(server.http_url + path) as r:
                assert r.status == 200, path
