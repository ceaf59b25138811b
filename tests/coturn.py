"""
A real coturn (``turnserver``, Debian's package) on 127.0.0.1 for tests, configured by
:func:`turn.config.render` from Chorus settings, and pytest fixtures around it.

Import the fixtures into a test module (``from coturn import coturn_fixture, hardened_coturn_fixture``);
tests then ask for ``coturn`` or ``hardened_coturn``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from aioice import stun

from chorus.signaling.config import Settings
from chorus.turn import config

TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"

#: The secret the fixtures' coturn instances share with the tests.
SECRET = "chorus-test-secret"


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` (coturn listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


def stun_answers(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether a STUN Binding request to ``host:port`` (UDP) is answered."""
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(bytes(request), (host, port))
            data = sock.recv(2048)
        except OSError:  # timeout, or port unreachable
            return False
    try:
        return stun.parse_message(data).transaction_id == request.transaction_id
    except ValueError:
        return False


class Coturn:
    """
    A ``turnserver -c FILE`` subprocess listening on 127.0.0.1 (UDP and TCP) on a free port, relaying from
    127.0.0.1 with the rendered hardened config.

    :param allow_loopback_peers: render the test-only variant that may relay to 127.0.0.1 (needed whenever
        the peer, e.g. the SFU, is on this machine's loopback).
    :param extra_args: more command-line options, e.g. ``["--relay-ip=::1"]`` for IPv6 allocations.
    :param edit: changes the rendered config text before coturn reads it (to show what a line is for).
    :param settings: overrides of the TURN settings (``turn_realm``, ``turn_user_quota``…).
    """

    def __init__(
        self,
        tmp: Path,
        *,
        secret: str = SECRET,
        allow_loopback_peers: bool = False,
        extra_args: Sequence[str] = (),
        edit: Callable[[str], str] = lambda text: text,
        **settings: object,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = free_udp_tcp_port(self.host)
        self.secret = secret
        self.settings = Settings(
            turn_secret=secret,
            turn_listening_ip=self.host,
            turn_relay_ip=self.host,
            turn_port=self.port,
            **settings,  # type: ignore[arg-type]
        )
        self.dir = tmp / f"coturn-{self.port}"
        self.dir.mkdir(parents=True)
        self.config_path = self.dir / "turnserver.conf"
        self.config_path.write_text(edit(config.render(self.settings, allow_loopback_peers=allow_loopback_peers)))
        self.config_path.chmod(0o600)
        self.log_path = self.dir / "turnserver.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            # --log-file on the command line too: coturn opens a file in /var/log for messages it logs
            # while still reading the config file (e.g. about the prometheus line) otherwise.
            [TURNSERVER, "-c", str(self.config_path), "--log-file=stdout", f"--pidfile={self.dir / 'turnserver.pid'}",
             f"--userdb={self.dir / 'turndb'}", *extra_args],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not stun_answers(self.host, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"coturn did not start:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def url(self, transport: str = "udp") -> str:
        """The ``turn:`` URL of this server."""
        return f"turn:{self.host}:{self.port}?transport={transport}"

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _skip_without_coturn() -> None:
    if not os.path.exists(TURNSERVER):
        pytest.skip("coturn is not installed (apt-get install -y coturn)")


@pytest.fixture(scope="module", name="coturn")
def coturn_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """coturn that may relay to loopback peers (so it can reach an SFU and echo peers on 127.0.0.1); verbose, so
    its log names the user of each allocation."""
    _skip_without_coturn()
    server = Coturn(tmp_path_factory.mktemp("coturn"), allow_loopback_peers=True, extra_args=["--verbose"])
    yield server
    server.stop()


@pytest.fixture(scope="module", name="hardened_coturn")
def hardened_coturn_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """coturn with the production config, plus an IPv6 relay address (::1) to test IPv6 allocations."""
    _skip_without_coturn()
    server = Coturn(tmp_path_factory.mktemp("coturn"), extra_args=["--relay-ip=::1"])
    yield server
    server.stop()
