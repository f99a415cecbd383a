"""Local ports for tests, and the metrics endpoint a worker serves on one."""

from __future__ import annotations

import socket
import urllib.request


def free_port() -> int:
    """A local TCP port nothing listens on (just now: bind it soon, or use it as a closed one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def free_port_pair() -> int:
    """A port P with P+1 free too (swtpm's server and control ports)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return int(port)
    raise RuntimeError("no free port pair")


def scrape(port: int) -> str:
    """The Prometheus text a worker's metrics server on ``port`` answers."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())
