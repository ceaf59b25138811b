"""The test-host helper: a namespace is reachable over its veth pair, a tbf cap really limits the rate, and
nothing is left behind."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from netns import NetworkNamespace

RECEIVER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(1.0)
print("ready", flush=True)
total, first, last = 0, None, None
while True:
    try:
        data = s.recv(2048)
    except TimeoutError:
        break
    now = time.monotonic()
    first = first or now
    last = now
    total += len(data)
print(total, (last or 0) - (first or 0), flush=True)
"""


def _blast(ns: NetworkNamespace, seconds: float, kbit: int) -> float:
    """Send UDP at ``kbit`` to a receiver inside the namespace; the rate it received, in kbit/s."""
    port = 40000 + int(ns.ns_ip.split(".")[-2]) * 4 % 20000
    receiver = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", RECEIVER, ns.ns_ip, str(port)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            payload = bytes(1200)
            interval = len(payload) * 8 / (kbit * 1000)
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < seconds:
                s.sendto(payload, (ns.ns_ip, port))
                n += 1
                delay = start + n * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        total, span = receiver.communicate(timeout=10)[0].split()
        return int(total) * 8 / 1000 / max(float(span), 0.001)
    finally:
        receiver.kill()
        receiver.wait()


def test_namespace_link_cap_and_cleanup(netns: NetworkNamespace) -> None:
    free = _blast(netns, 1.0, 2000)
    netns.shape(down_kbit=300)
    capped = _blast(netns, 1.5, 2000)
    netns.shape(down_kbit=None)
    print(f"uncapped {free:.0f} kbit/s, capped {capped:.0f} kbit/s")
    assert free > 1500
    assert 200 < capped < 400

    netns.delete()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert netns.name not in listed and netns.host_if not in links
