"""
Bad input for egress: an egress stopped while it starts, a full disk (a small tmpfs), room names and URLs that
try to leave their folder, requests for segments that do not exist — typed errors or 404, a webhook for the
failure, and the call goes on.
"""

from __future__ import annotations

import asyncio
import http.client as httpclient
import json
import os
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from calls import Received
from conftest import ServerProcess, connect
from egress_live import WebhookReceiver, api, http, wait_for
from media import EncodedVideoTrack, SineTrack, count_frames, encode_vp8_clip

from chorus.signaling import cli
from chorus.signaling.client import ChorusClient, RequestError


def raw_get(base: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side normalization of ``..`` or percent-encoding)."""
    parts = urlsplit(base)
    connection = httpclient.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.timeout(90)
async def test_stop_during_start_bad_names_and_missing_segments(server: ServerProcess, clients: list[ChorusClient],
                                                                room_name: str) -> None:
    base = server.http_url
    # A composite's worker takes a moment to load its codecs: stop the egress while it starts.
    async def seen_starting() -> dict[str, object] | None:
        _, listed = await api(base, "GET", f"/api/egress?room={room_name}")
        return next((e for e in listed["egresses"] if e["state"] == "starting"), None)

    async with asyncio.TaskGroup() as group:
        starting = group.create_task(api(base, "POST", "/api/egress", {"room": room_name, "kind": "hls"}))
        egress = await wait_for(seen_starting, 15, interval=0.05)
        status, stopped = await api(base, "DELETE", f"/api/egress/{egress['id']}")
    assert status == 200 and stopped["state"] == "ended" and stopped["reason"] == "stopped", stopped
    status, answer = starting.result()
    assert status == 409 and answer["error"]["code"] == "invalid_state", answer
    assert stopped["worker"]["pid"] is not None
    await wait_for(lambda: not Path(f"/proc/{stopped['worker']['pid']}").exists(), 10)  # no worker left behind
    status, again = await api(base, "DELETE", f"/api/egress/{egress['id']}")
    assert status == 200 and again["state"] == "ended"  # idempotent

    # Requests the admin API refuses, with typed errors.
    for body, code in (({"room": "../etc", "kind": "hls"}, "bad_input"), ({"room": "%2e%2e", "kind": "record"},
                       "bad_input"), ({"room": room_name, "kind": "rtmp"}, "bad_input"),
                       ({"room": room_name, "kind": "hls", "ladder": ["99999:1"]}, "bad_input")):
        status, answer = await api(base, "POST", "/api/egress", body)
        assert status == 400 and answer["error"]["code"] == code, (body, answer)
    status, answer = await api(base, "DELETE", "/api/egress/eg-000000000000")
    assert status == 404 and answer["error"]["code"] == "not_found"

    # Room names that are not a safe path segment are refused at join.
    client = await connect(server, clients)
    for name in ("..", ".", "../x", "%2e%2e", ".hidden", "a/b", "a\\b", "room\n"):
        with pytest.raises(RequestError) as error:
            await client.join(name, "mallory")
        assert error.value.code == "bad_request", name

    # URLs that try to leave the egress's or the recordings' folder, plainly or percent-encoded.
    status, egress = await api(base, "POST", "/api/egress", {"room": room_name, "kind": "hls",
                                                             "participant": "nobody", "public": True})
    assert status == 201
    for path in ("/hls/../etc/passwd", "/hls/%2e%2e/index.m3u8", f"/hls/{room_name}/%2e%2e%2f%2e%2e%2fetc/passwd",
                 f"/hls/{room_name}/source/..%2f..%2f..%2fetc%2fpasswd", f"/hls/{room_name}/source/%252e%252e",
                 f"/hls/{room_name}/.%2e/index.m3u8", "/dash/%2e%2e/index.mpd", f"/dash/{room_name}/../../x.mpd",
                 f"/recordings/{room_name}/..%2f..%2f/passwd.webm", "/recordings/%2e%2e/x/y.webm",
                 f"/recordings/{room_name}/x/..%2fsecret.mp4", "/recordings/.././x.webm"):
        status, body = await asyncio.to_thread(raw_get, base, path)
        assert status in (400, 404), (path, status, body[:200])
        assert b"root:" not in body
    # Segments that do not exist: 404, never cached.
    for path in (f"/hls/{room_name}/source/seg99999.m4s", f"/hls/{room_name}/index.m3u8",  # not started yet
                 f"/hls/{room_name}/nope/index.m3u8", f"/hls/no-such-room-{os.getpid()}/index.m3u8",
                 f"/dash/{room_name}/other.mpd", f"/hls/{room_name}/{egress['id']}/source/init.mp4"):
        status, headers, _ = await asyncio.to_thread(http, base + path)
        assert status == 404 and headers["Cache-Control"] == "no-store", (path, status)
    await api(base, "DELETE", f"/api/egress/{egress['id']}")


@pytest.mark.timeout(120)
async def test_full_disk_ends_the_egress_with_a_webhook_and_the_call_goes_on(tmp_path: Path, room_name: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], check=True)
    hooks = await WebhookReceiver().start()
    server = ServerProcess(tmp_path, env={
        "CHORUS_RECORDINGS_DIR": str(disk / "rec"), "CHORUS_EGRESS_OUTPUT_DIR": str(disk / "hls"),
        "CHORUS_WEBHOOK_URLS": json.dumps([hooks.url]), "CHORUS_EGRESS_LADDER": '["180:100"]'})
    clients: list[ChorusClient] = []
    try:
        base = server.http_url
        ids = []
        for body in ({"room": room_name, "kind": "record"},
                     {"room": room_name, "kind": "hls", "participant": "pub", "public": True}):
            status, egress = await api(base, "POST", "/api/egress", body)
            assert status == 201, egress
            ids.append(egress["id"])
        publisher = await connect(server, clients)
        await publisher.join(room_name, "pub", identity="pub")
        # Pre-encoded VP8: offered alone (the HLS egress would otherwise have the answer prefer H.264).
        await publisher.publish(SineTrack(440), EncodedVideoTrack(encode_vp8_clip(frames=60)), video_codec="video/VP8")
        watcher = await connect(server, clients)
        received = Received(watcher)
        await watcher.join(room_name, "watcher")
        await received.wait(2)
        video = received.tracks[(publisher.peer_id, "video")]  # type: ignore[index]

        # The disk fills: each egress ends, failed with io_error, and says so in a webhook.
        ended = await wait_for(lambda: len(hooks.named("egress_ended")) >= 2 and hooks.named("egress_ended"), 60)
        assert {e["egress"]["id"] for e in ended} == set(ids)
        for event in ended:
            assert event["reason"] == "failed" and event["error"]["code"] == "io_error", event
            assert event["room"] == room_name and isinstance(event["files"], list)
        assert {e["egress"]["id"] for e in hooks.named("egress_started")} == set(ids)
        _, listed = await api(base, "GET", f"/api/egress?room={room_name}")
        assert all(e["state"] == "ended" and e["error"]["code"] == "io_error" for e in listed["egresses"])
        # The call goes on.
        await count_frames(video, 0.5)
        assert await count_frames(video, 2.0) >= 30
        _, _, metrics = await asyncio.to_thread(http, f"{base}/metrics")
        assert b'chorus_egress_errors_total{code="io_error"} 2.0' in metrics, metrics[-2000:]
        assert "Traceback" not in server.log()
    finally:
        for client in clients:
            await client.close()
        server.stop()
        await hooks.stop()
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.timeout(60)
async def test_the_cli_talks_to_a_running_server(server: ServerProcess, room_name: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``chorus egress start|list|stop`` (its ``main``, run here rather than in three more Python processes)."""
    def chorus(*args: str) -> tuple[int, dict[str, object]]:
        code = cli.main(["egress", *args, "--server", server.http_url])
        return code, json.loads(capsys.readouterr().out)

    code, started = await asyncio.to_thread(chorus, "start", "--room", room_name, "--kind", "record")
    assert code == 0 and started["state"] == "waiting" and started["kind"] == "record", started
    code, listed = await asyncio.to_thread(chorus, "list", "--room", room_name)
    assert code == 0 and [e["id"] for e in listed["egresses"]] == [started["id"]]  # type: ignore[index]
    code, stopped = await asyncio.to_thread(chorus, "stop", str(started["id"]))
    assert code == 0 and stopped["state"] == "ended" and stopped["reason"] == "stopped"
    code, refused = await asyncio.to_thread(chorus, "start", "--room", "../x", "--kind", "hls")
    assert code == 1 and refused["error"]["code"] == "bad_input"  # type: ignore[index]


