"""
Test hosts on this machine: network namespaces joined to this one by veth pairs, with optional rate caps.

A :class:`NetworkNamespace` is a "remote" client host: its own network stack, reached only through its veth pair
(10.250.x.y/30, chosen free on this machine). :meth:`NetworkNamespace.shape` caps either direction with ``tc tbf``
(this kernel has no netem: no added delay or loss), :meth:`NetworkNamespace.link` takes the link down and up.
Only these namespaces are ever addressed; nothing is routed anywhere else. Everything created is removed by
:meth:`NetworkNamespace.delete`, also when creation fails halfway (the fixtures in conftest.py call it).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import subprocess
from pathlib import Path

_counter = itertools.count()
#: Where test subnets are taken from (a /30 per namespace).
POOL = ipaddress.ip_network("10.250.0.0/16")
#: Names of namespaces this module creates start with this (leftovers of a killed run can be swept).
PREFIX = "chorus-t"


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _used_networks() -> set[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    used = set()
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            used.add(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    return used


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    start = (os.getpid() * 31 + next(_counter) * 4) % 16384  # spread concurrent test runs over the pool
    subnets = list(POOL.subnets(new_prefix=30))
    for i in range(len(subnets)):
        subnet = subnets[(start + i) % len(subnets)]
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise RuntimeError("no free /30 left in 10.250.0.0/16")


class NetworkNamespace:
    """A test host: a network namespace and the veth pair that joins it to this one."""

    def __init__(self) -> None:
        i = next(_counter)
        tag = f"{os.getpid() % 100000}x{i}"
        self.name = f"{PREFIX}{tag}"
        self.host_if, self.ns_if = f"chh{tag}", f"chn{tag}"  # at most 15 characters
        subnet = _free_subnet()
        hosts = list(subnet.hosts())
        self.host_ip, self.ns_ip = str(hosts[0]), str(hosts[1])
        try:
            _run("ip", "netns", "add", self.name)
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _run("ip", "link", "set", self.ns_if, "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            self.exec("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            self.exec("ip", "link", "set", self.ns_if, "up")
            self.exec("ip", "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def __repr__(self) -> str:
        return f"NetworkNamespace({self.name}, host {self.host_ip}, inside {self.ns_ip})"

    def exec(self, *cmd: str) -> None:
        """Run a command inside the namespace (fails loudly)."""
        _run("ip", "netns", "exec", self.name, *cmd)

    def link(self, up: bool) -> None:
        """Take the link down (nothing passes either way) or up again."""
        _run("ip", "link", "set", self.host_if, "up" if up else "down")

    def shape(self, *, down_kbit: int | None = None, up_kbit: int | None = None, burst_bytes: int = 8000,
              latency_ms: int = 50) -> None:
        """
        Cap the link with a token bucket (``tc tbf``): ``down_kbit`` towards the namespace (the server's media to
        a client in it), ``up_kbit`` from it; ``None`` removes that cap. Packets waiting longer than
        ``latency_ms`` in the bucket's queue are dropped, as on a congested access link.
        """
        for device, rate, inside in ((self.host_if, down_kbit, False), (self.ns_if, up_kbit, True)):
            prefix = ("ip", "netns", "exec", self.name) if inside else ()
            subprocess.run([*prefix, "tc", "qdisc", "del", "dev", device, "root"], capture_output=True)
            if rate is not None:
                _run(*prefix, "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", f"{rate}kbit",
                     "burst", str(burst_bytes), "latency", f"{latency_ms}ms")

    def wrap(self, executable: str, folder: Path) -> str:
        """A launcher script that runs ``executable`` inside the namespace (e.g. Playwright's executable_path)."""
        script = folder / f"in-{self.name}.sh"
        script.write_text(f'#!/bin/sh\nexec ip netns exec {self.name} {executable} "$@"\n')
        script.chmod(0o755)
        return str(script)

    def delete(self) -> None:
        """Remove the namespace and the veth pair (and so every qdisc on them). Idempotent."""
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)


def sweep() -> None:
    """Remove namespaces this process created and somehow left behind (e.g. a test killed by its timeout)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    mine = f"{PREFIX}{os.getpid() % 100000}x"
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(mine):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def available() -> bool:
    """Whether this machine lets the tests create namespaces (root, iproute2)."""
    from shutil import which

    return os.geteuid() == 0 and which("ip") is not None and which("tc") is not None
