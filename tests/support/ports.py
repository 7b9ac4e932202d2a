"""A free TCP port on loopback, for the one case port 0 does not cover: two servers that must
each be told the other's port before either starts (the node pair's mirror listeners).  The
kernel hands out ephemeral ports in sequence, so a port just released is not soon reused."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
