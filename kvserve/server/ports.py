"""A free TCP port on 127.0.0.1 for a server that another process will start (tests, benchmarks)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Below this the kernel never hands out ports on its own (Linux's default ephemeral range starts
# here); above 20,000 Ray keeps clear of (its workers take 10,002 - 19,999).
_SAFE_LOW = 20_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_local_port() -> int:
    """A port that is free now, chosen outside the kernel's ephemeral range.

    A port from `bind(("127.0.0.1", 0))` comes from that range, so between our probe and the
    server's own bind any process's next socket may get it — a starting Ray cluster opens dozens,
    and one took the port of its own proxy that way. Ports outside it are only taken on request."""
    ephemeral_low = int(_EPHEMERAL_RANGE.read_text().split()[0]) if _EPHEMERAL_RANGE.exists() else 32_768
    for _ in range(200):
        port = random.randrange(_SAFE_LOW, max(ephemeral_low, _SAFE_LOW + 1000))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {_SAFE_LOW} and {ephemeral_low} on 127.0.0.1")
