"""The parent of `lb serve --workers N`: sockets, processes, signals, drain.

The parent opens the listening sockets once and every worker inherits them (fd passing, not
SO_REUSEPORT): the port is owned by one process for lb's whole life, so port 0 works, and a
connection that arrives while a worker restarts waits in the kernel's queue for another
worker instead of being reset with a dead worker's own queue.

Workers share state as a fleet of lb instances does (`cluster/fleet.py`): through `REDIS_URL`
when it is set, else through a private `redis-server` the parent starts on a unix socket in a
temp dir and stops last. So node caps are split exactly over the live workers, one worker
holds the scanner lease, and admin changes and breaker openings reach every worker, with the
code a fleet already runs and tests (no second implementation of sharing to keep exact).

Each worker is `lb serve-worker` in its own session (a terminal's Ctrl-C reaches the parent
only, which forwards it once). It reads the parent's settings from its stdin and keeps that
pipe open: when it reads EOF the parent is gone and it drains itself. It reports ready through
a pipe. A worker that dies is restarted with backoff (like `supervise`), counted and logged.
"""

from __future__ import annotations

import contextlib
import copyreg
import ctypes
import logging
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import trio

from lb.config import ConfigError, Settings

log = logging.getLogger("lb.workers")

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
KILL_AFTER_DRAIN_SECS = 10.0  # a worker still alive this long after its drain is killed
PRIVATE_SYNC_SECS = 0.1  # a sync over a local unix socket costs ~nothing: re-balance fast
_HEADER = struct.Struct("!Q")


def _mapping_proxy(items: dict[object, object]) -> types.MappingProxyType[object, object]:
    return types.MappingProxyType(items)


# The settings go to a worker as a pickle; a catalogue keeps read-only mappings in them.
copyreg.pickle(types.MappingProxyType, lambda proxy: (_mapping_proxy, (dict(proxy),)))


@attrs.frozen
class WorkerInfo:
    """Who a worker is, for `/v1/debug/services`."""

    index: int
    count: int
    restarts: int  # how many times this worker's slot was restarted before this process

    def describe(self) -> dict[str, object]:
        return {"worker": self.index, "workers": self.count, "restarts": self.restarts}


def split_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"


