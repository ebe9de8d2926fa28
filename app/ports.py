"""Ports on 127.0.0.1, where everything the app serves listens."""

from __future__ import annotations

import socket

from engine.errors import UserError

HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port(start: int = DEFAULT_PORT, tries: int = 100) -> int:
    """`start` or the next port after it that nothing listens on (on 127.0.0.1)."""
    for port in range(start, start + tries):
        if port_is_free(port):
            return port
    raise UserError(f"no free port between {start} and {start + tries - 1}")
