"""A free localhost port for the tests' process-group rendezvous. Imports nothing else (torchrun workers import it),
unlike conftest, which sets TRITON_INTERPRET and the thread count."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A free localhost TCP port for a test's process group rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
