"""Shared helpers of the server tests: a free loopback port, and `medsam3 serve` run in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest


def answers_200(port: int, path: str) -> bool:
    """Whether a server on the loopback ``port`` answers ``GET path`` with 200 (False while nothing listens)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def free_port() -> int:
    """A port nothing listens on (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(*options: str, start_timeout_s: float = 60, join_timeout_s: float = 10) -> Iterator[int]:
    """`medsam3 serve --checkpoint tiny --device cpu --log-level warning OPTIONS...`, built from the CLI's own parser,
    on a free loopback port in a background thread: yields the port once the server listens, stops it after."""
    from medsam3_monai.deploy.cli import build_parser
    from medsam3_monai.deploy.serve import build_server

    port = free_port()
    args = build_parser().parse_args(["serve", "--checkpoint", "tiny", "--port", str(port), "--device", "cpu",
                                      "--log-level", "warning", *options])
    server = build_server(args)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=join_timeout_s)
