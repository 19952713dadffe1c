"""One mock node served by several processes on one port (`lb mock --processes N`).

A real node (vLLM, llama.cpp's server) answers on more than one core; one mock process does
not (about 0.1 CPU-ms per plain answer, on lb's own h11 server), so a benchmark whose load
generator or lb outruns one core would measure the mock instead. Each process binds its own
socket to the port with SO_REUSEPORT and the kernel spreads new connections over them (by a
hash of the connection's addresses): no process hands connections to another, and a
connection stays with one process for its life.

All N sockets are bound and listening before the first fork, so the port is fixed (port 0
works) and no connection can reach the port before every process's socket is there. The
processes are forks of the first (each keeps only its own socket); each child asks Linux to
send it SIGTERM when the first dies (PR_SET_PDEATHSIG), and the first stops its children
when it leaves. Each process is its own node: its counters (`/mock/stats`), recorded
requests, prefix cache and a fault set through `POST /mock/fault` are its own; options given
on the command line apply to all.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable

import trio

from lb.testing.mock import MockNode

_PR_SET_PDEATHSIG = 1


def reuseport_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on host:port (port 0: the first one picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(socket.SOMAXCONN)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _serve(node: MockNode, sock: socket.socket) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    await node.serve_listeners([listener])


def run(make_node: Callable[[], MockNode], sockets: list[socket.socket],
        listening: Callable[[int], None]) -> None:
    """Serve nodes made by `make_node`, one process per socket (of `reuseport_sockets`),
    until this process is stopped; `listening(port)` is called once all can take
    connections."""
    parent = os.getpid()
    children: list[int] = []
    for sock in sockets[1:]:
        pid = os.fork()
        if pid == 0:  # the child: its own socket only, and it dies with the first process
            code = 0
            try:
                for other in sockets:
                    if other is not sock:
                        other.close()
                _die_with(parent)
                with contextlib.suppress(KeyboardInterrupt):
                    trio.run(_serve, make_node(), sock)
            except BaseException:  # never return into the parent's code from a fork
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        children.append(pid)
        sock.close()
    try:
        listening(sockets[0].getsockname()[1])
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(_serve, make_node(), sockets[0])
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _die_with(parent: int) -> None:
    """SIGTERM to this process when `parent` dies (Linux); exit now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(0)