class PrivateRedis:
    """A redis-server the parent owns: a unix socket in a temp dir, no TCP port, no disk."""

    def __init__(self, directory: str) -> None:
        self.socket_path = str(Path(directory) / "redis.sock")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    async def start(self, binary: str) -> None:
        # Popen from this (the main) thread, not trio's open_process (a worker thread): the
        # parent-death signal fires when the thread that forked exits.
        self.process = subprocess.Popen(  # noqa: ASYNC220 (a fork: milliseconds, once)
            [binary, "--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(Path(self.socket_path).parent),
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
        )
        with trio.fail_after(10):
            while not await _pings(self.socket_path):
                code = self.process.poll()
                if code is not None:
                    raise ConfigError(f"the private redis-server exited with {split_exit(code)}")
                await trio.sleep(0.02)

    async def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                await trio.to_thread.run_sync(process.wait, 5)
            except subprocess.TimeoutExpired:
                process.kill()
                await trio.to_thread.run_sync(process.wait)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when lb's parent process dies, even by SIGKILL, so
    the private redis-server never outlives it (Linux's PR_SET_PDEATHSIG; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


async def _pings(path: str) -> bool:
    try:
        stream = await trio.open_unix_socket(path)
    except OSError:
        return False
    async with stream:
        await stream.send_all(b"PING\r\n")
        with trio.move_on_after(1):
            return (await stream.receive_some(64)).startswith(b"+PONG")
    return False


async def run_parent(settings: Settings) -> int:
    """`lb serve --workers N`: returns the exit code (0 when every worker drained cleanly)."""
    from lb.app import listen_url, open_listeners

    if settings.demo:
        raise ConfigError("--demo runs its mock nodes in one process; drop --workers")
    binary = shutil.which("redis-server")
    if not settings.redis_address and binary is None:
        raise ConfigError(
            f"--workers {settings.workers} shares node caps, the scanner and admin changes "
            "through a private redis-server, which is not installed (Debian package "
            "redis-server): install it, or set REDIS_URL"
        )
    listeners = await open_listeners(settings)
    port: int = listeners[0].socket.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="lb-workers-") as directory:
        store = None
        try:
            if not settings.redis_address:
                assert binary is not None
                store = PrivateRedis(directory)
                await store.start(binary)
                settings = attrs.evolve(
                    settings, redis_url=store.url,
                    redis_sync_secs=min(settings.redis_sync_secs, PRIVATE_SYNC_SECS),
                )
            parent = Parent(settings, listeners)
            return await parent.run(lambda: print(f"lb listening on {listen_url(settings, port)}",
                                                  flush=True))
        finally:
            for listener in listeners:
                listener.socket.close()
            if store is not None:
                await store.stop()


class Parent:
    """Runs N workers on the parent's listeners until a signal drains them all."""

    def __init__(self, settings: Settings, listeners: Sequence[trio.SocketListener]) -> None:
        self.settings = settings
        self.listeners = list(listeners)
        self.count = settings.workers
        self.payload = pickle.dumps(attrs.evolve(settings, workers=1))
        self.processes: dict[int, trio.Process] = {}
        self.restarts = [0] * self.count
        self.exit_codes: dict[int, int] = {}
        self.draining = False
        self.forced = False
        self.failed = False
        self._drained = trio.Event()
        self._root: trio.Nursery | None = None

    async def run(self, announce: Callable[[], None]) -> int:
        try:
            async with trio.open_nursery() as root:
                self._root = root
                root.start_soon(self._watch_signals)
                async with trio.open_nursery() as slots:
                    # All start at once; lb listens when every one of them is ready.
                    async with trio.open_nursery() as starting:
                        for index in range(self.count):
                            starting.start_soon(slots.start, self._slot, index)
                    if not self.draining:  # none failed to start, no signal came
                        log.info("%d workers serving (pids %s)", self.count,
                                 ", ".join(str(p.pid) for p in self.processes.values()))
                        announce()
                root.cancel_scope.cancel()
        finally:
            # Never leave a worker behind (each would also drain itself on its stdin's EOF).
            for process in self.processes.values():
                if process.poll() is None:
                    process.kill()
        clean = all(code == 0 for code in self.exit_codes.values())
        return 1 if self.forced or self.failed or not clean else 0

    async def _spawn(self, index: int) -> tuple[trio.Process, trio.lowlevel.FdStream]:
        ready_r, ready_w = os.pipe()
        fds = [listener.socket.fileno() for listener in self.listeners]
        info = WorkerInfo(index, self.count, self.restarts[index])
        command = [
            sys.executable, "-m", "lb.cli", "serve-worker", "--index", str(info.index),
            "--count", str(info.count), "--restarts", str(info.restarts),
            "--fds", ",".join(map(str, fds)), "--ready-fd", str(ready_w),
        ]
        try:
            process = await trio.lowlevel.open_process(
                command, stdin=subprocess.PIPE, pass_fds=(*fds, ready_w), start_new_session=True,
            )
        finally:
            os.close(ready_w)
        self.processes[index] = process
        if self.draining:  # a signal came while it was starting
            process.send_signal(signal.SIGTERM)
        assert process.stdin is not None
        await process.stdin.send_all(_HEADER.pack(len(self.payload)) + self.payload)
        return process, trio.lowlevel.FdStream(ready_r)

    async def _slot(
        self, index: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """One worker: start it, wait for it, restart it with backoff until the drain."""
        backoff = FIRST_BACKOFF
        starting = True
        while True:
            if self.draining:  # a signal came before this worker started: the sockets are shut
                if starting:
                    task_status.started()
                return
            process, ready = await self._spawn(index)
            async with ready:
                is_ready = await ready.receive_some(1) != b""
            if not starting and is_ready:
                log.info("worker %d is back (pid %d)", index, process.pid)
            if starting:
                task_status.started()
                starting = False
                if not is_ready and not self.draining:  # broken from the start: give up
                    code = await process.wait()
                    self.exit_codes[index] = code
                    log.error("worker %d (pid %d) exited with %s before it was ready; stopping",
                              index, process.pid, split_exit(code))
                    self.failed = True
                    self._begin_drain(signal.SIGTERM)
                    return
            began = trio.current_time()
            code = await process.wait()
            if process.stdin is not None:
                await process.stdin.aclose()
            self.exit_codes[index] = code
            if self.draining:
                log.info("worker %d (pid %d) exited with %s", index, process.pid,
                         split_exit(code))
                return
            self.restarts[index] += 1
            # One that ran well for a while starts again from the shortest backoff.
            if trio.current_time() - began > MAX_BACKOFF:
                backoff = FIRST_BACKOFF
            log.warning(
                "worker %d (pid %d) exited with %s; restarting it in %.1fs (restart %d)",
                index, process.pid, split_exit(code), backoff, self.restarts[index],
            )
            with trio.move_on_at(trio.current_time() + backoff):
                await self._drained.wait()
            if self.draining:
                return
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _signal_all(self, signum: int) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signum)

    def _begin_drain(self, signum: int) -> None:
        self.draining = True
        self._drained.set()
        # The workers close their copies of the listening sockets as they drain; ours goes
        # too, so that new connections are refused, not left queued.
        for listener in self.listeners:
            listener.socket.close()
        self._signal_all(signum)
        assert self._root is not None
        self._root.start_soon(self._kill_late)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.draining:
                    log.info("%s: draining %d workers (up to %.0fs)", name, self.count,
                             self.settings.drain_timeout)
                    self._begin_drain(signum)
                else:
                    log.warning("second signal: workers exit now")
                    self.forced = True
                    self._signal_all(signum)

    async def _kill_late(self) -> None:
        await trio.sleep(self.settings.drain_timeout + KILL_AFTER_DRAIN_SECS)
        log.error("workers still running %.0fs after the drain: killing them",
                  KILL_AFTER_DRAIN_SECS)
        self._signal_all(signal.SIGKILL)


def read_settings(fd: int = 0) -> Settings:
    """The settings a worker's parent wrote on its stdin (length, then a pickle)."""
    def read_exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = os.read(fd, size - len(data))
            if not chunk:
                raise SystemExit("lb serve-worker: the parent closed stdin before its settings")
            data += chunk
        return data

    (size,) = _HEADER.unpack(read_exactly(_HEADER.size))
    settings = pickle.loads(read_exactly(size))  # our own parent's pipe
    assert isinstance(settings, Settings)
    return settings


async def run_worker(
    settings: Settings, info: WorkerInfo, fds: Sequence[int], ready_fd: int
) -> int:
    """One worker: serve on the inherited sockets; drain when the parent says so or is gone."""
    from lb.app import serve

    listeners = [
        trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
        for fd in fds
    ]

    def announce(port: int) -> None:
        log.debug("worker %d (pid %d) serving on port %d", info.index, os.getpid(), port)
        os.write(ready_fd, b"r")
        os.close(ready_fd)

    async def exit_with_parent() -> None:
        async with trio.lowlevel.FdStream(os.dup(0)) as parent:
            while await parent.receive_some(1024):
                pass
        log.warning("worker %d: the parent is gone; draining", info.index)
        os.kill(os.getpid(), signal.SIGTERM)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(exit_with_parent)
        code = await serve(settings, listeners=listeners, worker=info, announce=announce)
        nursery.cancel_scope.cancel()
    return code