@pytest.mark.timeout(90)
async def test_a_drain_ends_egresses_with_their_rooms(tmp_path: Path, room_name: str) -> None:
    """A draining node takes no new egress, ends the running ones as their rooms close (playlists end, files
    final, a webhook each) and exits once they have."""
    hooks = await WebhookReceiver().start()
    server = ServerProcess(tmp_path, env={"CHORUS_RECORDINGS_DIR": str(tmp_path / "rec"),
                                          "CHORUS_EGRESS_OUTPUT_DIR": str(tmp_path / "www"),
                                          "CHORUS_WEBHOOK_URLS": json.dumps([hooks.url])})
    clients: list[ChorusClient] = []
    try:
        base = server.http_url
        ids = []
        for body in ({"room": room_name, "kind": "record"},
                     {"room": room_name, "kind": "hls", "participant": "pub", "ladder": [], "public": True}):
            status, egress = await api(base, "POST", "/api/egress", body)
            assert status == 201, egress
            ids.append(egress["id"])
        publisher = await connect(server, clients)
        await publisher.join(room_name, "pub", identity="pub")
        await publisher.publish(SineTrack(440), EncodedVideoTrack(encode_vp8_clip(frames=60)), video_codec="video/VP8")

        async def segments() -> bool:
            _, described = await api(base, "GET", f"/api/egress/{ids[1]}")
            return any(r["segments"] for r in described["renditions"])

        await wait_for(segments, 30)
        status, _ = await api(base, "POST", "/api/drain", {"timeout": 3})
        assert status == 202
        status, refused = await api(base, "POST", "/api/egress", {"room": room_name, "kind": "record"})
        assert status == 503 and refused["error"]["code"] == "unavailable", refused
        ended = await wait_for(lambda: len(hooks.named("egress_ended")) >= 2 and hooks.named("egress_ended"), 30)
        assert {e["egress"]["id"] for e in ended} == set(ids) and all(e["error"] is None for e in ended), ended
        await wait_for(lambda: server.proc.poll() is not None, 30)  # the drained node exits by itself
        assert server.proc.returncode == 0
    finally:
        for client in clients:
            await client.close()
        server.stop()
        await hooks.stop()
    playlist = tmp_path / "www" / room_name / ids[1] / "source" / "index.m3u8"
    assert playlist.read_text().rstrip().endswith("#EXT-X-ENDLIST")
    recordings = sorted((tmp_path / "rec" / room_name).glob("*/*.webm"))
    assert len(recordings) == 2 and all(p.stat().st_size > 1000 for p in recordings)
    assert "Traceback" not in server.log()
